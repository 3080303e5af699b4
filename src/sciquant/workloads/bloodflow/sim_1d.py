"""Nonlinear 1D blood flow in a discretised vascular tree (the embedded data's default physics).

Equations, in CGS units (cm, s, g; pressure p dyn/cm², area A cm², flowrate Q cm³/s), per vessel
of reference radius r0 and reference area A0 = π r0²:

- mass: ∂A/∂t + ∂Q/∂x = 0;
- momentum: ∂Q/∂t + ∂(α Q²/A)/∂x + (A/ρ) ∂p/∂x = −K_R Q/A, with α the velocity-profile
  coefficient and K_R = 2πν α/(α−1), ν = μ/ρ (α = 4/3, Poiseuille: K_R = 8πν, so at A = A0 the
  friction of a piece of length h is the linear circuit's R = 8μh/(πr0⁴));
- tube law (Olufsen): p = p0 + β (1 − √(A0/A)), β = (4/3) Eh/r0, Eh/r0 = k1·e^(k2·r0) + k3, so
  dA/dp at A0 is 3πr0³/(2Eh) per length, the linear circuit's compliance;
- junctions: no volume; Σ Q_in = Σ Q_out exactly and the total pressure p + ρ/2·(Q/A)² is the same
  in every vessel meeting there;
- stenosis (Young & Tsai 1973) over a stretch of length L_s of one vessel, reduced area A_s: the
  stretch's momentum balance is the lumped element ΔP = K_v μ/(2π r0³)·Q + K_t ρ/(2A0²)·
  (A0/A_s − 1)²·Q|Q| + K_u ρ L_s/A0·dQ/dt (K_t = 1.52, K_u = 1.2, K_v = 32 (L_s/D0)(A0/A_s)²),
  spread over the stretch's segments in proportion to their length; the stretch keeps its wall
  compliance;
- inlet: prescribed flowrate Q_in(t); outlets: RCR Windkessel (Rp, C, Rd) to a distal pressure 0.

Scheme (staggered in space and time, "leapfrog"/Yee): area and pressure at the points of the
lumped circuit's grid (`Network1D`) at whole steps, flowrate per segment at half steps. A point
stores the volume of half of each adjacent segment (a junction's half goes to the segment's other
end, as in the linear circuit). Per step: (1) areas from the volume balance with the half-step
flows; at an outlet implicitly (trapezoidal rule) together with its Windkessel, since Rp times the
point's compliance can be far below dt; (2) pressures from the tube law; (3) flowrates from the
momentum balance of each segment, p and the convective flux α Q²/A differenced across it, the
friction (and the stenosis terms) trapezoidal in time, the convective and |Q| factors from flows
extrapolated to the whole step, the flux upwinded; at a junction the total pressure is the
Lagrange multiplier that
makes the new flows conserve mass exactly (one scalar linear solve per junction). The wave part
(mass, pressure gradient, friction) is centred in space and time (second order), but the upwind
convective flux and the backward-Euler outlet coupling are first order, so the scheme is first
order in Δt and Δx under joint refinement (`ORDER`; measured 1.06–1.14, errors ~1e-4). It is
explicit and stable for Δt ≤ Δx/(|u| + c), c = √(A/ρ·∂p/∂A) (the CFL number `cfl` < 1 is applied
to the smallest segment). Stored flowrates at whole steps are the mean of the two adjacent half
steps (so they conserve mass at junctions too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numba
import numpy as np

from sciquant.errors import SciquantError

if TYPE_CHECKING:
    from collections.abc import Sequence


class _Vessel(Protocol):
    @property
    def radius(self) -> float: ...


class _Tree(Protocol):
    @property
    def vessels(self) -> Sequence[_Vessel]: ...


class Network1D(Protocol):
    """What the solver reads of a discretised tree: points, segments (upstream id < downstream
    id), outlets and junctions, each vessel's nodes along its arc, the vessels' radii. The
    embedded data's `sciquant.workloads.bloodflow.sim.Network1D` is one (see its fields); the solver
    asks for no more, so it imports nothing of the tree's generator."""

    @property
    def tree(self) -> _Tree: ...
    @property
    def segments(self) -> np.ndarray: ...
    @property
    def segment_vessel(self) -> np.ndarray: ...
    @property
    def outlets(self) -> np.ndarray: ...
    @property
    def point_junction(self) -> np.ndarray: ...
    @property
    def vessel_arc(self) -> tuple[np.ndarray, ...]: ...
    @property
    def vessel_flow_index(self) -> tuple[np.ndarray, ...]: ...
    @property
    def n_points(self) -> int: ...
    @property
    def n_segments(self) -> int: ...
    @property
    def junctions(self) -> np.ndarray: ...


class Windkessel(Protocol):
    """An outlet's RCR Windkessel as the solver reads it (dyn·s/cm⁵, cm⁵/dyn; distal pressure
    0): `sciquant.workloads.bloodflow.sim.Windkessel` is one."""

    @property
    def proximal_resistance(self) -> float: ...
    @property
    def compliance(self) -> float: ...
    @property
    def distal_resistance(self) -> float: ...


YOUNG_TSAI_KT = 1.52
"""Turbulent (expansion) loss coefficient K_t of the Young–Tsai stenosis model."""
YOUNG_TSAI_KU = 1.2
"""Inertance coefficient K_u of the Young–Tsai stenosis model."""
_OUTLET_NEWTON_STEPS = 4
ORDER = 1
"""Convergence order of the scheme under joint Δt/Δx refinement."""


@dataclass(frozen=True)
class Physics1D:
    """Constants of one nonlinear run.

    `viscosity` μ (P), `density` ρ (g/cm³), `alpha` α (1, velocity-profile coefficient, > 1),
    `reference_pressure` p0 (dyn/cm², where A = A0), `stiffness` (k1 g/(s²·cm), k2 1/cm,
    k3 g/(s²·cm)) of Eh/r0.
    """

    viscosity: float
    density: float
    alpha: float
    reference_pressure: float
    stiffness: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not self.alpha > 1.0:
            raise SciquantError(
                f"Physics1D.alpha must be > 1 (K_R = 2πν α/(α−1)), got {self.alpha}"
            )
        for name in ("viscosity", "density"):
            if not getattr(self, name) > 0:
                raise SciquantError(f"Physics1D.{name} must be > 0, got {getattr(self, name)}")

    @property
    def friction(self) -> float:
        """K_R = 2πν α/(α−1) (cm²/s)."""
        return 2.0 * math.pi * self.viscosity / self.density * self.alpha / (self.alpha - 1.0)


@dataclass(frozen=True)
class Stenosis:
    """A Young–Tsai stenosis of `vessel` from arc length `start` (cm) over `length` L_s (cm).

    `area_ratio` A_s/A0 (0 < · < 1) at its throat.
    """

    vessel: int
    start: float
    length: float
    area_ratio: float

    def area(self, arc: np.ndarray, reference_area: float) -> np.ndarray:
        """Cross-section (cm²) at arc lengths `arc` (cm): a cosine-shaped narrowing to A_s."""
        s = (np.asarray(arc, dtype=np.float64) - self.start) / self.length
        inside = (s > 0.0) & (s < 1.0)
        depth = (1.0 - self.area_ratio) * 0.5 * (1.0 - np.cos(2.0 * np.pi * s))
        return reference_area * (1.0 - np.where(inside, depth, 0.0))

    def pressure_drop(
        self, flowrate: float, radius: float, viscosity: float, density: float
    ) -> float:
        """Steady Young–Tsai drop (dyn/cm²) for `flowrate` (cm³/s) through a vessel of `radius`."""
        a0 = math.pi * radius**2
        ratio = 1.0 / self.area_ratio
        k_v = 32.0 * self.length / (2.0 * radius) * ratio**2
        return k_v * viscosity / (
            2.0 * math.pi * radius**3
        ) * flowrate + YOUNG_TSAI_KT * density / (2.0 * a0**2) * (
            ratio - 1.0
        ) ** 2 * flowrate * abs(flowrate)


@dataclass(frozen=True, eq=False)
class Solution1D:
    """The last simulated cycle, every stored step (K steps), as `SimulationResult` plus areas.

    `times` [K] (s), `pressure` [K, N] (dyn/cm²; at a junction the static pressure on the parent's
    side), `flowrate` [K, E] (cm³/s), `inflow` [K], `windkessel_pressure` [K, n_out], `area`
    [K, N] (cm²; 0 at junctions), `junction_total_pressure` [K, n_junctions] (dyn/cm²),
    `time_shift` (s), `periodicity_error` (max over pressure and flowrate of
    max|x_last − x_previous| / max|x_last| between the last two cycles), `dt` (s).
    """

    times: np.ndarray
    pressure: np.ndarray
    flowrate: np.ndarray
    inflow: np.ndarray
    windkessel_pressure: np.ndarray
    area: np.ndarray
    junction_total_pressure: np.ndarray
    time_shift: float
    periodicity_error: float
    dt: float


@dataclass(frozen=True, eq=False)
class _Grid:
    """Per-point and per-segment arrays of the scheme (see `_grid`)."""

    length: np.ndarray  # [N] storage length of each point (cm), 0 at junctions
    area0: np.ndarray  # [N] A0 (cm²)
    beta: np.ndarray  # [N] β = (4/3) Eh/r0 (dyn/cm²)
    enter: np.ndarray  # [N] segment entering along the vessel, -1 at the inlet
    leave: np.ndarray  # [N] segment leaving along the vessel, -1 at outlets and junctions
    seg_length: np.ndarray  # [E] h (cm)
    seg_area0: np.ndarray  # [E] A0 (cm²)
    seg_beta: np.ndarray  # [E]
    stenosis_resistance: np.ndarray  # [E] Young–Tsai linear term share (dyn·s/cm⁵), 0 elsewhere
    stenosis_loss: np.ndarray  # [E] Young–Tsai quadratic term share (g/cm⁷)
    stenotic: np.ndarray  # [E] bool
    junctions: np.ndarray  # [J] point ids
    junction_parent: np.ndarray  # [J] segment entering the junction
    daughter_ptr: np.ndarray  # [J + 1] CSR offsets into daughter_segments
    daughter_segments: np.ndarray


def _grid(network: Network1D, physics: Physics1D, stenosis: Stenosis | None) -> _Grid:
    """The scheme's arrays for `network` (geometry from the lumped circuit's discretisation)."""
    from sciquant.workloads.bloodflow.network import wall_stiffness

    n_p, n_e = network.n_points, network.n_segments
    seg_length = np.empty(n_e)
    seg_mid_arc = np.empty(n_e)
    for v, flow_index in enumerate(network.vessel_flow_index):
        arc = network.vessel_arc[v]
        seg_length[flow_index[1:]] = np.diff(arc)
        seg_mid_arc[flow_index[1:]] = 0.5 * (arc[1:] + arc[:-1])
    radius = np.array([network.tree.vessels[v].radius for v in network.segment_vessel])
    seg_area0 = math.pi * radius**2
    seg_beta = 4.0 / 3.0 * wall_stiffness(radius, *physics.stiffness)
    if not np.all(seg_beta > 0):
        raise SciquantError(f"bloodflow_1d: stiffness {physics.stiffness} gives β ≤ 0")

    up, down = network.segments[:, 0], network.segments[:, 1]
    is_junction = network.point_junction >= 0
    up_share = np.where(is_junction[down], 1.0, np.where(is_junction[up], 0.0, 0.5))
    length = np.zeros(n_p)
    np.add.at(length, up, up_share * seg_length)
    np.add.at(length, down, (1.0 - up_share) * seg_length)
    area0 = np.zeros(n_p)
    beta = np.zeros(n_p)
    area0[down] = seg_area0
    beta[down] = seg_beta
    area0[up[~is_junction[up]]] = seg_area0[~is_junction[up]]
    beta[up[~is_junction[up]]] = seg_beta[~is_junction[up]]
    enter = np.full(n_p, -1, dtype=np.int64)
    enter[down] = np.arange(n_e)
    leave = np.full(n_p, -1, dtype=np.int64)
    leave[up[~is_junction[up]]] = np.flatnonzero(~is_junction[up])

    stenotic = np.zeros(n_e, dtype=bool)
    resistance = np.zeros(n_e)
    loss = np.zeros(n_e)
    if stenosis is not None:
        stenotic = (network.segment_vessel == stenosis.vessel) & (
            np.abs(seg_mid_arc - (stenosis.start + 0.5 * stenosis.length)) < 0.5 * stenosis.length
        )
        if not stenotic.any():
            raise SciquantError(
                f"bloodflow_1d: the stenosis of vessel {stenosis.vessel} covers no segment"
            )
        share = seg_length * stenotic / seg_length[stenotic].sum()
        r0 = network.tree.vessels[stenosis.vessel].radius
        a0 = math.pi * r0**2
        ratio = 1.0 / stenosis.area_ratio
        k_v = 32.0 * stenosis.length / (2.0 * r0) * ratio**2
        resistance = share * k_v * physics.viscosity / (2.0 * math.pi * r0**3)
        loss = share * YOUNG_TSAI_KT * physics.density / (2.0 * a0**2) * (ratio - 1.0) ** 2

    junctions = network.junctions
    daughters = [np.flatnonzero(up == j) for j in junctions]
    return _Grid(
        length=length,
        area0=area0,
        beta=beta,
        enter=enter,
        leave=leave,
        seg_length=seg_length,
        seg_area0=seg_area0,
        seg_beta=seg_beta,
        stenosis_resistance=resistance,
        stenosis_loss=loss,
        stenotic=stenotic,
        junctions=junctions.astype(np.int64),
        junction_parent=np.array([enter[j] for j in junctions], dtype=np.int64),
        daughter_ptr=np.concatenate([[0], np.cumsum([len(d) for d in daughters])]).astype(np.int64),
        daughter_segments=(
            np.concatenate(daughters).astype(np.int64) if daughters else np.empty(0, np.int64)
        ),
    )


def area_at_pressure(
    pressure: np.ndarray, area0: np.ndarray, beta: np.ndarray, p0: float
) -> np.ndarray:
    """Inverse tube law: A (cm²) at `pressure` (dyn/cm²), A = A0 / (1 − (p − p0)/β)²."""
    return area0 / (1.0 - (pressure - p0) / beta) ** 2


def wave_speed(area: np.ndarray, area0: np.ndarray, beta: np.ndarray, density: float) -> np.ndarray:
    """c = √(A/ρ·∂p/∂A) (cm/s) of the tube law, ∂p/∂A = β √A0 / (2 A^{3/2})."""
    return np.sqrt(beta * np.sqrt(area0 / area) / (2.0 * density))


def stable_time_step(
    network: Network1D,
    physics: Physics1D,
    peak_velocity: float,
    dt_store: float,
    cfl: float,
    pressure_range: tuple[float, float],
) -> float:
    """Largest dt (s) dividing `dt_store` with dt ≤ cfl·h/(|u| + c) on every segment.

    `peak_velocity` (cm/s) bounds |u|; c is taken at the lowest pressure of `pressure_range`
    (dyn/cm²), where the Olufsen tube law is stiffest.
    """
    grid = _grid(network, physics, None)
    area = area_at_pressure(
        np.full_like(grid.seg_area0, pressure_range[0]),
        grid.seg_area0,
        grid.seg_beta,
        physics.reference_pressure,
    )
    speed = wave_speed(area, grid.seg_area0, grid.seg_beta, physics.density) + abs(peak_velocity)
    limit = cfl * float(np.min(grid.seg_length / speed))
    return dt_store / math.ceil(dt_store / limit - 1e-9)


@numba.njit(cache=True)
def _pressure(area: float, area0: float, beta: float, p0: float) -> float:
    return p0 + beta * (1.0 - math.sqrt(area0 / area))


@numba.njit(cache=True)
def _integrate(
    length,
    area0,
    beta,
    enter,
    leave,
    seg_up,
    seg_down,
    seg_length,
    seg_area0,
    stenosis_resistance,
    stenosis_loss,
    stenotic,
    is_junction,
    junctions,
    junction_parent,
    daughter_ptr,
    daughter_segments,
    outlets,
    rp,
    compliance,
    rd,
    inflow_half,
    inflow_whole,
    area,
    flow,
    flow_previous,
    capacitor,
    rho,
    alpha,
    friction,
    p0,
    dt,
    n_steps,
    first_stored,
    store_every,
    out_pressure,
    out_flow,
    out_area,
    out_capacitor,
    out_junction,
):
    n_p = area.shape[0]
    n_e = flow.shape[0]
    n_j = junctions.shape[0]
    pressure = np.empty(n_p)
    new_flow = np.empty(n_e)
    extrapolated = np.empty(n_e)
    flux = np.empty(n_p)
    denominator = np.empty(n_e)
    total = np.empty(n_j)
    is_outlet = np.zeros(n_p, dtype=np.bool_)
    for k in range(outlets.shape[0]):
        is_outlet[outlets[k]] = True
    for step in range(n_steps):
        # (1) volume balance with the half-step flows; outlets implicit with their Windkessel.
        for i in range(n_p):
            if is_junction[i] or is_outlet[i]:
                continue
            q_in = inflow_half[step] if enter[i] < 0 else flow[enter[i]]
            area[i] += dt / length[i] * (q_in - flow[leave[i]])
        for k in range(outlets.shape[0]):
            i = outlets[k]
            # Backward Euler in the point–Rp coupling (the trapezoidal rule is unstable against
            # the explicit momentum update when Rp·C_point ≪ dt); trapezoidal in the capacitor.
            d = compliance[k] / dt + 1.0 / rp[k] + 0.5 / rd[k]
            carried = capacitor[k] * (compliance[k] / dt - 0.5 / rd[k])
            slope = (1.0 - 1.0 / (rp[k] * d)) / rp[k]
            offset = carried / (rp[k] * d)
            a_old = area[i]
            a_new = a_old
            for _ in range(_OUTLET_NEWTON_STEPS):
                p_new = _pressure(a_new, area0[i], beta[i], p0)
                residual = (
                    length[i] * (a_new - a_old) / dt - flow[enter[i]] + slope * p_new - offset
                )
                derivative = (
                    length[i] / dt + 0.5 * slope * beta[i] * math.sqrt(area0[i]) / a_new**1.5
                )
                a_new -= residual / derivative
            area[i] = a_new
            capacitor[k] = (carried + _pressure(a_new, area0[i], beta[i], p0) / rp[k]) / d
        # (2) tube law; flows and convective fluxes extrapolated to the whole step.
        for i in range(n_p):
            if not is_junction[i]:
                pressure[i] = _pressure(area[i], area0[i], beta[i], p0)
        for e in range(n_e):
            extrapolated[e] = 1.5 * flow[e] - 0.5 * flow_previous[e]
        for i in range(n_p):
            if is_junction[i]:
                continue
            # Upwind flux: central differencing of α Q²/A with explicit time stepping is
            # unstable (imaginary eigenvalues); the upwind error is O(h ∂²(Qu)/∂x²), tiny where
            # Q varies over the pulse wavelength c·T ≫ the vessel.
            q_up = inflow_whole[step + 1] if enter[i] < 0 else extrapolated[enter[i]]
            q_down = q_up if leave[i] < 0 else extrapolated[leave[i]]
            q = q_up if q_up + q_down >= 0.0 else q_down
            flux[i] = alpha * q * q / area[i]
        # (3) momentum, trapezoidal friction; junction pressure terms left out, added below.
        for e in range(n_e):
            a = seg_up[e]
            b = seg_down[e]
            qx = extrapolated[e]
            if is_junction[a]:
                side = area[b]
                p_a = -0.5 * rho * (qx / side) ** 2
                p_b = pressure[b]
                f_a = alpha * qx * qx / side
                f_b = flux[b]
                a_e = area[b]
            elif is_junction[b]:
                side = area[a]
                p_a = pressure[a]
                p_b = -0.5 * rho * (qx / side) ** 2
                f_a = flux[a]
                f_b = alpha * qx * qx / side
                a_e = area[a]
            else:
                p_a = pressure[a]
                p_b = pressure[b]
                f_a = flux[a]
                f_b = flux[b]
                a_e = 0.5 * (area[a] + area[b])
            if stenotic[e]:
                inertance = YOUNG_TSAI_KU * rho * seg_length[e] / seg_area0[e]
                resistance = stenosis_resistance[e] + stenosis_loss[e] * abs(qx)
                drive = p_a - p_b
            else:
                inertance = rho * seg_length[e] / a_e
                resistance = rho * seg_length[e] * friction / (a_e * a_e)
                drive = p_a - p_b - rho / a_e * (f_b - f_a)
            denominator[e] = inertance / dt + 0.5 * resistance
            new_flow[e] = ((inertance / dt - 0.5 * resistance) * flow[e] + drive) / denominator[e]
        for j in range(n_j):
            parent = junction_parent[j]
            excess = new_flow[parent]
            weight = 1.0 / denominator[parent]
            for m in range(daughter_ptr[j], daughter_ptr[j + 1]):
                excess -= new_flow[daughter_segments[m]]
                weight += 1.0 / denominator[daughter_segments[m]]
            total[j] = excess / weight
            new_flow[parent] -= total[j] / denominator[parent]
            for m in range(daughter_ptr[j], daughter_ptr[j + 1]):
                d = daughter_segments[m]
                new_flow[d] += total[j] / denominator[d]
            side = area[seg_up[parent]]
            pressure[junctions[j]] = total[j] - 0.5 * rho * (extrapolated[parent] / side) ** 2
        offset = step + 1 - first_stored
        if offset >= 0 and offset % store_every == 0:
            row = offset // store_every
            if row < out_pressure.shape[0]:
                out_pressure[row] = pressure
                for e in range(n_e):
                    out_flow[row, e] = 0.5 * (flow[e] + new_flow[e])
                out_area[row] = area
                out_capacitor[row] = capacitor
                out_junction[row] = total
        for e in range(n_e):
            flow_previous[e] = flow[e]
            flow[e] = new_flow[e]
    return np.isfinite(area).all() and np.isfinite(flow).all()


def simulate_nonlinear(
    network: Network1D,
    windkessels: Sequence[Windkessel],
    inflow,
    period: float,
    physics: Physics1D,
    *,
    initial,
    dt: float,
    dt_store: float,
    n_cycles: int = 3,
    stenosis: Stenosis | None = None,
) -> Solution1D:
    """Integrate the nonlinear 1D equations over `n_cycles` periods (s); return the last cycle.

    `inflow`: vectorised t (s) → inlet flowrate (cm³/s). `windkessels`: one per `network.outlets`
    entry. `initial`: t (s) → (point pressures [N] dyn/cm², segment flowrates [E] cm³/s,
    Windkessel capacitor pressures [n_out] dyn/cm²), e.g. the linear periodic solution; it is
    read at t = 0 (pressures) and t = ±dt/2 (flows). `dt` (s) must divide `dt_store`, which must
    divide `period`.
    """
    store_every = round(dt_store / dt)
    steps_per_cycle = round(period / dt)
    if abs(store_every * dt - dt_store) > 1e-9 * dt_store or store_every < 1:
        raise SciquantError(f"simulate_nonlinear: dt {dt} s does not divide dt_store {dt_store} s")
    if abs(steps_per_cycle * dt - period) > 1e-9 * period or steps_per_cycle % store_every:
        raise SciquantError(
            f"simulate_nonlinear: dt_store {dt_store} s does not divide the period {period} s"
        )
    if n_cycles < 2:
        raise SciquantError(f"simulate_nonlinear: n_cycles must be ≥ 2, got {n_cycles}")
    if len(windkessels) != len(network.outlets):
        raise SciquantError(
            f"simulate_nonlinear: {len(windkessels)} Windkessels for {len(network.outlets)} outlets"
        )
    grid = _grid(network, physics, stenosis)
    n_steps = n_cycles * steps_per_cycle
    half_times = (np.arange(n_steps) + 0.5) * dt
    whole_times = np.arange(n_steps + 1) * dt
    inflow_half = np.ascontiguousarray(np.broadcast_to(inflow(half_times), half_times.shape))
    inflow_whole = np.ascontiguousarray(np.broadcast_to(inflow(whole_times), whole_times.shape))

    pressure0, _, capacitor0 = initial(0.0)
    _, flow_half, _ = initial(0.5 * dt)
    _, flow_before, _ = initial(-0.5 * dt)
    is_junction = network.point_junction >= 0
    area = np.where(
        is_junction,
        0.0,
        area_at_pressure(
            pressure0,
            np.where(is_junction, 1.0, grid.area0),
            np.where(is_junction, 1.0, grid.beta),
            physics.reference_pressure,
        ),
    )
    if not np.all(area[~is_junction] > 0):
        raise SciquantError(
            "simulate_nonlinear: the initial pressure exceeds p0 + β (the tube law has no area)"
        )
    per_cycle = steps_per_cycle // store_every
    n_p, n_e, n_o, n_j = (
        network.n_points,
        network.n_segments,
        len(network.outlets),
        len(grid.junctions),
    )
    stored = {
        "pressure": np.zeros((2 * per_cycle, n_p)),
        "flow": np.zeros((2 * per_cycle, n_e)),
        "area": np.zeros((2 * per_cycle, n_p)),
        "capacitor": np.zeros((2 * per_cycle, n_o)),
        "junction": np.zeros((2 * per_cycle, n_j)),
    }
    first_stored = (n_cycles - 2) * steps_per_cycle
    if first_stored == 0:
        stored["pressure"][0] = pressure0
        stored["flow"][0] = 0.5 * (np.asarray(flow_half) + np.asarray(flow_before))
        stored["area"][0] = area
        stored["capacitor"][0] = capacitor0
    finite = _integrate(
        grid.length,
        grid.area0,
        grid.beta,
        grid.enter,
        grid.leave,
        np.ascontiguousarray(network.segments[:, 0]),
        np.ascontiguousarray(network.segments[:, 1]),
        grid.seg_length,
        grid.seg_area0,
        grid.stenosis_resistance,
        grid.stenosis_loss,
        grid.stenotic,
        is_junction,
        grid.junctions,
        grid.junction_parent,
        grid.daughter_ptr,
        grid.daughter_segments,
        network.outlets.astype(np.int64),
        np.array([w.proximal_resistance for w in windkessels]),
        np.array([w.compliance for w in windkessels]),
        np.array([w.distal_resistance for w in windkessels]),
        inflow_half,
        inflow_whole,
        area,
        np.array(flow_half, dtype=np.float64),
        np.array(flow_before, dtype=np.float64),
        np.array(capacitor0, dtype=np.float64),
        physics.density,
        physics.alpha,
        physics.friction,
        physics.reference_pressure,
        dt,
        n_steps,
        first_stored,
        store_every,
        stored["pressure"],
        stored["flow"],
        stored["area"],
        stored["capacitor"],
        stored["junction"],
    )
    if not finite:
        raise SciquantError(
            f"simulate_nonlinear: the solution blew up (dt {dt:.3g} s too large for the CFL "
            "condition, or a pressure beyond the tube law's p0 + β)"
        )
    errors = [
        np.abs(x[per_cycle:] - x[:per_cycle]).max() / max(np.abs(x[per_cycle:]).max(), 1e-300)
        for x in (stored["pressure"], stored["flow"])
    ]
    steps = first_stored + steps_per_cycle + store_every * np.arange(per_cycle)
    last = slice(per_cycle, None)
    return Solution1D(
        times=whole_times[steps],
        pressure=stored["pressure"][last],
        flowrate=stored["flow"][last],
        inflow=inflow_whole[steps].copy(),
        windkessel_pressure=stored["capacitor"][last],
        area=stored["area"][last],
        junction_total_pressure=stored["junction"][last],
        time_shift=float(whole_times[first_stored + steps_per_cycle]),
        periodicity_error=float(max(errors)),
        dt=dt,
    )
