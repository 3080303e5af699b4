"""Tests of the synthetic bloodflow data source: physics on hand-made trees, then written files."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow import sim as bs
from sciquant.workloads.bloodflow.vtp import read_centerline

SEED = 7
N_SIMULATIONS = 3


def straight_tree(length: float, radius: float) -> bs.VascularTree:
    """One straight vessel along z (cm)."""
    points = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, length]])
    return bs.VascularTree((bs.Vessel(points, radius, -1),))


def y_tree() -> bs.VascularTree:
    """A root (r 0.5 cm) splitting into two daughters (r 0.4 and 0.3 cm), one of them bent."""
    root = bs.Vessel(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 6.0]]), 0.5, -1)
    left = bs.Vessel(np.array([[0.0, 0.0, 6.0], [2.0, 0.0, 10.0]]), 0.4, 0)
    right = bs.Vessel(np.array([[0.0, 0.0, 6.0], [-1.0, 0.0, 9.0], [-1.5, 0.0, 12.0]]), 0.3, 0)
    return bs.VascularTree((root, left, right))


def constant_inflow(flowrate: float):
    """A steady inflow (cm³/s) as a vectorised function of time."""
    return lambda t: np.full(np.shape(t), flowrate)


# ---------------------------------------------------------------------------------------------
# Physics on hand-made geometries


def test_steady_flow_through_straight_vessel_gives_poiseuille_drop() -> None:
    length, radius, flowrate = 10.0, 0.3, 5.0
    network = bs.discretize(straight_tree(length, radius))
    windkessel = [bs.Windkessel(1.0e3, 1.0e-5, 1.0e4)]
    # Start from zero so the integrator itself has to reach the steady state (τ ≈ 0.2 s ≪ 5 s).
    result = bs.simulate(
        network,
        windkessel,
        constant_inflow(flowrate),
        0.5,
        n_cycles=10,
        dt=1e-3,
        store_every=5,
        initial="zero",
    )
    drop = result.pressure[-1, 0] - result.pressure[-1, network.outlets[0]]
    poiseuille = 8.0 * bs.BLOOD_VISCOSITY * length * flowrate / (np.pi * radius**4)
    assert drop == pytest.approx(poiseuille, rel=0.01)
    np.testing.assert_allclose(result.flowrate[-1], flowrate, rtol=1e-3)


def test_outlet_settles_at_windkessel_total_resistance_times_flow() -> None:
    network = bs.discretize(y_tree())
    windkessels = [bs.Windkessel(800.0, 2.0e-5, 9.0e3), bs.Windkessel(2.0e3, 1.0e-5, 2.0e4)]
    flowrate = 20.0
    result = bs.simulate(
        network,
        windkessels,
        constant_inflow(flowrate),
        0.5,
        n_cycles=10,
        dt=1e-3,
        store_every=5,
        initial="zero",
    )
    entering = {int(b): e for e, (_, b) in enumerate(network.segments)}
    outlet_flow = np.array([result.flowrate[-1, entering[int(o)]] for o in network.outlets])
    assert outlet_flow.sum() == pytest.approx(flowrate, rel=1e-6)
    for outlet, q, wk in zip(network.outlets, outlet_flow, windkessels, strict=True):
        expected = q * (wk.proximal_resistance + wk.distal_resistance)
        assert result.pressure[-1, outlet] == pytest.approx(expected, rel=0.01)


def test_kirchhoff_holds_at_junction_under_pulsatile_flow() -> None:
    network = bs.discretize(y_tree())
    windkessels = [bs.Windkessel(800.0, 2.0e-4, 9.0e3), bs.Windkessel(2.0e3, 1.0e-4, 2.0e4)]
    inflow = bs.make_inflow(np.random.default_rng(0), 0.8, 0.5)
    result = bs.simulate(network, windkessels, inflow, 0.8, n_cycles=2)
    (junction,) = network.junctions
    into = np.flatnonzero(network.segments[:, 1] == junction)
    out_of = np.flatnonzero(network.segments[:, 0] == junction)
    assert len(into) == 1 and len(out_of) == 2
    residual = result.flowrate[:, into[0]] - result.flowrate[:, out_of].sum(axis=1)
    assert np.abs(residual).max() <= 1e-9 * np.abs(result.flowrate).max()


def test_time_integration_converges_to_exact_periodic_solution() -> None:
    network = bs.discretize(y_tree())
    windkessels = [bs.Windkessel(800.0, 2.0e-5, 9.0e3), bs.Windkessel(2.0e3, 1.0e-5, 2.0e4)]
    inflow = bs.make_inflow(np.random.default_rng(1), 0.8, 0.5)
    result = bs.simulate(network, windkessels, inflow, 0.8, n_cycles=6, initial="steady")
    exact = bs.periodic_state(network, windkessels, inflow, result.times)
    pressure = exact[:, : network.n_points]
    flowrate = exact[:, network.n_points : network.n_points + network.n_segments]
    assert np.abs(result.pressure - pressure).max() <= 0.02 * np.ptp(pressure)
    assert np.abs(result.flowrate - flowrate).max() <= 0.02 * np.ptp(flowrate)
    assert result.periodicity_error < 1e-3


def test_discretisation_conserves_resistance_and_compliance() -> None:
    tree = y_tree()
    network = bs.discretize(tree, segment_length=0.3)
    k1, k2, k3 = bs.OLUFSEN_STIFFNESS
    for v, vessel in enumerate(tree.vessels):
        r, length = vessel.radius, vessel.length
        segments = network.segment_vessel == v
        assert network.resistance[segments].sum() == pytest.approx(
            8.0 * bs.BLOOD_VISCOSITY * length / (np.pi * r**4), rel=1e-12
        )
        assert network.inductance[segments].sum() == pytest.approx(
            bs.BLOOD_DENSITY * length / (np.pi * r**2), rel=1e-12
        )
    total = sum(
        3 * np.pi * v.radius**2 * v.length / (2 * bs.wall_stiffness(v.radius, k1, k2, k3))
        for v in tree.vessels
    )
    assert network.compliance.sum() == pytest.approx(total, rel=1e-12)
    assert np.all(network.compliance[network.junctions] == 0)
    assert np.all(network.segments[:, 0] < network.segments[:, 1])


def test_built_trees_respect_branch_range_and_murray_law() -> None:
    params = bs.SimulationParams(branch_count_range=(4, 7))
    counts = set()
    for index in range(30):
        tree = bs.build_tree(np.random.default_rng([3, index]), params)
        counts.add(tree.n_branches)
        for v, daughters in enumerate(tree.children()):
            if daughters:
                assert len(daughters) in (2, 3)
                assert sum(tree.vessels[d].radius ** 3 for d in daughters) == pytest.approx(
                    tree.vessels[v].radius ** 3, rel=1e-9
                )
        assert 0.3 <= tree.vessels[0].radius <= 1.0
        assert all(2.0 - 1e-9 <= v.length <= 12.0 + 1e-9 for v in tree.vessels)
    assert counts <= {4, 5, 6, 7} and len(counts) >= 3


# ---------------------------------------------------------------------------------------------
# The written data set


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    out = tmp_path_factory.mktemp("bloodflow")
    names = bs.synthesize(out, N_SIMULATIONS, SEED, progress=False)
    info = json.loads((out / "vtps" / "dataset_info.json").read_text())
    return out, names, info


def series(point_data: dict[str, np.ndarray], field: str) -> np.ndarray:
    """The `<field>_<k>` arrays stacked as [points, steps], float64."""
    steps = sum(1 for name in point_data if name.startswith(field + "_"))
    return np.stack([point_data[f"{field}_{k}"] for k in range(steps)], axis=1).astype(np.float64)


def depth_from_inlet(n_points: int, edges: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Graph distance of every point from point 0, and the adjacency lists."""
    neighbours: list[list[int]] = [[] for _ in range(n_points)]
    for a, b in edges:
        neighbours[a].append(int(b))
        neighbours[b].append(int(a))
    depth = np.full(n_points, -1)
    depth[0] = 0
    queue = deque([0])
    while queue:
        u = queue.popleft()
        for v in neighbours[u]:
            if depth[v] < 0:
                depth[v] = depth[u] + 1
                queue.append(v)
    return depth, neighbours


def test_written_layout_matches_contract(dataset: tuple[Path, list[str], dict]) -> None:
    out, names, info = dataset
    params = bs.SimulationParams()
    assert names == [f"sim_{i:03d}" for i in range(N_SIMULATIONS)]
    assert sorted(info) == names
    for name in names:
        entry = info[name]
        assert set(entry) == {
            "dt",
            "T",
            "time_shift",
            "bc_type",
            "R1",
            "C",
            "R2",
            "outlets",
            "periodicity_error",
        }
        assert entry["bc_type"] == "RCR"
        assert entry["dt"] == params.dt_store
        assert 0.7 <= entry["T"] <= 1.1
        assert entry["time_shift"] == pytest.approx((params.n_cycles - 1) * entry["T"])
        steps = round(entry["T"] / entry["dt"])

        centerline = read_centerline(out / "vtps" / f"{name}.vtp")
        data = centerline.point_data
        expected = {"area", "BranchIdTmp", "BifurcationId"}
        expected |= {f"pressure_{k}" for k in range(steps)} | {f"flow_{k}" for k in range(steps)}
        assert set(data) == expected
        assert all(
            data[f"{f}_{k}"].dtype == np.float32 for f in ("pressure", "flow") for k in range(steps)
        )

        n_points = len(centerline.points)
        assert centerline.edges.shape == (n_points - 1, 2)  # a tree of 2-point line cells
        depth, neighbours = depth_from_inlet(n_points, centerline.edges)
        assert np.all(depth >= 0)  # connected
        degree = np.array([len(n) for n in neighbours])
        assert degree[0] == 1 and data["BranchIdTmp"][0] >= 0
        outlets = [i for i in range(1, n_points) if degree[i] == 1]
        assert entry["outlets"] == outlets
        assert len(entry["R1"]) == len(entry["C"]) == len(entry["R2"]) == len(outlets)
        assert min(entry["R1"] + entry["C"] + entry["R2"]) > 0

        junction = data["BifurcationId"] >= 0
        assert np.array_equal(junction, data["BranchIdTmp"] == -1)
        assert sorted(data["BifurcationId"][junction]) == list(range(junction.sum()))
        assert np.all(degree[junction] >= 3)
        assert np.all(data["area"] > 0)
        # The inlet carries the imposed (positive-mean) inflow.
        assert series(data, "flow")[0].mean() > 0


def test_kirchhoff_holds_on_written_files(dataset: tuple[Path, list[str], dict]) -> None:
    out, names, _ = dataset
    checked = 0
    for name in names:
        centerline = read_centerline(out / "vtps" / f"{name}.vtp")
        flow = series(centerline.point_data, "flow")
        depth, neighbours = depth_from_inlet(len(centerline.points), centerline.edges)
        for j in np.flatnonzero(centerline.point_data["BifurcationId"] >= 0):
            daughters = [v for v in neighbours[j] if depth[v] > depth[j]]
            assert len(daughters) >= 2
            q_in, q_out = flow[j], flow[daughters].sum(axis=0)
            assert np.all(np.abs(q_in - q_out) <= 1e-6 * np.abs(q_in))
            checked += 1
    assert checked > 0


def test_pressures_are_physiological_and_periodic(dataset: tuple[Path, list[str], dict]) -> None:
    out, names, info = dataset
    for name in names:
        centerline = read_centerline(out / "vtps" / f"{name}.vtp")
        pressure = series(centerline.point_data, "pressure") / bs.MMHG
        assert np.all((pressure.mean(axis=1) > 60) & (pressure.mean(axis=1) < 130))
        # Calibrated on the linear circuit; the nonlinear physics (stenoses included) departs.
        assert 70 <= pressure[0].mean() <= 140
        assert 15 <= np.ptp(pressure[0]) <= 120
        assert pressure.min() > 0
        assert info[name]["periodicity_error"] < 1e-2
        branches = set(centerline.point_data["BranchIdTmp"].tolist()) - {-1}
        assert 3 <= len(branches) <= 15


def test_same_seed_gives_identical_files_whatever_n(
    dataset: tuple[Path, list[str], dict], tmp_path: Path
) -> None:
    out, _, info = dataset
    names = bs.synthesize(tmp_path / "again", 2, SEED, progress=False)
    again = json.loads((tmp_path / "again" / "vtps" / "dataset_info.json").read_text())
    for name in names:
        first = (out / "vtps" / f"{name}.vtp").read_bytes()
        assert (tmp_path / "again" / "vtps" / f"{name}.vtp").read_bytes() == first
        assert again[name] == info[name]
    bs.synthesize(tmp_path / "other", 1, SEED + 1, progress=False)
    other = (tmp_path / "other" / "vtps" / "sim_000.vtp").read_bytes()
    assert other != (out / "vtps" / "sim_000.vtp").read_bytes()


def test_default_storage_is_a_few_megabytes(dataset: tuple[Path, list[str], dict]) -> None:
    out, names, _ = dataset
    for name in names:
        assert (out / "vtps" / f"{name}.vtp").stat().st_size < 5_000_000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("root_radius_range", (1.0, 0.3)),
        ("root_radius_range", (0.0, 0.3)),
        ("length_range", (-1.0, 5.0)),
        ("segment_length", -0.1),
        ("branch_count_range", (2, 2)),
        ("branch_count_range", (5, 3)),
        ("n_cycles", 1),
        ("dt_store", 0.0),
        ("inflow_pulse_scale_range", (2.0, 4.0)),
        ("daughter_flow_fraction_range", (0.2, 0.7)),
        ("model", "quadratic"),
        ("velocity_profile_range", (1.0, 1.2)),
        ("stenosis_probability", 1.5),
        ("stenosis_max_generation", -1),
        ("stenosis_max_generation", 1.5),
        ("cfl", 0.0),
    ],
)
def test_bad_parameters_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(SciquantError, match=field):
        bs.SimulationParams(**{field: value})


def test_every_parameter_documents_unit_and_meaning() -> None:
    from dataclasses import fields

    for f in fields(bs.SimulationParams):
        assert f.metadata["unit"] and len(f.metadata["description"]) > 10, f.name


def test_raw_files_do_not_depend_on_the_blas_thread_count(tmp_path: Path) -> None:
    """The same seed gives bit-identical files on 1 or 2 BLAS threads (schedulers differ)."""
    import hashlib
    import os
    import subprocess
    import sys

    digests = []
    for threads in ("1", "2"):
        out = tmp_path / threads
        code = (
            "from pathlib import Path; from sciquant.workloads.bloodflow.sim import synthesize; "
            f"synthesize(Path({str(out)!r}), 3, 1, progress=False)"
        )
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
        digests.append(
            [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.*"))]
        )
    assert digests[0] == digests[1]


def _generation(tree: bs.VascularTree, vessel: int) -> int:
    depth = 0
    while tree.vessels[vessel].parent >= 0:
        vessel, depth = tree.vessels[vessel].parent, depth + 1
    return depth


@pytest.mark.parametrize("deepest", [0, 1])
def test_stenoses_sit_no_deeper_than_the_configured_generation(deepest: int) -> None:
    """Only vessels of generation ≤ `stenosis_max_generation` hold a stenosis; every vessel does
    when the limit is large, so the limit (not the trees) is what keeps them proximal."""
    rng_params = {"stenosis_probability": 1.0, "branch_count_range": (7, 15)}
    limited = bs.SimulationParams(stenosis_max_generation=deepest, **rng_params)
    free = bs.SimulationParams(stenosis_max_generation=1000, **rng_params)
    seen = []
    deep_when_free = 0
    for index in range(12):
        rng = np.random.default_rng([7, index])
        network = bs.discretize(bs.build_tree(rng, limited), segment_length=0.35)
        stenosis = bs.draw_stenosis(np.random.default_rng(index), network, limited)
        if stenosis is not None:
            seen.append(_generation(network.tree, stenosis.vessel))
        anywhere = bs.draw_stenosis(np.random.default_rng(index), network, free)
        deep_when_free += anywhere is not None and _generation(network.tree, anywhere.vessel) > 1
    assert len(seen) >= 6
    assert max(seen) <= deepest
    assert deep_when_free >= 3
