"""Bad input gets an error that names the file or config key and says what to do, before any
work is lost: config files, command-line JSON, damaged artifacts, and budgets a report cannot
apply. Each case was a raw traceback, or a silent loss, before it was handled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sciquant import cli
from sciquant.errors import SciquantError
from sciquant.study import check_semantics, load_config

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "workflow" / "config" / "ci.yaml"


def ci_config() -> dict:
    return yaml.safe_load(CI.read_text())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `sciquant argv` (argparse's own errors exit 2 as well)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    return status, capsys.readouterr().err


# ------------------------------------------------------------------------------ config files


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(CI.read_text() + "\nquantize:\n  sweeps: []\n")
    first = 1 + CI.read_text().splitlines().index("quantize:")
    second = len(path.read_text().splitlines()) - 1
    with pytest.raises(SciquantError) as error:
        load_config(path)
    message = str(error.value)
    assert f"line {second}: key 'quantize' is given a second time" in message
    assert f"first on line {first}" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "'datasets' is a required property"),
        ("study: only\n", "'models' is a required property"),
        ("- a\n- b\n", "a study config is a mapping of keys"),
        ("42\n", "not a int"),
    ],
)
def test_a_config_that_is_not_a_study_says_what_is_missing(tmp_path, text, expected):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(SciquantError, match=expected):
        load_config(path)


def test_a_folder_or_non_utf8_file_as_config(tmp_path):
    with pytest.raises(SciquantError, match="is a folder"):
        load_config(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_bytes(b"\xff\xfe study")
    with pytest.raises(SciquantError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("section", "name", "key"),
    [("datasets", "bloodflow", "workload"), ("models", "meshgraphnet", "architecture")],
)
def test_a_missing_kind_is_the_one_error_reported(tmp_path, section, name, key):
    """Without its kind a dataset or model was also checked against the other kind's keys,
    and every key the user wrote was listed as unexpected."""
    config = ci_config()
    del config[section][name][key]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SciquantError) as error:
        load_config(path)
    lines = str(error.value).splitlines()[1:]
    assert lines == [f"  config key {section}.{name}: '{key}' is a required property"]


def test_a_budget_without_a_bound_fails_the_config_check():
    config = ci_config()
    config["report"] = {"budget": {"metric": "pressure_error_pct"}}
    with pytest.raises(SciquantError, match=r"^config key report\.budget: .*max_ratio_to_fp32"):
        check_semantics(config)


def test_degree_protection_out_of_order_fails_the_config_check():
    config = ci_config()
    config.setdefault("quantize", {})["qat"] = {"degree_protection": {"p_min": 0.5, "p_max": 0.1}}
    with pytest.raises(SciquantError, match=r"degree_protection: need 0 <= p_min <= p_max"):
        check_semantics(config)


# ------------------------------------------------------------------------- command-line JSON


#: A quantize command line without its method.
QUANTIZE = (
    "quantize --checkpoint c.pt --prepared p --target reference --precision w8a8 --out o"
).split()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--prepared", "p", "--settings", "[1]", "--out", "o"], "expected a JSON object"),
        (["fetch", "--files", '["u"]', "--out", "o"], "expected a JSON list of objects"),
        (["fetch", "--files", '[{"url": "http://x"}]', "--out", "o"], "entry 0 has no sha256"),
        (["train", "--prepared", "p", "--threads", "-1", "--out", "o"], "whole number ≥ 1"),
        (["report", "--cube", "c.nc", "--budget", "5", "--out", "r.html"], "error budget 5"),
        (
            [
                "evaluate",
                "--checkpoint",
                "c.pt",
                "--prepared",
                "p",
                "--out",
                "o",
                "--coordinates",
                '{"dataset": "b", "model": "m", "seed": 0, "target": "reference", '
                '"method": "none"}',
            ],
            "no precision",
        ),  # fmt: skip
        (
            ["prepare", "bloodflow", "--raw", "r", "--out", "o", "--settings", '{"colour": 1}'],
            "'colour' was unexpected",
        ),  # fmt: skip
        (
            [
                "prepare",
                "bloodflow",
                "--raw",
                "r",
                "--out",
                "o",
                "--settings",
                '{"split": {"train": 0.9}}',
            ],
            "must add up to 1",
        ),  # fmt: skip
        (
            [*QUANTIZE, "--method", "ptq-mse", "--settings", '{"calibration_samples": 2}'],
            "unknown calibration_samples",
        ),
        (
            [*QUANTIZE, "--method", "ptq-minmaxx"],
            "invalid choice: 'ptq-minmaxx' (choose from 'none', 'ptq-minmax',",
        ),
        (
            ["train", "--prepared", "p", "--settings", __file__, "--out", "o"],
            "(this is a file's path: the option takes the JSON text itself",
        ),  # fmt: skip
        (
            ["prepare", "bloodflow", "--raw", "nothere", "--out", "o"],
            "nothere: no such folder; give the raw data folder",
        ),  # fmt: skip
    ],
)
def test_command_line_input_of_the_wrong_shape(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(capsys, *argv)
    assert status == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any work


# -------------------------------------------------------------------------- damaged artifacts


def test_an_empty_checkpoint_names_the_file(tmp_path):
    from sciquant.workloads.bloodflow.train import load_model

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    with pytest.raises(SciquantError, match=r"checkpoint.pt: not a readable .*\(EOFError\)"):
        load_model(path)


def test_an_empty_resume_checkpoint_restarts_training(tmp_path, capsys):
    from sciquant.workloads.bloodflow import train as train_bloodflow
    from tests.test_train_bloodflow import TINY, tiny_prepared

    prepared = tiny_prepared(tmp_path)
    out = tmp_path / "fp32"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"")
    checkpoint = train_bloodflow.run(prepared, out, TINY, seed=0, progress=False)
    assert checkpoint.exists()
    assert "not resumable; starting from scratch" in capsys.readouterr().out


def test_a_file_that_is_no_recommendation(tmp_path):
    from sciquant.workloads.bloodflow.quantize import load_recommendation

    path = tmp_path / "recommendation.json"
    path.write_text(json.dumps({"format_version": 6}))
    with pytest.raises(SciquantError, match="no `layer_precisions`"):
        load_recommendation(path)


def test_a_missing_or_damaged_onnx_file(tmp_path):
    from sciquant.workloads.bloodflow.dynamic import is_dynamic

    with pytest.raises(SciquantError, match="missing.onnx: ONNX file not found"):
        is_dynamic(tmp_path / "missing.onnx")
    damaged = tmp_path / "model.onnx"
    damaged.write_bytes(b"\x08\x07garbage")
    with pytest.raises(SciquantError, match="model.onnx: not a readable ONNX model"):
        is_dynamic(damaged)


def test_prepared_data_of_the_other_workload(tmp_path):
    from sciquant.workloads.bloodflow.data import load_index

    (tmp_path / "index.json").write_text(json.dumps({"format": "sciquant-md-pixelmaps"}))
    with pytest.raises(SciquantError, match="another workload \\('sciquant-md-pixelmaps'\\)"):
        load_index(tmp_path)


def test_an_index_missing_its_keys(tmp_path):
    from sciquant.workloads.bloodflow.data import FORMAT_VERSION, load_index

    index = {"format_version": FORMAT_VERSION, "workload": "bloodflow", "settings": {}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(SciquantError, match="no simulations, samples, node_features, statistics"):
        load_index(tmp_path)


def test_metrics_without_their_metrics_object(tmp_path):
    from sciquant.report.cube import read_metrics

    coordinates = {"dataset": "b", "model": "m", "seed": 0, "target": "reference",
                   "method": "none", "precision": "fp32"}  # fmt: skip
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"coordinates": coordinates}))
    with pytest.raises(SciquantError, match="no `metrics` object"):
        read_metrics(path)


# --------------------------------------------------------------------------------- the report


def test_a_misspelt_budget_metric_fails_the_report_with_the_closest_name(tmp_path):
    from sciquant.report.cube import aggregate, write_fake_study
    from sciquant.report.html import build_report

    paths = write_fake_study(tmp_path, 12)
    aggregate(paths, tmp_path / "metrics.nc", tmp_path / "metrics.csv", {"study": "t"})
    budget = [
        {"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2},
        {"metric": "flow_error_pct", "max_ratio_to_fp32": 1.2},
    ]
    with pytest.raises(SciquantError, match="'flow_error_pct' .*did you mean flowrate_error_pct"):
        build_report(tmp_path / "metrics.nc", tmp_path / "index.html", budget)
    assert not (tmp_path / "index.html").exists()
    build_report(tmp_path / "metrics.nc", tmp_path / "index.html", budget[:1])
    assert (tmp_path / "index.html").exists()


def test_runs_of_two_configs_are_flagged_and_a_missing_figure_is_named(tmp_path, capsys):
    from sciquant.report.cube import aggregate, write_fake_study
    from sciquant.report.html import build_report

    paths = write_fake_study(tmp_path, 8)
    stale = json.loads(paths[-1].read_text())
    stale["settings_hashes"]["models.bench"] = "f" * 64  # a run left from an earlier config
    paths[-1].write_text(json.dumps(stale))
    aggregate(paths, tmp_path / "metrics.nc", tmp_path / "metrics.csv", {"study": "t"})
    (tmp_path / "text.png").write_text("not an image")
    figures = [tmp_path / "gone.png", tmp_path / "text.png"]
    page = build_report(
        tmp_path / "metrics.nc", tmp_path / "index.html", extra_figures=figures
    ).read_text()
    assert "These runs were made under different settings of 1 config section" in page
    assert "<code>models.bench</code>: <code>111111111111</code>, <code>ffffffffffff</code>" in page
    err = capsys.readouterr().err
    assert f"figure {tmp_path / 'gone.png'} left out (no such file)" in err
    assert f"figure {tmp_path / 'text.png'} left out (not a PNG or JPEG file)" in err
    assert "text.png" not in page

    paths[-1].unlink()
    aggregate(paths[:-1], tmp_path / "one.nc", tmp_path / "one.csv", {"study": "t"})
    page = build_report(tmp_path / "one.nc", tmp_path / "one.html").read_text()
    assert "different settings of" not in page

    # metrics.json of an earlier version: one hash of the whole config, under `config`
    for path, digest in zip(paths[:2], ("a" * 64, "b" * 64), strict=True):
        legacy = json.loads(path.read_text())
        del legacy["settings_hashes"]
        path.write_text(json.dumps(legacy | {"config_hash": digest}))
    aggregate(paths[:2], tmp_path / "old.nc", tmp_path / "old.csv", {"study": "t"})
    page = build_report(tmp_path / "old.nc", tmp_path / "old.html").read_text()
    assert "<code>config</code>: <code>aaaaaaaaaaaa</code>, <code>bbbbbbbbbbbb</code>" in page
