"""A run whose errors came out NaN or infinite: valid JSON, counted in the cube, shown as diverged.

A diverged run must never look like a run that was not made: metrics.json stays valid JSON (the
non-finite numbers become null and are listed in `non_finite`), the cube counts the diverged
quality metrics of each run (`diverged`), and the report marks the run's row and counts such
runs in the table's notes.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sciquant.provenance import write_json
from sciquant.report.cube import (
    aggregate,
    choose_deployments,
    load_cube,
    parse_budget,
    workload_slices,
)
from sciquant.report.html import build_report

BUDGET = {"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.5}


def strict_json(text: str) -> dict:
    """Parse JSON as the standard defines it: `NaN`, `Infinity` and `-Infinity` are errors."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def payload(seed: int, target: str, method: str, precision: str, **metrics) -> dict:
    coordinates = {"dataset": "bloodflow", "model": "meshgraphnet", "seed": seed,
                   "target": target, "method": method, "precision": precision}  # fmt: skip
    values = {
        "pressure_error_pct": 1.0 + 0.1 * (precision != "fp32"),
        "pressure_error_pct_std": 0.1,
        "flowrate_error_pct": 2.0,
        "rollout_time_s_median": 0.01,
        "paired_step_speedup": 1.0 if precision == "fp32" else 2.0,
        "paired_step_speedup_ci_low": math.nan,  # one timing pair: no interval, not a divergence
        "paired_step_speedup_ci_high": math.nan,
        "per_simulation": {"sim_000": {"pressure_error_pct": 1.0, "flowrate_error_pct": 2.0}},
    } | metrics
    return {"coordinates": coordinates, "study": "diverged", "config_hash": "c0ffee",
            "simulated": False, "metrics": values, "provenance": {"wall_time_s": 1.0}}  # fmt: skip


def run_path(root: Path, seed: int, target: str, method: str, precision: str) -> Path:
    return root / f"results/bloodflow/meshgraphnet/seed{seed}/{target}/{method}/{precision}/m.json"


def write_study(root: Path) -> list[Path]:
    """cpu-x86: FP32 in both seeds; ptq-minmax w8a8 (3× FP32's speed) fine in seed 0, diverged
    (pressure NaN, flow +inf) in seed 1; ptq-mse w8a8 diverged in both seeds; ptq-mse w4a8 (2×)
    fine in seed 0, not made in seed 1."""
    nan, inf = math.nan, math.inf
    runs = [
        payload(0, "cpu-x86", "none", "fp32"),
        payload(1, "cpu-x86", "none", "fp32"),
        payload(0, "cpu-x86", "ptq-minmax", "w8a8", paired_step_speedup=3.0),
        payload(1, "cpu-x86", "ptq-minmax", "w8a8", paired_step_speedup=3.0, pressure_error_pct=nan,
                pressure_error_pct_std=nan, flowrate_error_pct=inf,
                per_simulation={"sim_000": {"pressure_error_pct": nan, "flowrate_error_pct": inf}}),
        payload(0, "cpu-x86", "ptq-mse", "w8a8", pressure_error_pct=nan, flowrate_error_pct=nan),
        payload(1, "cpu-x86", "ptq-mse", "w8a8", pressure_error_pct=-inf, flowrate_error_pct=nan),
        payload(0, "cpu-x86", "ptq-mse", "w4a8"),
    ]  # fmt: skip
    return [
        write_json(run_path(root, *(run["coordinates"][k] for k in
                                    ("seed", "target", "method", "precision"))), run)
        for run in runs
    ]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("diverged")
    paths = write_study(root)
    nc, csv = root / "summary/metrics.nc", root / "summary/metrics.csv"
    aggregate(paths, nc, csv, {"study": "diverged"})
    html = root / "report/index.html"
    build_report(nc, html, BUDGET)
    return {"root": root, "paths": paths, "nc": nc, "csv": csv, "html": html}


def test_non_finite_numbers_are_written_as_valid_json_and_listed(tmp_path: Path) -> None:
    original = payload(1, "cpu-x86", "ptq-minmax", "w8a8", pressure_error_pct=math.nan,
                       flowrate_error_pct=math.inf, **{"odd/name~": -math.inf})  # fmt: skip
    original["metrics"]["per_simulation"]["sim_000"]["flowrate_error_pct"] = math.inf
    path = write_json(tmp_path / "metrics.json", original)
    written = strict_json(path.read_text())
    assert written["metrics"]["pressure_error_pct"] is None
    assert written["metrics"]["flowrate_error_pct"] is None
    assert written["metrics"]["per_simulation"]["sim_000"]["flowrate_error_pct"] is None
    assert written["non_finite"] == {
        "/metrics/pressure_error_pct": "nan",
        "/metrics/flowrate_error_pct": "inf",
        "/metrics/paired_step_speedup_ci_low": "nan",
        "/metrics/paired_step_speedup_ci_high": "nan",
        "/metrics/odd~1name~0": "-inf",  # JSON Pointer escapes (RFC 6901)
        "/metrics/per_simulation/sim_000/flowrate_error_pct": "inf",
    }
    assert math.isnan(original["metrics"]["pressure_error_pct"])  # the caller's dict is unchanged
    assert "non_finite" not in original


def test_finite_payload_is_written_as_before(tmp_path: Path) -> None:
    finite = {"metrics": {"a": 1.5, "b": [1, 2.0]}, "name": "x"}
    path = write_json(tmp_path / "finite.json", finite)
    assert strict_json(path.read_text()) == finite


def test_the_cube_counts_each_runs_diverged_quality_metrics(study: dict) -> None:
    cube = load_cube(study["nc"]).squeeze(["dataset", "model"])
    diverged = cube["diverged"]

    def count(seed: int | None, method: str, precision: str) -> list[float]:
        run = {"target": "cpu-x86", "method": method, "precision": precision}
        return list(diverged.sel(run if seed is None else run | {"seed": seed}).values.flat)

    assert count(1, "ptq-minmax", "w8a8") == [2]  # pressure NaN, flow +inf (not the NaN std)
    assert count(0, "ptq-minmax", "w8a8") == [0]
    assert count(None, "ptq-mse", "w8a8") == [2, 2]
    assert count(None, "none", "fp32") == [0, 0]  # NaN timing intervals are not a divergence
    # A run that was not made stays NaN: it is missing, not diverged.
    assert np.isnan(count(1, "ptq-mse", "w4a8")[0])
    # The diverged values themselves are NaN (never ±∞) so they cannot poison a mean.
    run = {"seed": 1, "target": "cpu-x86", "method": "ptq-minmax", "precision": "w8a8"}
    assert np.isnan(cube["flowrate_error_pct"].sel(run))
    run = {"seed": 1, "target": "cpu-x86", "method": "ptq-mse", "precision": "w8a8"}
    assert np.isnan(cube["pressure_error_pct"].sel(run))


def test_the_csv_has_the_diverged_count(study: dict) -> None:
    table = pd.read_csv(study["csv"])
    row = table.query("seed == 1 and method == 'ptq-minmax' and precision == 'w8a8'")
    assert list(row["diverged"]) == [2]
    assert list(table.query("method == 'none'")["diverged"]) == [0, 0]


def test_a_file_with_bare_nan_from_an_older_writer_counts_as_diverged(tmp_path: Path) -> None:
    fine = write_json(run_path(tmp_path, 0, "cpu-x86", "none", "fp32"),
                      payload(0, "cpu-x86", "none", "fp32"))  # fmt: skip
    old = run_path(tmp_path, 0, "cpu-x86", "ptq-mse", "w8a8")
    old.parent.mkdir(parents=True)
    old.write_text(
        json.dumps(payload(0, "cpu-x86", "ptq-mse", "w8a8", flowrate_error_pct=math.nan))
    )
    assert "NaN" in old.read_text()
    cube = aggregate([fine, old], tmp_path / "m.nc", tmp_path / "m.csv", {})
    run = {"seed": 0, "target": "cpu-x86", "method": "ptq-mse", "precision": "w8a8"}
    assert cube["diverged"].sel(run).item() == 1


class Rows(HTMLParser):
    """The results table's body rows: attributes, cells' (attributes, text); and the notes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.in_results = False
        self.cell: list[str] | None = None
        self.note: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "table":
            self.in_results = attrs.get("class") == "results"
        elif tag == "tr" and self.in_results and "data-target" in attrs:
            self.rows.append({"attrs": attrs, "cells": []})
        elif tag == "td" and self.in_results and self.rows:
            self.cell = []
            self.rows[-1]["cells"].append((attrs, self.cell))
        elif tag == "p" and "note" in (attrs.get("class") or "").split():
            self.note = []
            self.notes.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_results = False
        elif tag == "td":
            self.cell = None
        elif tag == "p" and self.note is not None:
            self.notes[-1] = "".join(self.note)
            self.note = None

    def handle_data(self, data: str) -> None:
        for sink in (self.cell, self.note):
            if sink is not None:
                sink.append(data)


def parsed(html: Path) -> Rows:
    rows = Rows()
    rows.feed(html.read_text(encoding="utf-8"))
    return rows


def row_of(rows: Rows, method: str, precision: str) -> dict:
    (found,) = [
        r
        for r in rows.rows
        if (r["attrs"]["data-method"], r["attrs"]["data-precision"]) == (method, precision)
    ]
    return found


def metric_cell(row: dict, name: str) -> tuple[dict, str]:
    (found,) = [(a, "".join(t)) for a, t in row["cells"] if a.get("data-metric") == name]
    return found


def test_report_marks_a_run_diverged_in_every_seed_never_as_missing(study: dict) -> None:
    rows = parsed(study["html"])
    row = row_of(rows, "ptq-mse", "w8a8")
    assert "diverged" in row["attrs"]["class"].split()
    assert row["attrs"]["data-diverged"] == "2"  # both seeds
    assert any(
        "diverged" in "".join(text) for attrs, text in row["cells"] if "data-metric" not in attrs
    )
    attrs, text = metric_cell(row, "pressure_error_pct")
    assert "diverged" in text and "—" not in text
    assert "data-value" not in attrs and attrs["data-diverged"] == "2"


def test_report_marks_a_run_diverged_in_one_seed(study: dict) -> None:
    rows = parsed(study["html"])
    row = row_of(rows, "ptq-minmax", "w8a8")
    assert "diverged" in row["attrs"]["class"].split()
    assert row["attrs"]["data-diverged"] == "1"
    attrs, text = metric_cell(row, "flowrate_error_pct")
    assert float(attrs["data-value"]) == 2.0 and attrs["data-n"] == "1"  # seed 0 alone
    assert attrs["data-diverged"] == "1" and "diverged" in text
    # A metric that did not diverge carries no mark.
    attrs, text = metric_cell(row, "rollout_time_s_median")
    assert "data-diverged" not in attrs and "diverged" not in text


def test_report_leaves_fine_and_missing_runs_unmarked(study: dict) -> None:
    rows = parsed(study["html"])
    for method, precision in (("none", "fp32"), ("ptq-mse", "w4a8")):
        row = row_of(rows, method, precision)
        assert "diverged" not in row["attrs"]["class"].split()
        assert "data-diverged" not in row["attrs"]
        assert not any("diverged" in "".join(text) for _, text in row["cells"])


def test_report_counts_diverged_runs_in_the_notes(study: dict) -> None:
    notes = [note for note in parsed(study["html"]).notes if "diverged" in note]
    assert len(notes) == 1
    assert "3 runs" in notes[0] and "NaN or infinite" in notes[0]


def test_a_configuration_that_diverged_in_a_seed_is_never_deployed(study: dict) -> None:
    ((_, _, runs),) = workload_slices(load_cube(study["nc"]))
    (choice,) = choose_deployments(runs, parse_budget(BUDGET))
    # ptq-minmax w8a8 is the fastest and within budget in seed 0, but diverged in seed 1.
    assert (choice.method, choice.precision) == ("ptq-mse", "w4a8")
