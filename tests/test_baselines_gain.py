"""The no-network baselines, the physics checks and the retained gain, by hand on small cases."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from sciquant.errors import SciquantError
from sciquant.report.gain import retained_gain, run_gains, significant_gain
from sciquant.workloads.bloodflow.data import BRANCH, INLET, JUNCTION, OUTLET
from sciquant.workloads.bloodflow.physics import baseline_errors, physics_checks


def y_sample() -> dict[str, np.ndarray]:
    """inlet 0 → 1 → junction 2 → daughters 3 → 4 (outlet) and 5 → 6 (outlet); 3 steps."""
    node_type = np.array([INLET, BRANCH, JUNCTION, BRANCH, OUTLET, BRANCH, OUTLET])
    tree = [(0, 1, 0), (1, 2, 1), (2, 3, 1), (3, 4, 0), (2, 5, 1), (5, 6, 0)]
    edges = [(a, b, t) for a, b, t in tree] + [(b, a, t) for a, b, t in tree]
    edges.append((0, 2, 3))  # a boundary edge: not part of the tree
    edges.append((2, 0, 3))
    edge_features = np.zeros((len(edges), 9))
    edge_features[np.arange(len(edges)), 4 + np.array([t for _, _, t in edges])] = 1
    flow = np.array(
        [
            [10.0, 10.0, 10.0, 6.0, 6.0, 4.0, 4.0],
            [12.0, 12.0, 12.0, 7.0, 7.0, 4.0, 4.0],  # junction off by 1 cm³/s
            [8.0, 8.0, 8.0, 5.0, 5.0, 3.0, 3.0],
        ]
    )
    r1 = np.array([0, 0, 0, 0, 100.0, 0, 200.0])
    r2 = np.array([0, 0, 0, 0, 900.0, 0, 1800.0])
    # Outlet 4: mean flow 6, p̄ = 6·1000 exactly; outlet 6: mean flow 11/3, p̄ 10 % above.
    pressure = np.full((3, 7), 9000.0)
    pressure[:, 4] = 6000.0
    pressure[:, 6] = 1.1 * (11 / 3) * 2000.0
    return {
        "node_type": node_type,
        "edge_index": np.array([[a for a, _, _ in edges], [b for _, b, _ in edges]]),
        "edge_features": edge_features,
        "source_points": np.array([0, 5, 9, 12, 20, 25, 30]),
        "loading": np.zeros(3),
        "pressure": pressure,
        "flowrate": flow,
        "R1": r1,
        "R2": r2,
    }


def test_physics_checks_by_hand() -> None:
    sample = y_sample()
    checks = physics_checks(sample, sample["pressure"], sample["flowrate"])
    # |q_J − Σ q_d| = 0, 1, 0 over a mean inflow of 10: mean 1/3 %, max 10 %... in % of 10.
    assert checks["junction_mass_residual_pct"] == pytest.approx(100 * (1 / 3) / 10)
    assert checks["junction_mass_residual_pct_max"] == pytest.approx(10.0)
    assert checks["outlet_resistance_residual_pct"] == pytest.approx(100 * (0 + 0.1 / 1.1) / 2)
    assert checks["outlet_resistance_residual_pct_max"] == pytest.approx(100 * 0.1 / 1.1)


def test_baseline_errors_by_hand() -> None:
    sample = y_sample()
    sample["loading"] = np.array([1.0, 0.0, 0.0])  # the first step is a loading step
    sample["lumped_pressure"] = sample["pressure"] * 1.02
    sample["lumped_flowrate"] = sample["flowrate"].copy()
    sample["lumped_flowrate"][:, 1] += 1.0
    errors = baseline_errors(sample, "lumped_model")
    assert errors["pressure_error_pct"] == pytest.approx(2.0)
    branch = sample["node_type"] == BRANCH
    exact = sample["flowrate"][1:][:, branch]
    expected = 100 * math.sqrt(2 * 1.0**2) / np.linalg.norm(exact)
    assert errors["flowrate_error_pct"] == pytest.approx(expected)


def test_retained_gain_by_hand() -> None:
    baseline, fp32 = [4.0, 6.0, 5.0], [1.0, 2.0, 3.0]
    quantized = [2.0, 3.0, 4.0]  # keeps (15 − 9) / (15 − 6) = 2/3 of the gain
    value, low, high = retained_gain(baseline, fp32, quantized, resamples=4000)
    assert value == pytest.approx(100 * 2 / 3)
    assert low <= value <= high
    # Each resample's ratio is a mean of the same draws: the interval stays inside the range
    # of per-simulation ratios.
    assert low >= 100 * min(2 / 3, 3 / 4, 1 / 2) - 1e-9 and high <= 100 * 3 / 4 + 1e-9
    assert retained_gain(baseline, fp32, fp32)[0] == pytest.approx(100.0)
    assert retained_gain(baseline, fp32, baseline)[0] == pytest.approx(0.0)
    worse = retained_gain(baseline, fp32, [5.0, 7.0, 6.0])[0]
    assert worse == pytest.approx(-100 * 3 / 9)
    assert all(math.isnan(v) for v in retained_gain(fp32, baseline, fp32))  # no gain to keep
    # A gain the test set cannot tell from zero has no share to retain either.
    noisy = [3.0, 5.0, 3.9, 4.3]
    assert not significant_gain([4.0] * 4, noisy)
    assert all(math.isnan(v) for v in retained_gain([4.0] * 4, noisy, noisy))


def test_run_gains_pairs_simulations_by_name() -> None:
    baseline = {"a": {"pressure_error_pct": 4.0}, "b": {"pressure_error_pct": 6.0}}
    fp32 = {"b": {"pressure_error_pct": 2.0}, "a": {"pressure_error_pct": 1.0}}
    quantized = {"a": {"pressure_error_pct": 2.0}, "b": {"pressure_error_pct": 4.0}}
    gains = run_gains(baseline, fp32, quantized)
    assert gains["retained_gain_pressure_pct"] == pytest.approx(100 * 4 / 7)
    assert "retained_gain_flowrate_pct" not in gains


def test_cube_adds_retained_gain_to_quantized_runs_only() -> None:
    from sciquant.report.cube import RunRecord, with_retained_gain

    def record(target: str, method: str, precision: str, errors: list[float]) -> RunRecord:
        per_simulation = {f"s{i}": {"pressure_error_pct": e} for i, e in enumerate(errors)}
        baseline = {f"s{i}": {"pressure_error_pct": 4.0} for i in range(len(errors))}
        return RunRecord(
            path="x", coordinates=("flow", "mgn", 0, target, method, precision),
            simulated=False, metrics={}, study=None, settings_hashes={}, provenance={},
            per_simulation=per_simulation,
            baseline_per_simulation={"calibrated_model": baseline},
        )  # fmt: skip

    fp32 = record("reference", "none", "fp32", [1.0, 2.0])
    quantized = record("cpu-x86", "ptq-mse", "w8a8", [2.5, 2.5])
    updated = with_retained_gain([fp32, quantized])
    assert "retained_gain_pressure_pct" not in updated[0].metrics
    assert updated[0].metrics["network_gain_pressure_pct"] == pytest.approx(2.5)
    assert 0 < updated[0].metrics["network_gain_pressure_pct_ci_low"] <= 2.5
    # (8 − 5) / (8 − 3) of the gain kept
    assert updated[1].metrics["retained_gain_pressure_pct"] == pytest.approx(60.0)


def test_report_says_when_the_network_has_no_gain() -> None:
    import xarray as xr

    from sciquant.report.html import no_gain_note

    coords = {"seed": [0], "target": ["reference"], "method": ["none"], "precision": ["fp32"]}
    runs = xr.Dataset(
        {
            "pressure_error_pct": (tuple(coords), np.full((1, 1, 1, 1), 3.0)),
            "flowrate_error_pct": (tuple(coords), np.full((1, 1, 1, 1), 9.0)),
        },
        coords=coords,
    )
    note = no_gain_note({"pressure_error_pct": 4.0, "flowrate_error_pct": 8.0}, runs)
    assert "does not beat" in note and "flowrate" in note and "pressure error" not in note
    assert no_gain_note({"pressure_error_pct": 4.0}, runs) == ""
    # Better on average, but not beyond the test set's noise: flagged too.
    runs["network_gain_pressure_pct_ci_low"] = (tuple(coords), np.full((1, 1, 1, 1), -0.1))
    assert "pressure error" in no_gain_note({"pressure_error_pct": 4.0}, runs)


def test_report_says_when_the_gains_baseline_is_the_weaker_one() -> None:
    from sciquant.report.html import weaker_baseline_note

    baselines = {
        "lumped_model": {"pressure_error_pct": 3.94, "flowrate_error_pct": 8.83},
        "calibrated_model": {"pressure_error_pct": 4.20, "flowrate_error_pct": 8.00},
    }
    note = weaker_baseline_note(baselines)
    assert "errs more than another baseline" in note
    assert "pressure error [%]: 4.200 against 3.940 for the lumped tree" in note
    assert "8.830" not in note  # on flow the calibrated prior is the better one
    # With the runs: the FP32 network beside the best baseline, flagged where it does not beat it.
    import xarray as xr

    coords = {"seed": [0], "target": ["reference"], "method": ["none"], "precision": ["fp32"]}
    runs = xr.Dataset(
        {"pressure_error_pct": (tuple(coords), np.full((1, 1, 1, 1), 3.05))}, coords=coords
    )
    baselines["expansion_calibrated_model"] = {"pressure_error_pct": 3.2}
    note = weaker_baseline_note(baselines, runs=runs)
    assert "FP32 network 3.050 against 3.200 (×0.95)" in note and "✗" not in note
    runs["pressure_error_pct"][:] = 3.3
    note = weaker_baseline_note(baselines, runs=runs)
    assert "✗ pressure error [%]: FP32 network 3.300 against 3.200 (×1.03)" in note
    assert "does not beat it" in note
    del baselines["expansion_calibrated_model"]
    baselines["lumped_model"]["pressure_error_pct"] = 4.5
    assert weaker_baseline_note(baselines) == ""
    assert weaker_baseline_note(baselines, runs=runs) == ""
    assert weaker_baseline_note({"calibrated_model": {"pressure_error_pct": 1.0}}) == ""


def test_retained_gain_of_any_error_a_workload_gives() -> None:
    from sciquant.report.gain import field_name, network_gains

    assert field_name("pressure_error_pct") == "pressure" and field_name("rmse") == "rmse"
    assert field_name("rollout_error_pct") == "rollout"
    # a plug-in's per-trajectory errors, named as its metrics: 10 trajectories
    baseline = {f"sample_{i}": {"rollout_error_pct": 10.0 + i % 3, "rmse": 2.0} for i in range(10)}
    fp32 = {name: {"rollout_error_pct": 2.0 + i % 2, "rmse": 1.0}
            for i, name in enumerate(baseline)}  # fmt: skip
    quantized = {name: {"rollout_error_pct": 4.0 + i % 2, "rmse": 1.5}
                 for i, name in enumerate(baseline)}  # fmt: skip
    b = np.array([v["rollout_error_pct"] for v in baseline.values()])
    f = np.array([v["rollout_error_pct"] for v in fp32.values()])
    q = np.array([v["rollout_error_pct"] for v in quantized.values()])
    gains = run_gains(baseline, fp32, quantized)
    assert gains["retained_gain_rollout_pct"] == pytest.approx(
        100 * (b - q).mean() / (b - f).mean()
    )
    assert gains["retained_gain_rmse_pct"] == pytest.approx(50.0)  # (2 − 1.5) / (2 − 1)
    assert network_gains(baseline, fp32)["network_gain_rollout_pct"] == pytest.approx(
        (b - f).mean()
    )
    # a key not every table has is not a field
    fp32["sample_3"] = {"rollout_error_pct": 2.0}
    assert "retained_gain_rmse_pct" not in run_gains(baseline, fp32, quantized)


def test_report_names_a_plugins_gain_baseline() -> None:
    import xarray as xr

    from sciquant.report.html import no_gain_note

    coords = {"seed": [0], "target": ["reference"], "method": ["none"], "precision": ["fp32"]}
    runs = xr.Dataset(
        {
            "rollout_error_pct": (tuple(coords), np.full((1, 1, 1, 1), 3.0)),
            "network_gain_rollout_pct_ci_low": (tuple(coords), np.full((1, 1, 1, 1), -0.2)),
        },
        coords=coords,
    )
    note = no_gain_note({"rollout_error_pct": 3.5}, runs, "euler")
    assert "does not beat the euler baseline" in note and "rollout error" in note
    assert "calibrated prior" not in note


def test_report_sets_training_errors_beside_test_errors() -> None:
    import json

    import xarray as xr

    from sciquant.report.html import training_note

    coords = {"seed": [0], "target": ["reference"], "method": ["none"], "precision": ["fp32"]}

    def runs(**values: float) -> xr.Dataset:
        data = {k: (tuple(coords), np.full((1, 1, 1, 1), v)) for k, v in values.items()}
        cube = xr.Dataset(data, coords=coords)
        prior = {"calibrated_model": {"pressure_error_pct": 2.0, "flowrate_error_pct": 6.0}}
        cube.attrs["baselines"] = json.dumps({"flow": prior})
        return cube

    measured = dict(
        training_simulations=45, training_pressure_error_pct=0.8,
        training_flowrate_error_pct=2.8, training_calibrated_pressure_error_pct=2.6,
        training_calibrated_flowrate_error_pct=6.2, pressure_error_pct=1.9,
        flowrate_error_pct=6.6,
    )  # fmt: skip
    note = training_note("flow", runs(**measured))
    assert "on 45 of its training simulations" in note
    # pressure: ×0.31 on training trees, ×0.95 on test trees; flow: ×0.45 and ×1.10
    assert "(×0.31)" in note and "(×0.95)" in note and "(×0.45)" in note and "(×1.10)" in note
    assert "✗ On flow the network beats" in note  # fitted on flow only (test ratio ≥ 1)
    assert "✗" not in training_note("flow", runs(**{**measured, "flowrate_error_pct": 5.0}))
    # not measured (a study that turned it off, an older cube): no note
    del measured["training_simulations"]
    assert training_note("flow", runs(**measured)) == ""


def test_pooled_gain_by_hand() -> None:
    from sciquant.report.gain import pooled_gains

    def table(errors: list[float]) -> dict[str, dict[str, float]]:
        return {f"s{i}": {"pressure_error_pct": e} for i, e in enumerate(errors)}

    baseline = table([4.0, 6.0, 5.0, 7.0])
    fp32 = [table([1.0, 2.0, 3.0, 2.0]), table([2.0, 3.0, 2.0, 4.0])]  # gains 14 and 11
    quantized = [table([2.0, 3.0, 4.0, 3.0]), table([2.0, 3.0, 2.0, 4.0])]  # keep 10 and 11
    pooled = pooled_gains([baseline, baseline], fp32, quantized)
    value = pooled["pooled_retained_gain_pressure_pct"]
    assert value == pytest.approx(100 * 21 / 25)  # not the mean of 10/14 and 11/11
    assert (100 * 10 / 14 + 100) / 2 != pytest.approx(value)
    low, high = (pooled[f"pooled_retained_gain_pressure_pct_ci_{s}"] for s in ("low", "high"))
    # Seed-averaged errors give per-simulation ratios 2/2.5, 3/3.5, 2/2.5, 3.5/4: every
    # resample's ratio lies between the least and the greatest.
    assert 80.0 - 1e-9 <= low <= value <= high <= 87.5 + 1e-9
    # Only the simulations every seed has are pooled: s3 missing in seed 1 leaves s0–s2,
    # (2+3+1) + (2+3+3) kept of (3+4+2) + (2+3+3) gained.
    partial = [fp32[0], {k: v for k, v in fp32[1].items() if k != "s3"}]
    pooled = pooled_gains([baseline, baseline], partial, quantized)
    assert pooled["pooled_retained_gain_pressure_pct"] == pytest.approx(100 * 14 / 17)
    assert pooled_gains([baseline], fp32[:1], quantized[:1]) == {}  # one seed: nothing pooled


def test_cube_pools_retained_gain_over_seeds_and_the_report_shows_it() -> None:
    from sciquant.report.cube import (
        RunRecord,
        check_budget_metrics,
        headline_metrics,
        parse_budget,
        to_dataset,
        with_retained_gain,
        workload_slices,
    )
    from sciquant.report.html import results_table

    def record(seed: int, target: str, method: str, precision: str, errors: list[float]):
        return RunRecord(
            path=f"{seed}{target}{method}{precision}",
            coordinates=("flow", "mgn", seed, target, method, precision),
            simulated=False, metrics={"pressure_error_pct": float(np.mean(errors))},
            study=None, settings_hashes={}, provenance={},
            per_simulation={f"s{i}": {"pressure_error_pct": e} for i, e in enumerate(errors)},
            baseline_per_simulation={
                "calibrated_model": {f"s{i}": {"pressure_error_pct": b}
                                     for i, b in enumerate([4.0, 6.0, 5.0, 7.0])}
            },
        )  # fmt: skip

    records = [
        record(0, "reference", "none", "fp32", [1.0, 2.0, 3.0, 2.0]),
        record(0, "cpu-x86", "ptq-mse", "w8a8", [2.0, 3.0, 4.0, 3.0]),
        record(1, "reference", "none", "fp32", [2.0, 3.0, 2.0, 4.0]),
        record(1, "cpu-x86", "ptq-mse", "w8a8", [2.0, 3.0, 2.0, 4.0]),
        record(0, "cpu-x86", "ptq-minmax", "w4a8", [3.0, 4.0, 4.0, 4.0]),  # one seed only
    ]
    cube = to_dataset(with_retained_gain(records), {})
    name = "pooled_retained_gain_pressure_pct"
    assert cube[name].dims == ("dataset", "model", "target", "method", "precision")
    point = {"dataset": "flow", "model": "mgn", "target": "cpu-x86", "precision": "w8a8"}
    point["method"] = "ptq-mse"
    assert float(cube[name].sel(point)) == pytest.approx(84.0)
    assert np.isnan(float(cube[name].sel({**point, "method": "ptq-minmax", "precision": "w4a8"})))
    assert name not in headline_metrics(cube)  # no seed dimension: not a table column
    with pytest.raises(SciquantError, match="no run has the metric"):
        check_budget_metrics(cube, parse_budget({"metric": name, "min_value": 90}))
    html = results_table(*workload_slices(cube)[0])
    low = float(cube[f"{name}_ci_low"].sel(point))
    assert f"pooled 84 [{low:.3g}" in html or f"pooled 84 [{low:.1f}" in html
    assert "pooled over the seeds" in html
    cells = re.findall(r'data-metric="retained_gain_pressure_pct" data-value[^>]*>([^<]*)<', html)
    # The two-seed run: the seeds' mean (10/14 and 11/11: 85.71) ± its t interval, then pooled.
    two, one = sorted(cells, key=lambda cell: "pooled" not in cell)
    assert two.startswith("85.71 ± ") and two.count("pooled") == 1
    # The one-seed run (7 of 14 kept: 50 %) keeps its own interval, and nothing pooled.
    assert one.startswith("50 [") and "pooled" not in one
    # A cube aggregated without the pooled ratio: seed 0's interval, said to be seed 0's.
    older = cube.drop_vars([n for n in cube.data_vars if str(n).startswith("pooled_")])
    html = results_table(*workload_slices(older)[0])
    cells = re.findall(r'data-metric="retained_gain_pressure_pct" data-value[^>]*>([^<]*)<', html)
    two = next(cell for cell in cells if cell.startswith("85.71"))
    assert "pooled" not in two and two.endswith(" (seed 0)") and " [" in two
