"""Config values that reach a shell or run for days fail the config check, naming the key.

(a) `nodes.<type>.slurm_extra` is pasted into the sbatch command line that the Slurm executor
plugin hands to a shell, and `sciquant submit` turns it into `#SBATCH` lines of a job script: it
must be long sbatch options only (`--option` or `--option=value`, a safe character set). Every
node value that reaches the sbatch command or an `#SBATCH` line must be one line.
(b) Sizes that would simulate for days or fill the disk (embedded blood-flow simulations, MD
frames, seeds, a tiny blood-flow `prepare.dt`) fail above their `limits`; the config's `limits:`
raises them on purpose.

Every case is the `ci` study with one change, checked the way the workflow checks it (schema with
defaults, then `check_semantics`), through `sciquant check-config` and through a Snakemake dry run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import sciquant.study as study_module
from sciquant.errors import SciquantError
from sciquant.study import SCHEMA, load_config

ROOT = Path(__file__).resolve().parents[1]
CI = yaml.safe_load((ROOT / "workflow" / "config" / "ci.yaml").read_text())


def study(tmp_path: Path, change: dict[str, Any]) -> dict[str, Any]:
    """The ci study with top-level keys replaced by `change`, loaded like `check-config` does."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(CI), **change}))
    return load_config(path)


def nodes(**v100: Any) -> dict[str, Any]:
    """`nodes` with a cpu entry and a v100 entry made of `v100`."""
    return {"nodes": {"cpu": {}, "v100": v100}}


def slurm_extra(text: str) -> dict[str, Any]:
    return {"nodes": {"cpu": {"slurm_extra": text}}}


def bloodflow(source: dict | None = None, prepare: dict | None = None) -> dict[str, Any]:
    dataset = copy.deepcopy(CI["datasets"]["bloodflow"])
    dataset["source"]["embedded"].update(source or {})
    dataset["prepare"].update(prepare or {})
    return {"datasets": {"bloodflow": dataset}}


def md_frames(frames: int) -> dict[str, Any]:
    """The ci study plus an embedded md dataset `gpcr` of `frames` frames and an icnnmd model."""
    gpcr = {"workload": "md", "source": {"embedded": {"frames": frames}}}
    models = {**CI["models"], "icnnmd": {"architecture": "icnnmd", "datasets": ["gpcr"]}}
    return {"datasets": {**CI["datasets"], "gpcr": gpcr}, "models": models}


# ------------------------------------------------------------------ (a) shell reach


#: slurm_extra values that would run something in the submitting shell or the job script.
SHELL_REACH = [
    ("semicolon", "--signal=B:USR1@300; touch pwned"),
    ("and", "--exclusive && touch pwned"),
    ("pipe", "--exclusive | tee pwned"),
    ("backticks", "--comment=`touch pwned`"),
    ("dollar", "--comment=$(touch pwned)"),
    ("variable", "--comment=$HOME"),
    ("redirect", "--exclusive > pwned"),
    ("single-quotes", "--comment='x' 'touch' 'pwned'"),
    ("double-quotes", '--comment="x y"'),
    ("newline", "--exclusive\ntouch pwned"),
    ("quoted-newline", '--comment="x\ntouch pwned"'),
    ("carriage-return", "--exclusive\rtouch pwned"),
    ("not-an-option", "touch pwned"),
    ("short-option", "-A myproject"),
    ("empty-value", "--comment="),
]


@pytest.mark.parametrize("text", [t for _, t in SHELL_REACH], ids=[i for i, _ in SHELL_REACH])
def test_slurm_extra_outside_sbatch_options_is_refused(tmp_path, text) -> None:
    with pytest.raises(SciquantError) as error:
        study(tmp_path, slurm_extra(text))
    message = str(error.value)
    assert "config key nodes.cpu.slurm_extra" in message, message
    assert "--option=value" in message, message  # says what is allowed
    assert "\n" not in message, message


@pytest.mark.parametrize(
    "text",
    [
        "",
        "--exclusive",
        "--signal=B:USR1@300",
        "--mail-type=END,FAIL --mail-user=me@example.org",
        "--begin=now+1hour --nice=10 --licenses=matlab:2",
        "  --requeue  --hint=nomultithread ",
    ],
)
def test_slurm_extra_sbatch_options_pass(tmp_path, text) -> None:
    assert study(tmp_path, slurm_extra(text))["nodes"]["cpu"]["slurm_extra"] == text


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("--partition=gpu", "slurm_partition"),
        ("--time=60", "runtime"),
        ("--gres=gpu:1", "gpu"),
        ("--wrap=hostname", None),
        ("--export=LD_PRELOAD=/tmp/x.so", None),
    ],
)
def test_slurm_extra_options_the_workflow_sets_are_refused(tmp_path, text, key) -> None:
    with pytest.raises(SciquantError) as error:
        study(tmp_path, slurm_extra(text))
    message = str(error.value)
    assert "config key nodes.cpu.slurm_extra" in message and text.split("=")[0] in message
    if key:
        assert f"nodes.cpu.{key}" in message, message


@pytest.mark.parametrize("key", ["slurm_partition", "constraint", "gpu_model", "gres"])
@pytest.mark.parametrize("text", ["gpu\ntouch pwned", "gpu\rtouch pwned", "gpu\n"])
def test_newline_in_a_value_reaching_sbatch_is_refused(tmp_path, key, text) -> None:
    change = {"nodes": {"cpu": {}, "v100": {"slurm_partition": "gpu", "gpu": 1, key: text}}}
    with pytest.raises(SciquantError) as error:
        study(tmp_path, change)
    message = str(error.value)
    assert f"config key nodes.v100.{key}" in message, message
    assert "one line" in message, message


def test_constraint_expressions_stay_allowed(tmp_path) -> None:
    change = nodes(slurm_partition="gpu", constraint="[v100*1&ib]|a100", gpu=1, gpu_model="v100")
    assert study(tmp_path, change)["nodes"]["v100"]["constraint"] == "[v100*1&ib]|a100"


def _submit_args(**given: Any) -> argparse.Namespace:
    values = dict(partition=None, constraint=None, account=None, timeout_min=None, mem_gb=None,
                  cpus=None, array_parallelism=4)  # fmt: skip
    return argparse.Namespace(**{**values, **given})


def test_submitit_parameters_take_only_checked_sbatch_text() -> None:
    """`sciquant submit` writes node settings as `#SBATCH` lines: a value with a newline would
    put a command into the job script, so it is refused even where the config went unchecked."""
    from sciquant.launch import executor_parameters

    config = {"threads": 1, "nodes": {"cpu": {"slurm_extra": '--comment="x\ntouch pwned"'}}}
    with pytest.raises(SciquantError, match=r"nodes\.cpu\.slurm_extra"):
        executor_parameters(config, "train", "cpu", _submit_args())
    config = {"threads": 1, "nodes": {"cpu": {"slurm_partition": "cpu\ntouch pwned"}}}
    with pytest.raises(SciquantError, match=r"nodes\.cpu\.slurm_partition"):
        executor_parameters(config, "train", "cpu", _submit_args())
    for option in ("partition", "constraint", "account"):
        with pytest.raises(SciquantError, match=f"--{option}"):
            executor_parameters({"threads": 1, "nodes": {}}, "train", "cpu",
                                _submit_args(**{option: "x\ntouch pwned"}))  # fmt: skip
    config = {"threads": 1, "nodes": {"cpu": {"slurm_extra": "--signal=B:USR1@300 --exclusive"}}}
    params = executor_parameters(config, "train", "cpu", _submit_args())
    assert params["slurm_additional_parameters"] == {"signal": "B:USR1@300", "exclusive": True}


# ------------------------------------------------------------------ (b) limits


#: (id, change, config key named, limit named, value that lets the change pass)
OVER_LIMITS = [
    ("simulations", bloodflow(source={"n_simulations": 50_000}),
     "config key datasets.bloodflow.source.embedded.n_simulations", "max_simulations", 50_000),
    ("md-frames", md_frames(10_000_000),
     "config key datasets.gpcr.source.embedded.frames", "max_md_frames", 10_000_000),
    ("seeds", {"seeds": list(range(100))}, "config key seeds", "max_seeds", 100),
    ("prepare-dt", bloodflow(prepare={"dt": 1e-6}),
     "config key datasets.bloodflow.prepare.dt", "min_prepare_dt", 1e-6),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key", "limit", "raised"),
    [case[1:] for case in OVER_LIMITS],
    ids=[case[0] for case in OVER_LIMITS],
)
def test_value_beyond_its_limit_fails_naming_key_limit_and_override(
    tmp_path, change, key, limit, raised
) -> None:
    with pytest.raises(SciquantError) as error:
        study(tmp_path, change)
    message = str(error.value)
    assert key in message, message
    assert f"{study_module.LIMITS[limit]:g}" in message, message  # the limit's value
    assert f"limits: {{{limit}: " in message, message  # how to raise it on purpose
    assert "\n" not in message, message


@pytest.mark.parametrize(
    ("change", "limit", "raised"),
    [(case[1], case[3], case[4]) for case in OVER_LIMITS],
    ids=[case[0] for case in OVER_LIMITS],
)
def test_limit_raised_on_purpose_lets_the_value_pass(tmp_path, change, limit, raised) -> None:
    config = study(tmp_path, {**change, "limits": {limit: raised}})
    assert config["limits"][limit] == raised


def test_limits_at_their_value_pass(tmp_path) -> None:
    change = {
        **bloodflow(source={"n_simulations": study_module.LIMITS["max_simulations"]},
                    prepare={"dt": study_module.LIMITS["min_prepare_dt"]}),
        "seeds": list(range(study_module.LIMITS["max_seeds"])),
    }  # fmt: skip
    study(tmp_path, change)
    study(tmp_path, md_frames(study_module.LIMITS["max_md_frames"]))


def test_unknown_limit_is_a_schema_error(tmp_path) -> None:
    with pytest.raises(SciquantError, match=r"config key limits: Additional properties"):
        study(tmp_path, {"limits": {"max_epochs": 10}})


def test_schema_documents_the_limits_the_code_applies() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["limits"]
    assert "default" not in schema  # left out, a config (and its hash) stays as written
    from sciquant.data import download

    defaults = {name: spec["default"] for name, spec in schema["properties"].items()}
    fetch_limits = {
        "max_download_bytes": download.MAX_DOWNLOAD_BYTES,
        "max_archive_members": download.MAX_ARCHIVE_MEMBERS,
        "max_unpacked_bytes": download.MAX_UNPACKED_BYTES,
        "max_compression_ratio": download.MAX_COMPRESSION_RATIO,
    }
    assert defaults == {**study_module.LIMITS, **fetch_limits}


@pytest.mark.parametrize("path", sorted((ROOT / "workflow" / "config").glob("*.yaml")),
                         ids=lambda p: p.stem)  # fmt: skip
def test_shipped_configs_stay_within_the_limits(path) -> None:
    load_config(path)


# ------------------------------------------------------------------ one-line errors


def test_check_config_prints_one_line_without_traceback(tmp_path, capsys) -> None:
    from sciquant.cli import main

    for name, change in [("extra", slurm_extra("--exclusive; touch pwned")),
                         ("seeds", {"seeds": list(range(100))})]:  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**copy.deepcopy(CI), **change}))
        assert main(["check-config", str(path)]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith("sciquant check-config: error: config key"), lines[0]
        assert not (tmp_path / "pwned").exists()


DRY_RUNS = [
    ("extra", slurm_extra("--exclusive; touch pwned"), "config key nodes.cpu.slurm_extra"),
    ("newline", nodes(slurm_partition="gpu\ntouch pwned"), "config key nodes.v100.slurm_partition"),
    ("simulations", OVER_LIMITS[0][1], OVER_LIMITS[0][2]),
    ("prepare-dt", OVER_LIMITS[3][1], OVER_LIMITS[3][2]),
]  # fmt: skip


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    from tests.test_malformed_configs import forked_dry_runs

    root = tmp_path_factory.mktemp("limits")
    jobs = [(root / name, change) for name, change, _ in DRY_RUNS]
    codes = forked_dry_runs(jobs)
    return {name: (root / name, code) for (name, _, _), code in zip(DRY_RUNS, codes, strict=True)}


@pytest.mark.parametrize(("name", "message"), [(n, m) for n, _, m in DRY_RUNS],
                         ids=[n for n, _, _ in DRY_RUNS])  # fmt: skip
def test_dry_run_refuses_naming_the_key(dry_runs, name, message) -> None:
    workdir, code = dry_runs[name]
    output = (workdir / "output.txt").read_text()
    assert code != 0, output
    assert message in output, output
    assert "Traceback" not in output, output
    assert not (workdir / "pwned").exists()
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()
