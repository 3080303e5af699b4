"""The result cube and the HTML report, on a small hand-made study of metrics.json files."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from sciquant.errors import SciquantError
from sciquant.provenance import write_json
from sciquant.report.cube import (
    COORDINATES,
    aggregate,
    cache_path,
    choose_deployments,
    headline_metrics,
    load_cube,
    parse_budget,
    precision_bits,
    quality_metrics,
    workload_slices,
)
from sciquant.report.html import (
    build_report,
    capped_bits_note,
    extra_figures_section,
    format_value,
)

SEEDS = (0, 1)
TARGETS = ("reference", "cpu-x86", "npu-pow2")
METHODS = ("ptq-minmax", "ptq-mse")
PRECISIONS = ("w8a8", "w4a8")
#: Each runs in the study, in both seeds, unless listed in MISSING.
FP32_TARGETS = ("reference", "cpu-x86")  # npu-pow2 has no FP32 run: speed-ups vs the reference's
MISSING = {
    (1, "cpu-x86", "ptq-mse", "w4a8"),  # only seed 0: a row with n=1
    (0, "reference", "ptq-mse", "w4a8"),  # neither seed: absent from the table, NaN in the cube
    (1, "reference", "ptq-mse", "w4a8"),
}
SIMULATED = {("cpu-x86", "w4a8"), ("npu-pow2", "w4a8")}  # no native 4-bit kernel there


def run_metrics(seed: int, target: str, method: str, precision: str) -> dict:
    """Made-up but distinct numbers: errors grow with fewer bits, time shrinks."""
    bits = precision_bits(precision)[0]
    error = 1.0 + 4.0 / bits + 0.1 * TARGETS.index(target) + 0.03 * (method == "ptq-mse")
    error += 0.013 * seed
    time_s = 0.002 * bits * (1.0 + 0.1 * TARGETS.index(target)) * (1.0 + 0.05 * seed)
    # The paired speed-up its evaluation measured beside its target's FP32: deliberately not
    # the ratio of the two jobs' times, which the report must never compute.
    paired = {}
    if (target, precision) not in SIMULATED:
        speedup = 1.0 if (method, precision) == ("none", "fp32") else 1.3 + 0.1 * seed + 0.01 * bits
        contended = (target, method, precision) == ("npu-pow2", "ptq-minmax", "w8a8")
        paired = {"paired_step_speedup": speedup, "paired_speedup": 0.9 * speedup,
                  "contended": float(contended)}  # fmt: skip
        if (method, precision) != ("none", "fp32"):
            paired |= {"paired_step_speedup_ci_low": speedup - 0.1,
                       "paired_step_speedup_ci_high": speedup + 0.1}  # fmt: skip
    return paired | {
        "pressure_error_pct": error,
        "pressure_error_pct_std": 0.1 * error,
        "pressure_error_pct_min": 0.8 * error,
        "pressure_error_pct_max": 1.2 * error,
        "flowrate_error_pct": 2.0 * error + 0.001 * seed,
        "flowrate_error_pct_std": 0.2 * error,
        "test_simulations": 4,
        "rollout_time_s_median": time_s,
        "rollout_time_s_min": 0.9 * time_s,
        "rollout_time_s_max": 1.1 * time_s,
        "rollout_time_repeats": 5,
        "parameters": 1234,
        "model_bytes": 1234 * bits // 8,
        "per_simulation": {"sim_000": {"pressure_error_pct": error}},
    }


def write_run(root: Path, seed: int, target: str, method: str, precision: str, **extra) -> Path:
    coordinates = {"dataset": "bloodflow", "model": "meshgraphnet", "seed": seed,
                   "target": target, "method": method, "precision": precision}  # fmt: skip
    folder = root / f"results/bloodflow/meshgraphnet/seed{seed}/{target}/{method}/{precision}"
    metrics = run_metrics(seed, target, method, precision) | extra
    payload = {
        "coordinates": coordinates,
        "study": "tiny",
        "settings_hashes": {"datasets.bloodflow": "da7a", "models.meshgraphnet": "0de1"}
        | ({} if (method, precision) == ("none", "fp32") else {"quantize": "9a27"}),
        "simulated": (target, precision) in SIMULATED,
        "metrics": metrics,
        "provenance": {"packages": {"sciquant": "0.1.0", "torch": "2.13.0"}, "python": "3.11.7",
                       "device": f"device of {target}", "host": "laptop", "threads": 2,
                       "git_revision": "abc123", "wall_time_s": 1.5},
    }  # fmt: skip
    return write_json(folder / "metrics.json", payload)


def write_study(root: Path) -> list[Path]:
    paths = []
    for seed in SEEDS:
        for target in FP32_TARGETS:
            paths.append(write_run(root, seed, target, "none", "fp32"))
        for target in TARGETS:
            for method in METHODS:
                for precision in PRECISIONS:
                    if (seed, target, method, precision) not in MISSING:
                        paths.append(write_run(root, seed, target, method, precision))
    return paths


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("study")
    paths = write_study(root)
    nc, csv = root / "results/summary/metrics.nc", root / "results/summary/metrics.csv"
    cube = aggregate(paths, nc, csv, {"study": "tiny", "config_hash": "c0ffee"})
    html = root / "results/report/index.html"
    build_report(nc, html, {"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2})
    return {"root": root, "paths": paths, "cube": cube, "nc": nc, "csv": csv, "html": html}


def metric_values(root: Path, name: str, target: str, method: str, precision: str) -> list[float]:
    """The metric of every seed's metrics.json of one (target, method, precision), as written."""
    values = []
    for seed in SEEDS:
        path = root / (f"results/bloodflow/meshgraphnet/seed{seed}/{target}/{method}/{precision}"
                       "/metrics.json")  # fmt: skip
        if path.is_file():
            values.append(json.loads(path.read_text())["metrics"][name])
    return values


class Tables(HTMLParser):
    """Every `<table>`: its attributes and rows, each row its attributes and (attrs, text) cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append({"attrs": dict(attrs), "rows": [], "head": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"attrs": dict(attrs), "cells": []})
        elif tag in ("td", "th") and self.tables:
            self.cell = []
            self.tables[-1]["rows"][-1]["cells"].append((tag, dict(attrs), self.cell))
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def parse(html: Path) -> Tables:
    parser = Tables()
    parser.feed(html.read_text(encoding="utf-8"))
    return parser


def table_of(html: Path, css_class: str) -> dict:
    """The page's one table of this class (`results`, `deploy`)."""
    (found,) = [t for t in parse(html).tables if t["attrs"].get("class") == css_class]
    return found


def cells(row: dict) -> dict[str, tuple[dict, str]]:
    """A body row's metric cells by `data-metric`: (attributes, text)."""
    return {
        attrs["data-metric"]: (attrs, "".join(text))
        for tag, attrs, text in row["cells"]
        if tag == "td" and "data-metric" in attrs
    }


def body_rows(table: dict) -> list[dict]:
    return [row for row in table["rows"] if "data-target" in row["attrs"]]


def test_cube_dims_and_coordinates_in_display_order(study: dict) -> None:
    cube = study["cube"]
    assert tuple(cube["simulated"].dims) == COORDINATES
    assert list(cube["seed"].values) == [0, 1]
    assert list(cube["target"].values) == ["reference", "cpu-x86", "npu-pow2"]
    assert list(cube["method"].values) == ["none", "ptq-minmax", "ptq-mse"]
    assert list(cube["precision"].values) == ["fp32", "w8a8", "w4a8"]


def test_every_scalar_metric_is_a_variable_and_tables_are_not(study: dict) -> None:
    cube = study["cube"]
    written = run_metrics(0, "cpu-x86", "ptq-minmax", "w8a8")
    scalars = {name for name, value in written.items() if not isinstance(value, dict)}
    assert set(cube.data_vars) == scalars | {"simulated"}
    assert cube["pressure_error_pct"].attrs["units"] == "%"
    assert cube["rollout_time_s_median"].attrs["units"] == "s"


def test_runs_not_made_are_nan_not_dropped(study: dict) -> None:
    cube = study["cube"].squeeze(["dataset", "model"])
    run = {"target": "npu-pow2", "method": "none", "precision": "fp32"}
    assert cube["pressure_error_pct"].sel(run).isnull().all()
    run = {"target": "cpu-x86", "method": "ptq-mse", "precision": "w4a8"}
    values = cube["pressure_error_pct"].sel(run).values
    assert not np.isnan(values[0]) and np.isnan(values[1])
    assert cube["simulated"].sel(run).values[0] == 1.0
    assert int(cube["simulated"].notnull().sum()) == len(study["paths"])


def test_cube_values_equal_the_metrics_files(study: dict) -> None:
    cube = study["cube"]
    for path in study["paths"]:
        payload = json.loads(path.read_text())
        run = dict(payload["coordinates"])
        for name, value in payload["metrics"].items():
            if not isinstance(value, dict):
                assert cube[name].sel(run).item() == value, (path, name)


def test_cube_round_trips_through_netcdf(study: dict) -> None:
    loaded = load_cube(study["nc"])
    xr.testing.assert_identical(loaded, study["cube"])


def test_provenance_is_kept_as_attributes(study: dict) -> None:
    attrs = load_cube(study["nc"]).attrs
    assert attrs["study"] == "tiny" and attrs["config_hash"] == "c0ffee"
    assert int(attrs["runs"]) == len(study["paths"])
    assert json.loads(attrs["packages"]) == {"sciquant": ["0.1.0"], "torch": ["2.13.0"]}
    assert json.loads(attrs["devices"])["npu-pow2"] == ["device of npu-pow2"]
    assert json.loads(attrs["git_revisions"]) == ["abc123"]
    assert json.loads(attrs["run_settings_hashes"]) == {
        "datasets.bloodflow": ["da7a"], "models.meshgraphnet": ["0de1"], "quantize": ["9a27"],
    }  # fmt: skip


def test_csv_has_one_row_per_run(study: dict) -> None:
    import pandas as pd

    table = pd.read_csv(study["csv"])
    assert len(table) == len(study["paths"])
    assert list(table.columns[:7]) == [*COORDINATES, "simulated"]
    row = table.query("target == 'cpu-x86' and method == 'ptq-mse' and precision == 'w8a8'")
    assert list(row["pressure_error_pct"]) == metric_values(
        study["root"], "pressure_error_pct", "cpu-x86", "ptq-mse", "w8a8"
    )


def test_metric_added_later_appears_without_code_changes(tmp_path: Path) -> None:
    paths = [
        write_run(tmp_path, 0, "reference", "none", "fp32"),
        write_run(tmp_path, 0, "cpu-x86", "ptq-mse", "w8a8", energy_mj=3.5, note="text"),
    ]
    cube = aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {"study": "tiny"})
    assert "energy_mj" in cube and "note" not in cube
    assert np.isnan(cube["energy_mj"].sel(target="reference").max())
    build_report(tmp_path / "m.nc", tmp_path / "index.html")
    assert 'data-metric="energy_mj"' in (tmp_path / "index.html").read_text()


def test_error_median_is_a_table_column_beside_the_mean_but_not_a_figure(tmp_path: Path) -> None:
    """The median over test simulations shows the typical tree where one bad tree carries the
    mean; it is a column, not a quality figure or a deploy criterion of its own."""
    paths = [
        write_run(tmp_path, 0, "reference", "none", "fp32", pressure_error_pct_median=0.5),
        write_run(tmp_path, 0, "cpu-x86", "ptq-mse", "w8a8", pressure_error_pct_median=0.7),
    ]
    cube = aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {"study": "tiny"})
    assert "pressure_error_pct_median" in headline_metrics(cube)
    assert "pressure_error_pct_median" not in quality_metrics(cube)
    assert "pressure_error_pct" in quality_metrics(cube)
    build_report(tmp_path / "m.nc", tmp_path / "index.html")
    assert 'data-metric="pressure_error_pct_median"' in (tmp_path / "index.html").read_text()


def test_baselines_reach_the_cube_and_the_report_but_are_not_runs(tmp_path: Path) -> None:
    """metrics.json `baselines` (e.g. the lumped model alone): one note per dataset, no row."""
    paths = [
        write_run(tmp_path, 0, "reference", "none", "fp32"),
        write_run(tmp_path, 0, "cpu-x86", "ptq-mse", "w8a8"),
    ]
    for path in paths:
        payload = json.loads(path.read_text())
        payload["baselines"] = {
            "lumped_model": {"pressure_error_pct": 0.6976, "flowrate_error_pct": 1.4539},
            "broken": "not a table",
        }
        path.write_text(json.dumps(payload))
    cube = aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {"study": "tiny"})
    assert json.loads(cube.attrs["baselines"]) == {
        "bloodflow": {"lumped_model": {"pressure_error_pct": 0.6976, "flowrate_error_pct": 1.4539}}
    }
    assert not any("lumped" in str(name) for name in cube.data_vars)
    build_report(tmp_path / "m.nc", tmp_path / "index.html")
    page = unescape((tmp_path / "index.html").read_text())
    assert "lumped tree's own response" in page
    assert "pressure error [%] 0.6976, flowrate error [%] 1.454" in page
    assert len(body_rows(table_of(tmp_path / "index.html", "results"))) == 2


def test_reaggregation_reads_rewritten_files_and_matches_a_fresh_one(tmp_path: Path) -> None:
    paths = write_study(tmp_path)
    nc, csv = tmp_path / "metrics.nc", tmp_path / "metrics.csv"
    first = aggregate(paths, nc, csv, {"study": "tiny"})
    assert cache_path(nc).is_file()
    payload = json.loads(paths[0].read_text())
    payload["metrics"]["pressure_error_pct"] = 99.0
    write_json(paths[0], payload)  # as a rerun of its evaluate stage would
    cached = aggregate(paths, nc, csv, {"study": "tiny"})
    fresh = aggregate(paths, tmp_path / "fresh.nc", tmp_path / "fresh.csv", {"study": "tiny"},
                      use_cache=False)  # fmt: skip
    xr.testing.assert_identical(cached, fresh)
    run = dict(payload["coordinates"])
    assert cached["pressure_error_pct"].sel(run).item() == 99.0
    assert first["pressure_error_pct"].sel(run).item() != 99.0


def test_two_files_for_one_run_is_an_error(tmp_path: Path) -> None:
    first = write_run(tmp_path, 0, "reference", "none", "fp32")
    second = tmp_path / "copy" / "metrics.json"
    second.parent.mkdir()
    shutil.copy(first, second)
    with pytest.raises(SciquantError, match="both hold the run"):
        aggregate([first, second], tmp_path / "m.nc", tmp_path / "m.csv", {})


def test_corrupt_metrics_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"coordinates": ')
    with pytest.raises(SciquantError, match=f"{path}: not valid JSON"):
        aggregate([path], tmp_path / "m.nc", tmp_path / "m.csv", {})


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.23456, "1.235"), (0.0123456, "0.01235"), (12345.6, "12346"), (4.0, "4"),
     (0.00012345, "1.234e-04"), (math.nan, "—")],
)  # fmt: skip
def test_format_value_shows_four_significant_digits(value: float, text: str) -> None:
    assert format_value(value) == text


def test_html_table_numbers_equal_the_metrics_files(study: dict) -> None:
    results = table_of(study["html"], "results")
    rows = body_rows(results)
    expected_rows = {
        (target, method, precision)
        for target, method, precision in [(t, "none", "fp32") for t in FP32_TARGETS]
        + [(t, m, p) for t in TARGETS for m in METHODS for p in PRECISIONS]
        if metric_values(study["root"], "parameters", target, method, precision)
    }
    keys = [tuple(row["attrs"][f"data-{k}"] for k in ("target", "method", "precision"))
            for row in rows]  # fmt: skip
    assert set(keys) == expected_rows and len(keys) == len(expected_rows)
    for key, row in zip(keys, rows, strict=True):
        shown = cells(row)
        for name in ("pressure_error_pct", "flowrate_error_pct", "rollout_time_s_median"):
            values = metric_values(study["root"], name, *key)
            attrs, text = shown[name]
            mean = float(np.mean(values))
            assert float(attrs["data-value"]) == pytest.approx(mean, rel=1e-12), (key, name)
            if len(values) == 1:
                assert text == format_value(values[0])
                assert "n=1" in "".join("".join(c[2]) for c in row["cells"])
            else:
                half_width = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1)
                half_width /= math.sqrt(len(values))
                assert float(attrs["data-ci"]) == pytest.approx(half_width, rel=1e-9)
                mean_text, ci_text = text.split(" ± ")
                assert mean_text == format_value(mean)
                assert ci_text == format_value(half_width, digits=2)
                assert float(mean_text) == pytest.approx(mean, rel=1e-3)


def test_speedups_are_the_paired_measurements_never_a_ratio_of_two_jobs(study: dict) -> None:
    results = table_of(study["html"], "results")
    rows = {tuple(r["attrs"][f"data-{k}"] for k in ("target", "method", "precision")): r
            for r in body_rows(results)}  # fmt: skip
    for key in (("cpu-x86", "ptq-minmax", "w8a8"), ("npu-pow2", "ptq-minmax", "w8a8"),
                ("cpu-x86", "none", "fp32")):  # fmt: skip
        expected = np.mean(metric_values(study["root"], "paired_step_speedup", *key))
        fp32 = metric_values(study["root"], "rollout_time_s_median", key[0], "none", "fp32")
        fp32 = fp32 or metric_values(study["root"], "rollout_time_s_median", "reference", "none",
                                     "fp32")  # fmt: skip
        times = metric_values(study["root"], "rollout_time_s_median", *key)
        attrs, text = cells(rows[key])["speedup"]
        assert float(attrs["data-value"]) == pytest.approx(expected, rel=1e-12)
        if key[1] != "none":
            assert expected != pytest.approx(np.mean(np.array(fp32) / np.array(times)), rel=0.01)
            seed0 = metric_values(study["root"], "paired_step_speedup_ci_low", *key)[0]
            assert f"[{format_value(seed0, 3)}," in text
        assert text.endswith("⚠ contended") == (key[0] == "npu-pow2")
    # Simulated runs were not timed: no speed-up at all, not one computed from other jobs.
    for key in (("cpu-x86", "ptq-minmax", "w4a8"), ("npu-pow2", "ptq-minmax", "w4a8")):
        if key in rows:
            assert cells(rows[key])["speedup"][0].get("data-value") in (None, "", "nan")


def test_simulated_precisions_are_marked(study: dict) -> None:
    results = table_of(study["html"], "results")
    for row in body_rows(results):
        attrs = row["attrs"]
        precision_text = "".join(row["cells"][2][2])
        simulated = (attrs["data-target"], attrs["data-precision"]) in SIMULATED
        assert precision_text == attrs["data-precision"] + ("*" if simulated else "")
    assert "* simulated:" in study["html"].read_text(encoding="utf-8")


def test_every_image_is_an_embedded_png(study: dict) -> None:
    images = parse(study["html"]).images
    assert len(images) >= 3  # pressure and flow errors vs precision, speed-ups, Pareto front
    for source in images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def hand_made_deploy_study(root: Path) -> list[Path]:
    """cpu-x86: FP32 error 1.0 in 10 ms; w8a8 minmax 1.1 in 5 ms, paired 2.5x faster than
    FP32, mse 1.15 in 4 ms (a job that met a lighter load) but paired only 2.2x; w4a8 is faster
    and accurate but simulated; w6a8 is fast but over budget."""
    runs = [
        ("none", "fp32", 1.0, 0.010, 1.0, False), ("ptq-minmax", "w8a8", 1.1, 0.005, 2.5, False),
        ("ptq-mse", "w8a8", 1.15, 0.004, 2.2, False), ("ptq-mse", "w4a8", 1.05, 0.001, 9, True),
        ("ptq-minmax", "w6a8", 1.5, 0.002, 4.0, False),
    ]  # fmt: skip
    paths = []
    for method, precision, error, time_s, speedup, simulated in runs:
        path = write_run(root, 0, "cpu-x86", method, precision,
                         pressure_error_pct=error, rollout_time_s_median=time_s,
                         paired_step_speedup=speedup)  # fmt: skip
        payload = json.loads(path.read_text()) | {"simulated": simulated}
        paths.append(write_json(path, payload))
    return paths


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2}, ("ptq-minmax", "w8a8")),
        ({"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.12}, ("ptq-minmax", "w8a8")),
        ([{"metric": "pressure_error_pct", "max_value": 2.0},
          {"metric": "flowrate_error_pct", "max_ratio_to_fp32": 1.0}], ("none", "fp32")),
        ({"metric": "pressure_error_pct", "max_value": 0.5}, (None, None)),
    ],
)  # fmt: skip
def test_what_to_deploy_is_the_fastest_within_budget(
    tmp_path: Path, budget: dict, expected: tuple
) -> None:
    paths = hand_made_deploy_study(tmp_path)
    aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {"study": "deploy"})
    ((_, _, runs),) = workload_slices(load_cube(tmp_path / "m.nc"))
    (choice,) = choose_deployments(runs, parse_budget(budget))
    assert (choice.method, choice.precision) == expected


@pytest.mark.parametrize("speedup", [1.8, 0.6])
def test_a_budget_scales_by_the_fp32_run_of_the_targets_graph(
    tmp_path: Path, speedup: float
) -> None:
    """openvino-avx2 has no FP32 run of its own: its budget is scaled by openvino-cpu's FP32
    (the graph it runs), not by the reference's, which would exclude its W8A8 here; and that
    FP32 run is its FP32 candidate, chosen where its INT8 is slower."""
    runs = [("reference", "none", "fp32", 0.5, 1.0), ("openvino-cpu", "none", "fp32", 1.0, 1.0),
            ("openvino-avx2", "ptq-mse", "w8a8", 1.15, speedup)]  # fmt: skip
    paths = []
    for target, method, precision, error, speedup in runs:
        made = write_run(tmp_path / "made", 0, "cpu-x86", method, precision,
                         pressure_error_pct=error, rollout_time_s_median=0.01 / speedup,
                         paired_step_speedup=speedup)  # fmt: skip
        payload = json.loads(made.read_text()) | {"simulated": False}
        payload["coordinates"]["target"] = target
        folder = tmp_path / f"results/bloodflow/meshgraphnet/seed0/{target}/{method}/{precision}"
        paths.append(write_json(folder / "metrics.json", payload))
    aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {"study": "deploy"})
    ((_, _, cube),) = workload_slices(load_cube(tmp_path / "m.nc"))
    budget = parse_budget({"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2})
    choices = {c.target: c for c in choose_deployments(cube, budget)}
    avx2 = choices["openvino-avx2"]
    (check,) = avx2.checks
    assert check.threshold == pytest.approx(1.2)
    if speedup > 1:
        assert (avx2.method, avx2.precision, check.value) == ("ptq-mse", "w8a8", 1.15)
    else:
        assert (avx2.method, avx2.precision, check.value) == ("none", "fp32", 1.0)
        assert "openvino-cpu's FP32 run" in avx2.reason
    # its w8a8 stores 7-bit weights: the results table says so, and of no other row
    build_report(tmp_path / "m.nc", tmp_path / "index.html")
    html = (tmp_path / "index.html").read_text()
    assert html.count('class="note capped-bits-note"') == 1
    assert "openvino-avx2 · ptq-mse · w8a8: weights in 7 bits" in html


def test_capped_bits_note_names_the_rows_with_fewer_weight_bits() -> None:
    """openvino-avx2 stores 7-bit weights: its w8a8 and the 8-bit layers of its mixed run are
    named; its w4a8, other targets and float runs are not."""
    note = capped_bits_note([
        ("openvino-avx2", "ptq-mse", "w8a8"), ("openvino-avx2", "ptq-mse", "w4a8"),
        ("openvino-avx2", "ptq-mse", "mixed"), ("openvino-cpu", "ptq-mse", "w8a8"),
        ("openvino-cpu", "ptq-mse", "mixed"), ("openvino-cpu", "none", "fp32"),
        ("unknown-plugin", "ptq-mse", "w8a8"),
    ])  # fmt: skip
    assert re.sub("<[^>]+>", "", note).endswith(
        "openvino-avx2 · ptq-mse · w8a8: weights in 7 bits; "
        "openvino-avx2 · ptq-mse · mixed: 8-bit layers in 7 bits."
    )
    assert capped_bits_note([("openvino-cpu", "ptq-mse", "w8a8")]) == ""


def test_report_shows_the_deploy_choice_and_its_checks(tmp_path: Path) -> None:
    paths = hand_made_deploy_study(tmp_path)
    aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {"study": "deploy"})
    budget = {"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2}
    build_report(tmp_path / "m.nc", tmp_path / "index.html", budget)
    (row,) = body_rows(table_of(tmp_path / "index.html", "deploy"))
    assert (row["attrs"]["data-method"], row["attrs"]["data-precision"]) == ("ptq-minmax", "w8a8")
    texts = ["".join(cell[2]) for cell in row["cells"]]
    assert "pressure error [%] 1.100 ≤ 1.200" in texts
    assert cells(row)["speedup"][1] == format_value(2.5)


def test_deploy_choice_without_timings_takes_fewest_bits(tmp_path: Path) -> None:
    paths = hand_made_deploy_study(tmp_path)
    for path in paths:
        payload = json.loads(path.read_text())
        del payload["metrics"]["rollout_time_s_median"]
        for name in ("paired_step_speedup", "paired_speedup"):
            payload["metrics"].pop(name, None)
        write_json(path, payload)
    aggregate(paths, tmp_path / "m.nc", tmp_path / "m.csv", {})
    ((_, _, runs),) = workload_slices(load_cube(tmp_path / "m.nc"))
    budget = parse_budget({"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2})
    (choice,) = choose_deployments(runs, budget)
    assert choice.precision == "w8a8" and "no timings" in choice.reason


@pytest.mark.parametrize(
    "budget",
    [{"max_ratio_to_fp32": 1.2}, {"metric": "pressure_error_pct"},
     {"metric": "pressure_error_pct", "max_ratio": 1.2},
     {"metric": "pressure_error_pct", "max_value": "1.2"}],
)  # fmt: skip
def test_malformed_budget_is_an_error(budget: dict) -> None:
    with pytest.raises(SciquantError, match="error budget"):
        parse_budget(budget)


def test_extra_figures_are_embedded_and_absent_ones_skipped(study: dict, tmp_path: Path) -> None:
    rollout = tmp_path / "pressure.png"
    rollout.write_bytes(base64.b64decode(parse(study["html"]).images[0].split(",", 1)[1]))
    sensitivity = tmp_path / "sensitivity.csv"
    sensitivity.write_text("layer,w8,w4\nencoder.0,0.01,0.2\nprocessor.0,0.02,0.5\n")
    section = extra_figures_section(
        [rollout, tmp_path / "absent.png"], [sensitivity, tmp_path / "absent.csv"], tmp_path
    )
    assert section.count("<img ") == 2
    assert "<figcaption>pressure.png</figcaption>" in section
    assert extra_figures_section([tmp_path / "absent.png"], [], tmp_path) == ""


PROBE = """<script>
window.addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: [...document.images].map((img) => img.complete && img.naturalWidth > 0),
    tableRows: [...document.querySelectorAll("table")].map((t) => t.tBodies[0].rows.length),
    pageWidth: document.documentElement.scrollWidth,
    viewportWidth: window.innerWidth,
  });
  document.body.appendChild(probe);
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [
        shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not installed (scripts/install-chromium.sh installs it)",
)
@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 900)])
def test_report_renders_in_a_browser(study: dict, tmp_path: Path, width: int, height: int) -> None:
    page = tmp_path / "index.html"
    page.write_text(
        study["html"].read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
        encoding="utf-8",
    )
    size = f"--window-size={width},{height}"
    result = chromium(size, "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
                      profile=tmp_path / "profile")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    marker = '<pre id="probe">'
    assert marker in result.stdout, "the page's load handler did not run:\n" + result.stderr[-2000:]
    probe = json.loads(unescape(result.stdout.split(marker, 1)[1].split("</pre>", 1)[0]))
    assert probe["images"] and all(probe["images"]), probe["images"]
    assert probe["tableRows"] and all(rows > 0 for rows in probe["tableRows"]), probe
    # Wide tables scroll inside their box; the page itself never scrolls sideways.
    assert probe["pageWidth"] <= probe["viewportWidth"], probe
    screenshot = tmp_path / "page.png"
    result = chromium(size, f"--screenshot={screenshot}", page.as_uri(),
                      profile=tmp_path / "profile")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cache_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    """A metrics.json rewritten with as many bytes and its mtime put back (a coarse file system,
    or a tool that restores times) is read again, not taken from the cache."""
    import os

    path = write_run(tmp_path, 0, "cpu-x86", "none", "fp32", pressure_error_pct=1.5)
    nc, csv = tmp_path / "m.nc", tmp_path / "m.csv"
    aggregate([path], nc, csv, {"study": "cache"})
    before = path.stat()
    write_run(tmp_path, 0, "cpu-x86", "none", "fp32", pressure_error_pct=2.5)  # same length
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    cube = aggregate([path], nc, csv, {"study": "cache"})
    value = cube["pressure_error_pct"].sel(
        {"target": "cpu-x86", "method": "none", "precision": "fp32"}
    )
    assert float(value.squeeze()) == 2.5
