"""The prepared tree's linear hemodynamics: by hand on small trees, and against the simulator."""

from __future__ import annotations

import cmath
import math
from pathlib import Path

import numpy as np
import pytest

from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow import data as bloodflow
from sciquant.workloads.bloodflow import sim as bs
from sciquant.workloads.bloodflow.data import INLET, PrepareSettings
from sciquant.workloads.bloodflow.network import (
    BLOOD_DENSITY,
    BLOOD_VISCOSITY,
    FOURIER_POINTS,
    OLUFSEN_STIFFNESS,
    Physics,
    Tree,
    expansion_coefficient,
    expansion_drop,
    expansion_resistance,
    harmonic_response,
    inlet_impedance,
    periodic_response,
    periodic_spline,
    solve,
    steady_pressure_drop,
    steady_share,
    transfer_functions,
)

MU, RHO = BLOOD_VISCOSITY, BLOOD_DENSITY


def y_tree(r1=(1000.0, 3000.0), c=(0.0, 0.0), r2=(0.0, 0.0)) -> Tree:
    """Inlet 0 → junction 1 (4 cm, area 0.5) → outlets 2 (3 cm, 0.3) and 3 (5 cm, 0.2)."""
    positions = np.array([[0, 0, 0], [4, 0, 0], [4, 3, 0], [4, 0, 5]], dtype=float)
    area = np.array([0.5, 0.5, 0.3, 0.2])
    zeros = np.zeros(4)
    values = [zeros.copy(), zeros.copy(), zeros.copy()]
    for node, a, b, d in zip((2, 3), r1, c, r2, strict=True):
        values[0][node], values[1][node], values[2][node] = a, b, d
    return Tree.build(np.array([[0, 1], [1, 2], [1, 3]]), positions, area, 0, values)


def poiseuille(length: float, area: float) -> float:
    radius = math.sqrt(area / math.pi)
    return 8 * MU * length / (math.pi * radius**4)


def test_steady_split_and_pressure_drop_by_hand() -> None:
    tree = y_tree()
    # An edge's area is the mean of its end nodes': 0.5, 0.4, 0.35.
    r_parent = poiseuille(4, 0.5)
    r_a = poiseuille(3, 0.4) + 1000.0
    r_b = poiseuille(5, 0.35) + 3000.0
    share_a = (1 / r_a) / (1 / r_a + 1 / r_b)
    np.testing.assert_allclose(
        steady_share(tree), [1.0, 1.0, share_a, 1 - share_a], rtol=1e-12, atol=1e-15
    )
    junction_pressure = 1.0 / (1 / r_a + 1 / r_b)  # per unit inflow
    drop_junction = r_parent
    drop_a = r_parent + poiseuille(3, 0.4) * share_a
    np.testing.assert_allclose(
        steady_pressure_drop(tree),
        [0.0, drop_junction, drop_a, r_parent + poiseuille(5, 0.35) * (1 - share_a)],
        rtol=1e-12,
    )
    flow, pressure = solve(tree, 0.0)
    assert pressure[1].real == pytest.approx(junction_pressure, rel=1e-12)
    assert np.all(flow.imag == 0)


def test_expansion_losses_by_hand() -> None:
    """A narrowing's recovery loses ρ/2·Q²(1/A_throat − 1/A)² (Borda–Carnot) on the widening edge,
    and every node downstream carries it; contractions and even vessels lose nothing."""
    positions = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [3, 1, 0], [3, 0, 1]], float)
    # Inlet 0 (1.0) → throat 1 (0.25) → 2 (0.8) → junction 3 (0.8) → 4 (1.0) and 5 (0.3)
    area = np.array([1.0, 0.25, 0.8, 0.8, 1.0, 0.3])
    edges = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [3, 5]])
    zeros = np.zeros(6)
    r1 = zeros.copy()
    r1[[4, 5]] = 1000.0, 3000.0
    tree = Tree.build(edges, positions, area, 0, [r1, zeros.copy(), zeros.copy()])
    share = np.array([1.0, 1.0, 1.0, 1.0, 0.7, 0.3])
    local, total = expansion_drop(tree, area, share)
    recovery = 0.5 * RHO * (1 / 0.25 - 1 / 0.8) ** 2  # node 2, all of the inflow
    branch = 0.5 * RHO * 0.7**2 * (1 / 0.8 - 1 / 1.0) ** 2  # node 4 widens, 70 % of it
    np.testing.assert_allclose(local, [0, 0, recovery, 0, branch, 0], rtol=1e-12)
    np.testing.assert_allclose(
        total, [0, 0, recovery, recovery, recovery + branch, recovery], rtol=1e-12
    )
    # The loss scales with the density and is 0 on a tree that never widens.
    denser = expansion_drop(tree, area, share, Physics(density=2 * RHO))[1]
    np.testing.assert_allclose(denser, 2 * total, rtol=1e-12)
    flat = expansion_drop(tree, np.full(6, 0.5), share)
    assert not np.any(flat[0]) and not np.any(flat[1])


def stenosed_tree(r1: float = 1000.0) -> tuple[Tree, np.ndarray]:
    """Inlet 0 (1.0) → throat 1 (0.25) → 2 (0.8) → outlet 3 (0.8), 1 cm apart; node areas."""
    positions = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], dtype=float)
    area = np.array([1.0, 0.25, 0.8, 0.8])
    zeros = np.zeros(4)
    outlet_r1 = zeros.copy()
    outlet_r1[3] = r1
    tree = Tree.build(np.array([[0, 1], [1, 2], [2, 3]]), positions, area, 0,
                      [outlet_r1, zeros.copy(), zeros.copy()])  # fmt: skip
    return tree, area


def test_linearized_expansion_loss_is_borda_carnot_in_steady_flow() -> None:
    """Steady inflow Q through a throat: the added resistance K·Q on the widening edge makes the
    lumped tree's drop the Borda–Carnot loss K·Q² on top of its own, K = ρ/2·(1/A_t − 1/A)²."""
    tree, area = stenosed_tree()
    k = 0.5 * RHO * (1 / 0.25 - 1 / 0.8) ** 2
    np.testing.assert_allclose(expansion_coefficient(tree, area, RHO), [0, 0, k, 0], rtol=1e-12)
    q = 5.0
    extra = expansion_resistance(tree, area, np.full(64, q), harmonics=2)
    assert extra.shape == (3, 4)
    np.testing.assert_allclose(extra[0], [0, 0, k * q, 0], rtol=1e-12)
    np.testing.assert_allclose(extra[1:], [[0, 0, 2 * k * q, 0]] * 2, rtol=1e-12)
    plain = solve(tree, 0.0)[1].real * q
    with_loss = solve(tree, 0.0, extra=extra[0])[1].real * q
    assert with_loss[0] - plain[0] == pytest.approx(k * q**2, rel=1e-12)
    assert with_loss[3] == pytest.approx(plain[3], rel=1e-12)  # downstream of it, unchanged


def test_linearized_expansion_loss_under_a_reversing_pulse() -> None:
    """Row 0 keeps the cycle-mean loss K·⟨Q|Q|⟩ (flow reversal counts against), rows ≥ 1 the
    mean slope 2K·⟨|Q|⟩; a tree that never widens gets nothing."""
    tree, area = stenosed_tree()
    k = 0.5 * RHO * (1 / 0.25 - 1 / 0.8) ** 2
    t = np.arange(256) / 256
    q = 2.0 + 6.0 * np.sin(2 * np.pi * t)  # reverses for part of the cycle
    extra = expansion_resistance(tree, area, q, harmonics=1)
    mean_loss = k * np.mean(q * np.abs(q))
    assert extra[0, 2] * np.mean(q) == pytest.approx(mean_loss, rel=1e-12)
    assert extra[1, 2] == pytest.approx(2 * k * np.mean(np.abs(q)), rel=1e-12)
    flat = expansion_resistance(tree, np.full(4, 0.5), q, harmonics=1)
    assert not np.any(flat)
    with pytest.raises(SciquantError, match="mean inflow"):
        expansion_resistance(tree, area, -q, harmonics=1)
    with pytest.raises(ValueError, match="harmonics"):
        transfer_functions(tree, 1.0, 3, extra=extra)


def test_linearized_expansion_loss_sends_flow_around_a_throat() -> None:
    """A throat in one daughter of a Y: its resistance is computed on the flow it leaves there
    (a fixed point of the steady split), less than the lumped split gave it."""
    positions = np.array([[0, 0, 0], [4, 0, 0], [4, 1, 0], [4, 2, 0], [4, 0, 2]], dtype=float)
    # Inlet 0 → junction 1 → throat 2 (0.05) → outlet 3 (0.3); junction 1 → outlet 4 (0.3)
    area = np.array([0.5, 0.5, 0.05, 0.3, 0.3])
    zeros = np.zeros(5)
    r1 = zeros.copy()
    r1[[3, 4]] = 2000.0
    tree = Tree.build(np.array([[0, 1], [1, 2], [2, 3], [1, 4]]), positions, area, 0,
                      [r1, zeros.copy(), zeros.copy()])  # fmt: skip
    q = np.full(32, 40.0)
    extra = expansion_resistance(tree, area, q, harmonics=1, iterations=50)
    share = solve(tree, 0.0, extra=extra[0])[0].real
    k = expansion_coefficient(tree, area, RHO)
    np.testing.assert_allclose(extra[0], k * share * 40.0, rtol=1e-9)
    assert share[3] < steady_share(tree)[3] - 0.02
    # Five iterations (the default) are within 1 % of the fixed point here.
    default = expansion_resistance(tree, area, q, harmonics=1)
    np.testing.assert_allclose(default[0], extra[0], rtol=1e-2)


def test_single_vessel_with_windkessel_by_hand() -> None:
    """Root → outlet, one edge: shunt iωC/2 at both ends, series R + iωL, RCR outlet."""
    length, area = 10.0, 0.3
    positions = np.array([[0, 0, 0], [length, 0, 0]], dtype=float)
    r1, cap, r2 = 800.0, 2e-4, 12000.0
    tree = Tree.build(
        np.array([[0, 1]]),
        positions,
        np.array([area, area]),
        0,
        (np.array([0, r1]), np.array([0, cap]), np.array([0, r2])),
    )
    omega = 2 * math.pi * 2 / 0.9  # second harmonic of a 0.9 s cycle
    radius = math.sqrt(area / math.pi)
    k1, k2, k3 = OLUFSEN_STIFFNESS
    wall = 3 * math.pi * radius**3 * length / (2 * radius * (k1 * math.exp(k2 * radius) + k3))
    series = poiseuille(length, area) + 1j * omega * RHO * length / area
    z_outlet = 1 / (1j * omega * wall / 2 + 1 / (r1 + r2 / (1 + 1j * omega * r2 * cap)))
    z_root = 1 / (1j * omega * wall / 2 + 1 / (series + z_outlet))
    flow_out = z_root / (series + z_outlet)
    flow, pressure = solve(tree, omega)
    assert flow[0] == 1
    assert flow[1] == pytest.approx(flow_out, rel=1e-12)
    assert pressure[0] == pytest.approx(z_root, rel=1e-12)
    assert pressure[1] == pytest.approx(flow_out * z_outlet, rel=1e-12)
    # Its response columns at k = 2 (share 1): |Q| − 1, arg Q; |P1/P0| − 1, arg(P1/P0).
    flows, pressures = harmonic_response(tree, 0.9, 2)
    assert flows.shape == pressures.shape == (2, 4)
    assert flows[1, 2] == pytest.approx(abs(flow_out) - 1, rel=1e-9)
    assert flows[1, 3] == pytest.approx(cmath.phase(flow_out), rel=1e-9)
    ratio = flow_out * z_outlet / z_root
    assert pressures[1, 2] == pytest.approx(abs(ratio) - 1, rel=1e-9)
    assert pressures[1, 3] == pytest.approx(cmath.phase(ratio), rel=1e-9)
    np.testing.assert_array_equal(flows[0], 0.0)  # the inflow itself
    # The inlet impedance: steady R + R1 + R2, then |Z|, arg Z per harmonic.
    impedance = inlet_impedance(tree, 0.9, 2)
    assert impedance.shape == (5,)
    assert impedance[0] == pytest.approx(poiseuille(length, area) + r1 + r2, rel=1e-12)
    assert impedance[3] == pytest.approx(abs(z_root), rel=1e-12)
    assert impedance[4] == pytest.approx(cmath.phase(z_root), rel=1e-12)


def test_inlet_response_is_the_impedance_in_the_models_pressure_units(tmp_path: Path) -> None:
    """Mean inlet pressure of the lumped model within 3 % of the pulse of the simulator's own, on
    trees without a stenosis (whose Q|Q| loss raises the inlet pressure beyond any lumped tree)."""
    raw = tmp_path / "raw"
    no_stenosis = bs.SimulationParams(stenosis_probability=0.0)
    bs.synthesize(raw, n_simulations=3, seed=2, params=no_stenosis, progress=False)
    out = tmp_path / "prepared"
    bloodflow.prepare(raw, out, PrepareSettings(split={"train": 0.34, "valid": 0.0, "test": 0.66}))
    index = bloodflow.load_index(out)
    for name in index["samples"]["test"] + index["samples"]["train"]:
        sample = bloodflow.load_sample(out, name)
        scales = bloodflow.sample_scales(sample, name)
        response = bloodflow.inlet_response(sample, scales)
        pressure, _ = bloodflow.scaled_series(sample, scales)
        cycle = sample["loading"] == 0
        inlet = sample["node_type"] == INLET
        assert response[0] == pytest.approx(pressure[cycle][:, inlet].mean(), abs=0.03)
        # A unit relative inflow harmonic: |Z|·Q̄ over the pulse pressure, then its phase.
        z = sample["inlet_impedance"]
        assert response[1] == pytest.approx(z[1] * scales[2][inlet][0] / scales[1], rel=1e-9)
        assert response[2] == z[2]


def test_stiffer_walls_shrink_the_response() -> None:
    """A purely resistive tree follows the inflow: its response is 0 without L and C."""
    compliant = harmonic_response(y_tree(c=(1e-4, 1e-4), r2=(9000, 9000)), 1.0, 1)[0]
    rigid_physics = Physics(density=1e-9, stiffness=(0.0, 0.0, 1e15))  # no L, no wall C
    rigid = harmonic_response(y_tree(), 1.0, 1, rigid_physics)[0]
    assert np.abs(compliant[2:]).max() > 0.05
    assert np.abs(rigid).max() < 1e-3


def test_bad_trees_name_the_place() -> None:
    positions = np.zeros((3, 3))
    area = np.ones(3)
    values = (np.array([0, 0, 1.0]), np.zeros(3), np.zeros(3))
    with pytest.raises(SciquantError, match=r"sim_a.*node 2 has more than one upstream"):
        Tree.build(np.array([[0, 1], [0, 2], [1, 2]]), positions, area, 0, values, "sim_a")
    with pytest.raises(SciquantError, match=r"sim_b.*1 nodes are not reachable"):
        Tree.build(np.array([[0, 1]]), positions, area, 0, values, "sim_b")
    with pytest.raises(SciquantError, match=r"sim_c.*outlet node\(s\) \[1\].*R1 \+ R2"):
        Tree.build(np.array([[0, 1], [0, 2]]), positions, area, 0, values, "sim_c")
    with pytest.raises(SciquantError, match=r"prepare.physics"):
        Physics(viscosity=-1.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The linear circuit with the prior's constants: the lumped model's own physics."""
    raw = tmp_path_factory.mktemp("raw")
    params = bs.SimulationParams(
        model="linear", viscosity_range=(0.04, 0.04), stiffness_scale_range=(1.0, 1.0)
    )
    bs.synthesize(raw, 6, seed=3, params=params, progress=False)
    out = raw.parent / "prepared_network"
    settings = PrepareSettings(split=bloodflow.Split(seed=1), keep_fraction=0.2)
    bloodflow.prepare(raw, out, settings)
    return out


def test_simulated_cycle_means_and_harmonics_match_the_linear_model(prepared: Path) -> None:
    """Independent reference: the simulator's time-domain DAE on its fine discretisation.

    Cycle-mean flow / mean inflow = steady share (exact for a linear network; the prepared graph
    keeps 20 % of the points, which changes only the vessels' small resistance); the fundamental
    harmonic of every node's flow relative to the inflow's = the predicted response.
    """
    index = bloodflow.load_index(prepared)
    checked = 0
    for name in index["samples"]["test"] + index["samples"]["valid"]:
        sample = bloodflow.load_sample(prepared, name)
        cycle = sample["flowrate"][sample["loading"] == 0][:-1].astype(np.float64)
        inlet = sample["node_type"] == INLET
        mean_share = cycle.mean(axis=0) / cycle[:, inlet].mean()
        np.testing.assert_allclose(mean_share, sample["flow_share"], atol=0.01)
        spectrum = np.fft.rfft(cycle, axis=0)
        measured = spectrum[1] / spectrum[1][inlet] / sample["flow_share"]
        response = sample["flow_response"]
        # The coarse graph lumps the wall compliance at 20 % of the points: within 10 %.
        np.testing.assert_allclose(np.abs(measured) - 1, response[:, 0], rtol=0.1, atol=0.015)
        np.testing.assert_allclose(np.angle(measured), response[:, 1], rtol=0.1, atol=0.015)
        # The response is not trivially small: a bug that dropped compliance would fail above.
        checked += int(np.abs(response[:, 0]).max() > 0.05)
        pressure = sample["pressure"][sample["loading"] == 0][:-1].astype(np.float64)
        drop = pressure[:, inlet].mean() - pressure.mean(axis=0)
        mean_inflow = cycle[:, inlet].mean()
        np.testing.assert_allclose(
            drop, sample["pressure_drop"] * mean_inflow, atol=0.01 * np.ptp(pressure[:, inlet])
        )
    assert checked >= 1


def test_periodic_response_against_a_time_domain_solution() -> None:
    """One rigid vessel into an RC Windkessel, integrated in time to its periodic state.

    Independent reference: the ODE C dP_c/dt = Q − P_c/R2, P_in = (R_v + R1)·Q + P_c, stepped
    with the trapezoidal rule over many cycles; the Fourier-series response must match it at
    arbitrary times (checks the transfer functions, the series and the sign of the phase).
    """
    length, area = 6.0, 0.4
    rigid = Physics(density=1e-12, stiffness=(0.0, 0.0, 1e18))  # no inertance, no wall C
    r1, cap, r2 = 500.0, 3e-4, 9000.0
    tree = Tree.build(
        np.array([[0, 1]]),
        np.array([[0, 0, 0], [length, 0, 0]], dtype=float),
        np.array([area, area]),
        0,
        (np.array([0, r1]), np.array([0, cap]), np.array([0, r2])),
    )
    period = 0.8
    omega = 2 * math.pi / period

    def inflow(t):
        return 5.0 + 3.0 * np.sin(omega * t) + 1.5 * np.cos(3 * omega * t + 0.4)

    # Sampled on the Fourier grid itself: the spline through the samples is then exact there.
    sample_times = np.arange(FOURIER_POINTS) * (period / FOURIER_POINTS)
    transfer = transfer_functions(tree, period, 5, rigid)
    times = np.array([0.013, 0.21, 0.377, 0.5, 0.79])
    flow, pressure = periodic_response(transfer, sample_times, inflow(sample_times), period, times)
    # Time domain: trapezoidal steps of dt = period / 4000 over 30 cycles (R2·C = 2.7 s), from
    # the mean state, so the start's transient has decayed far below the tolerance.
    dt = period / 4000
    decay = 1.0 / (r2 * cap)
    p_c = 5.0 * r2
    t = 0.0
    for _ in range(30 * 4000):
        q0, q1 = inflow(t), inflow(t + dt)
        p_c = (p_c * (1 - 0.5 * dt * decay) + 0.5 * dt * (q0 + q1) / cap) / (1 + 0.5 * dt * decay)
        t += dt
    # t is now a whole number of periods: step on to each requested time.
    expected = []
    for target in times:
        value, now = p_c, 0.0
        steps = int(round(target / dt))
        for k in range(steps):
            q0, q1 = inflow(k * dt), inflow((k + 1) * dt)
            value = (value * (1 - 0.5 * dt * decay) + 0.5 * dt * (q0 + q1) / cap) / (
                1 + 0.5 * dt * decay
            )
            now += dt
        resistance = poiseuille(length, area) + r1
        expected.append(resistance * inflow(now) + value)
    np.testing.assert_allclose(flow[:, 0], inflow(times), rtol=1e-9)
    np.testing.assert_allclose(flow[:, 1], inflow(times), rtol=1e-9)  # rigid: no storage
    np.testing.assert_allclose(pressure[:, 0], expected, rtol=1e-4)


def test_lumped_series_follow_the_simulator(prepared: Path) -> None:
    """The prepared tree's response to the raw inflow against the simulator's own series.

    The simulator integrates the same lumped physics on the full centerline; the prepared
    graph keeps 20 % of its points. Measured on this data: flow within 0.19–0.46 %, pressure
    within 0.11–0.25 % (relative L2 over branch nodes and the cycle); a response without the
    wall compliance or with a wrong phase is off by tens of %.
    """
    index = bloodflow.load_index(prepared)
    for name in index["samples"]["test"] + index["samples"]["valid"]:
        sample = bloodflow.load_sample(prepared, name)
        cycle = sample["loading"] == 0
        branch = sample["node_type"] == bloodflow.BRANCH
        for field, bound in (("flowrate", 0.01), ("pressure", 0.005)):
            exact = sample[field][cycle][:, branch].astype(np.float64)
            lumped = sample[f"linear_{field}"][cycle][:, branch].astype(np.float64)
            error = np.linalg.norm(lumped - exact) / np.linalg.norm(exact)
            assert error < bound, (name, field, error)
        # The loading ramp is the simulation's: the same rule applied to the lumped series.
        ramp = sample["loading"] == 1
        np.testing.assert_allclose(
            sample["linear_flowrate"][ramp],
            np.linspace(0, 1, ramp.sum(), endpoint=False)[:, None]
            * sample["linear_flowrate"][ramp.sum()],
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("with_end", [False, True])
def test_periodic_spline_through_one_stored_cycle(with_end: bool) -> None:
    """A smooth cycle sampled at 79 points: the spline is within 1e-5 of it everywhere; storing
    the cycle's end (t0 + T, the start again, as some files do) changes nothing."""
    period = 0.7
    times = np.arange(79) * period / 79
    if with_end:  # the start again at t0 + T, one rounding step short of T (as it can come out)
        times = np.append(times, np.nextafter(period, 0.0))
    wave = lambda t: 5 + 3 * np.sin(2 * np.pi * t / period) + np.cos(6 * np.pi * t / period)  # noqa: E731
    spline = periodic_spline(times, wave(times), period)
    check = np.linspace(0, 2 * period, 997)
    assert np.abs(spline(check) - wave(check)).max() < 1e-3
    assert np.abs(spline(times) - wave(times)).max() < 1e-9
