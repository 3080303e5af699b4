"""Tests of the nonlinear 1D blood-flow solver (sciquant.workloads.bloodflow.sim_1d) on hand-made
trees."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sciquant.workloads.bloodflow import sim as bs
from sciquant.workloads.bloodflow import sim_1d as b1
from sciquant.workloads.bloodflow.vtp import read_centerline

POISEUILLE = b1.Physics1D(
    bs.BLOOD_VISCOSITY, bs.BLOOD_DENSITY, 4.0 / 3.0, 0.0, bs.OLUFSEN_STIFFNESS
)


def straight_tree(length: float, radius: float) -> bs.VascularTree:
    """One straight vessel along z (cm)."""
    return bs.VascularTree((bs.Vessel(np.array([[0, 0, 0], [0, 0, length]], float), radius, -1),))


def y_tree(daughter_radius: float = 0.4) -> bs.VascularTree:
    """A root (r 0.5 cm) splitting into two daughters."""
    root = bs.Vessel(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 6.0]]), 0.5, -1)
    left = bs.Vessel(np.array([[0.0, 0.0, 6.0], [2.0, 0.0, 10.0]]), daughter_radius, 0)
    right = bs.Vessel(np.array([[0.0, 0.0, 6.0], [-2.0, 0.0, 10.0]]), 0.3, 0)
    return bs.VascularTree((root, left, right))


def steady(flowrate: float, period: float = 0.5) -> bs.InflowWaveform:
    """A constant inflow (cm³/s)."""
    return bs.InflowWaveform(period, flowrate, np.zeros(1), np.zeros(1))


def run(network, windkessels, inflow, physics=POISEUILLE, n_cycles=6, dt=2.5e-4, **kw):
    initial = bs._harmonic_initial(network, windkessels, inflow)
    return b1.simulate_nonlinear(
        network, windkessels, inflow, inflow.period, physics,
        initial=initial, dt=dt, dt_store=0.005, n_cycles=n_cycles, **kw,
    )  # fmt: skip


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_small_amplitude_limit_matches_linear_circuit() -> None:
    network = bs.discretize(y_tree())
    windkessels = [bs.Windkessel(800.0, 2.0e-5, 9.0e3), bs.Windkessel(2.0e3, 1.0e-5, 2.0e4)]
    waveform = bs.make_inflow(np.random.default_rng(1), 0.8, 0.5)
    tiny = 1e-3
    inflow = bs.InflowWaveform(
        0.8, waveform.mean * tiny, waveform.cosine * tiny, waveform.sine * tiny
    )
    solution = run(network, windkessels, inflow, n_cycles=3)
    linear = bs.periodic_state(network, windkessels, inflow, solution.times)
    pressure = linear[:, : network.n_points]
    flowrate = linear[:, network.n_points : network.n_points + network.n_segments]
    assert relative_l2(solution.pressure, pressure) < 0.01
    assert relative_l2(solution.flowrate, flowrate) < 0.01


def test_steady_drop_across_stenosis_is_young_tsai() -> None:
    network = bs.discretize(straight_tree(10.0, 0.3))
    stenosis = b1.Stenosis(vessel=0, start=3.0, length=2.5, area_ratio=0.3)
    flowrate = 5.0
    solution = run(
        network, [bs.Windkessel(1e3, 1e-6, 1e4)], steady(flowrate), stenosis=stenosis, n_cycles=8
    )
    grid = b1._grid(network, POISEUILLE, stenosis)
    covered = np.flatnonzero(grid.stenotic)
    upstream, downstream = network.segments[covered[0], 0], network.segments[covered[-1], 1]
    drop = solution.pressure[-1, upstream] - solution.pressure[-1, downstream]
    expected = stenosis.pressure_drop(flowrate, 0.3, bs.BLOOD_VISCOSITY, bs.BLOOD_DENSITY)
    assert drop == pytest.approx(expected, rel=0.02)


def test_steady_outlet_pressure_is_flow_times_windkessel_resistance() -> None:
    network = bs.discretize(y_tree())
    windkessels = [bs.Windkessel(800.0, 2.0e-5, 9.0e3), bs.Windkessel(2.0e3, 1.0e-5, 2.0e4)]
    solution = run(network, windkessels, steady(20.0), n_cycles=10)
    for outlet, wk in zip(network.outlets, windkessels, strict=True):
        q = solution.flowrate[-1, np.flatnonzero(network.segments[:, 1] == outlet)[0]]
        expected = q * (wk.proximal_resistance + wk.distal_resistance)
        assert solution.pressure[-1, outlet] == pytest.approx(expected, rel=0.01)


def test_junction_total_pressure_is_continuous_in_steady_flow() -> None:
    network = bs.discretize(y_tree(daughter_radius=0.2))
    windkessels = [bs.Windkessel(2e3, 1.0e-5, 2.0e4), bs.Windkessel(2e3, 1.0e-5, 2.0e4)]
    solution = run(network, windkessels, steady(20.0), n_cycles=10)
    (junction,) = network.junctions
    rho = bs.BLOOD_DENSITY

    def side(segment: int, far: int, near: int) -> tuple[float, float]:
        """Static pressure extrapolated to the junction along a vessel, and its velocity there."""
        p = solution.pressure[-1]
        pressure = p[near] + (p[near] - p[far])  # equal segment lengths within a vessel
        return pressure, solution.flowrate[-1, segment] / solution.area[-1, near]

    parent = np.flatnonzero(network.segments[:, 1] == junction)[0]
    a = network.segments[parent, 0]
    p_parent, u_parent = side(parent, a - 1, a)
    for d in np.flatnonzero(network.segments[:, 0] == junction):
        b = network.segments[d, 1]
        p_daughter, u_daughter = side(d, b + 1, b)
        bernoulli = rho / 2 * (u_daughter**2 - u_parent**2)
        assert bernoulli > 100.0  # a test that can fail: the dynamic pressures differ
        assert p_parent - p_daughter == pytest.approx(bernoulli, rel=0.02)


def test_error_falls_at_first_order_under_joint_refinement() -> None:
    inflow = bs.make_inflow(np.random.default_rng(2), 0.5, 0.3)
    windkessels = [bs.Windkessel(5e3, 5e-5, 3e4)]
    physics = b1.Physics1D(0.04, 1.06, 1.1, 5e4, bs.OLUFSEN_STIFFNESS)
    tree = straight_tree(12.0, 0.3)

    def inlet_pressure(h: float, dt: float) -> np.ndarray:
        network = bs.discretize(tree, segment_length=h)
        return run(network, windkessels, inflow, physics, n_cycles=2, dt=dt).pressure[:, 0]

    reference = inlet_pressure(0.075, 0.625e-5 * 2)
    errors = [
        relative_l2(inlet_pressure(h, dt), reference)
        for h, dt in ((0.6, 2e-4), (0.3, 1e-4), (0.15, 0.5e-4))
    ]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(orders - b1.ORDER) <= 0.3), (errors, orders)


def test_mass_is_conserved_at_junctions_of_written_nonlinear_data(tmp_path: Path) -> None:
    params = bs.SimulationParams(stenosis_probability=1.0)
    bs.synthesize(tmp_path, 2, 11, params, progress=False)
    checked = 0
    for name in ("sim_000", "sim_001"):
        centerline = read_centerline(tmp_path / "vtps" / f"{name}.vtp")
        data = centerline.point_data
        steps = sum(1 for k in data if k.startswith("flow_"))
        flow = np.stack([data[f"flow_{k}"] for k in range(steps)], axis=1).astype(np.float64)
        for j in np.flatnonzero(data["BifurcationId"] >= 0):
            daughters = centerline.edges[centerline.edges[:, 0] == j, 1]
            assert len(daughters) >= 2
            q_in, q_out = flow[j], flow[daughters].sum(axis=0)
            assert np.all(np.abs(q_in - q_out) <= 1e-6 * np.abs(q_in))
            checked += 1
    assert checked > 0


def test_stenosis_narrows_the_written_area() -> None:
    params = bs.SimulationParams(stenosis_probability=1.0)
    case = next(c for c in (bs.run_case(5, i, params) for i in range(5)) if c.stenosis)
    centerline, _ = bs.centerline_output(case, params.output_spacing)
    vessel = centerline.point_data["BranchIdTmp"] == case.stenosis.vessel
    area = centerline.point_data["area"][vessel]
    a0 = math.pi * case.tree.vessels[case.stenosis.vessel].radius ** 2
    # The written area is the cycle-mean lumen: A0 distended by the tube law (a few %).
    assert a0 < area.max() < 1.3 * a0
    assert area.min() / area.max() == pytest.approx(case.stenosis.area_ratio, rel=0.08)


def test_written_area_is_the_cycle_mean_lumen() -> None:
    """Away from a stenosis and a junction, the written area is the solver's mean area there."""
    params = bs.SimulationParams(stenosis_probability=0.0)
    case = bs.run_case(2, 0, params)
    centerline, written = bs.centerline_output(case, params.output_spacing)
    inner = [i for i in range(1, case.network.n_points) if case.network.point_junction[i] < 0]
    mean_area = case.result.area[:, inner].mean(axis=0)
    np.testing.assert_allclose(centerline.point_data["area"][written[inner]], mean_area, rtol=1e-9)
    assert np.all(mean_area > case.network.area[inner])  # distended under a positive pressure
