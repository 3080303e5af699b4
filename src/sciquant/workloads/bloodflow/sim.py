"""Reduced-order (1D, lumped) hemodynamics of random vascular trees, as bloodflow_1d_mgn raw data.

The embedded data source of the bloodflow study: it writes the VMR / PhysicsNeMo `bloodflow_1d_mgn`
raw layout (`vtps/<name>.vtp` + `vtps/dataset_info.json`), so the real-data ingestion reads it
unchanged.

Physics: by default (`SimulationParams.model = "nonlinear"`) the nonlinear 1D equations of
`sciquant.workloads.bloodflow.sim_1d` (tube law, total-pressure junctions, Young–Tsai stenoses,
hidden per-simulation μ, α, p0 and stiffness), started on and calibrated with the linear circuit
below; with `model = "linear"` the linear circuit itself. Linear model, in CGS units (cm, s, g;
pressure dyn/cm², flowrate cm³/s):

- A tree of straight-ish vessels (branches) of constant radius; every vessel is a chain of 1D
  segments with resistance R = 8μh/(πr⁴), inductance L = ρh/(πr²) and compliance
  C = 3πr³h/(2Eh), the wall stiffness Eh/r0 = k1·exp(k2·r0) + k3 (Olufsen et al. 2000).
- Unknowns: a pressure at every point, a flowrate per segment (L dQ/dt + R Q = P_up − P_down) and
  the capacitor pressure of every outlet's RCR Windkessel. A point carries the compliance of half of
  each adjacent segment; a junction point carries none (its halves go to the segments' other ends,
  so the total compliance is conserved) and Kirchhoff's current law holds there as an algebraic
  equation.
- Inlet: prescribed pulsatile flowrate injected at point 0. Outlets: RCR Windkessel (Rp, C, Rd) to a
  distal pressure of 0.
- The linear DAE M x' = A x + b(t) is integrated with BDF2 (one backward-Euler start step), both
  matrices factorised once by sparse LU since dt is constant.

Stored flowrate convention: the flowrate at a point is the flowrate of the segment ENTERING that
point from upstream; at the inlet point it is the imposed inflow. At an outlet point it is the
flowrate that reaches the outlet point, which equals the flowrate into its Windkessel only in steady
state (they differ by C_point·dP/dt). Hence at a junction point J,
flow(J) = Σ flow(first point of each daughter). Written points between simulation points (the
output is finer, `SimulationParams.output_spacing`) hold pressure and flowrate interpolated linearly
along their vessel.

Written files, per simulation `<name>`: `vtps/<name>.vtp` (points in cm, 2-point line cells,
point 0 the inlet, outlets the other degree-1 points; point data `area` (cm²; for the nonlinear
model the cycle-mean lumen area, A0 distended by the tube law, as an image shows it),
`BranchIdTmp` (vessel id, -1 on junction points), `BifurcationId` (junction id, -1 elsewhere),
`pressure_<k>` (dyn/cm²) and `flow_<k>` (cm³/s), float32, k = 0..K−1 every `dt_store` over the
last simulated cycle), and its entry in `vtps/dataset_info.json`: `dt`, `T`, `time_shift` (start
time of the stored cycle), `bc_type` ("RCR"), `R1` (Rp), `C`, `R2` (Rd) and `outlets` (point
ids, ascending; the lists share that order), `periodicity_error`.

Calibration and start: outlet resistances are set so the cycle-mean inlet pressure is a drawn
target, compliances (or, failing that, the inflow's pulsatile amplitude) so the inlet pulse
pressure is; the integration starts on the exact periodic (frequency-domain) solution, so the
stored cycle is periodic after few cycles.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.optimize import brentq
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path
from sciquant.workloads.bloodflow.network import (
    BLOOD_DENSITY,
    BLOOD_VISCOSITY,
    OLUFSEN_STIFFNESS,
    wall_stiffness,
)
from sciquant.workloads.bloodflow.sim_1d import (
    Physics1D,
    Solution1D,
    Stenosis,
    simulate_nonlinear,
    stable_time_step,
)
from sciquant.workloads.bloodflow.sim_params import SimulationParams
from sciquant.workloads.bloodflow.sim_params import params_from_mapping as params_from_mapping
from sciquant.workloads.bloodflow.vtp import Centerline, write_centerline

MMHG = 1333.2
"""dyn/cm² per mmHg."""

# Step of the generated vessel polylines (cm); finer than any default output spacing so that
# resampling along arc length stays smooth.
_POLYLINE_STEP = 0.05
# Samples per period used to measure pulse pressure from the harmonic (frequency-domain) solution.
_PULSE_SAMPLES = 256


# --------------------------------------------------------------------------------------------
# Vascular tree (geometry and topology)


@dataclass(frozen=True, eq=False)
class Vessel:
    """One vessel (branch) of constant radius.

    `points` [n ≥ 2, 3] (cm): centerline polyline from proximal to distal end; `radius` (cm);
    `parent`: index of the parent vessel, -1 for the root.
    """

    points: np.ndarray
    radius: float
    parent: int

    @property
    def length(self) -> float:
        """Arc length of the centerline polyline (cm)."""
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())


@dataclass(frozen=True, eq=False)
class VascularTree:
    """A tree of vessels, validated on construction.

    Vessel 0 is the root (its first point is the inlet); every other vessel comes after its parent
    and starts at the parent's last point (a junction); vessels without daughters end at outlets.
    """

    vessels: tuple[Vessel, ...]

    def __post_init__(self) -> None:
        if not self.vessels:
            raise SciquantError("VascularTree: no vessels")
        for i, vessel in enumerate(self.vessels):
            points = np.asarray(vessel.points, dtype=np.float64)
            if points.ndim != 2 or points.shape[0] < 2 or points.shape[1] != 3:
                raise SciquantError(
                    f"VascularTree: vessel {i} points must be [n ≥ 2, 3], got shape {points.shape}"
                )
            if not (vessel.radius > 0 and math.isfinite(vessel.radius)):
                raise SciquantError(
                    f"VascularTree: vessel {i} radius must be > 0, got {vessel.radius}"
                )
            if vessel.length <= 0:
                raise SciquantError(f"VascularTree: vessel {i} has zero length")
            if (i == 0) != (vessel.parent < 0):
                raise SciquantError(
                    f"VascularTree: vessel {i} has parent {vessel.parent}; only "
                    "vessel 0 (the root) may have parent -1"
                )
            if i > 0:
                if vessel.parent >= i:
                    raise SciquantError(
                        f"VascularTree: vessel {i} has parent {vessel.parent}; a "
                        "parent must come before its daughters"
                    )
                gap = np.linalg.norm(points[0] - self.vessels[vessel.parent].points[-1])
                if gap > 1e-6:
                    raise SciquantError(
                        f"VascularTree: vessel {i} starts {gap:.3g} cm away from "
                        f"the end of its parent {vessel.parent}"
                    )

    @property
    def n_branches(self) -> int:
        """Number of vessels (branches)."""
        return len(self.vessels)

    def children(self) -> list[list[int]]:
        """Daughter vessel indices of every vessel, in index order."""
        out: list[list[int]] = [[] for _ in self.vessels]
        for i, vessel in enumerate(self.vessels[1:], start=1):
            out[vessel.parent].append(i)
        return out


def _orthonormal_frame(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit `direction` d and two unit vectors u, w completing a right-handed frame."""
    d = direction / np.linalg.norm(direction)
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(d, helper)
    u /= np.linalg.norm(u)
    return d, u, np.cross(d, u)


def _curved_polyline(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    max_turn: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A gently curved 3D centerline of arc length `length` (cm) leaving `start` along `direction`.

    The tangent tilts away from `direction` linearly in arc length up to a random total angle
    ≤ `max_turn` (rad), in an azimuth that itself rotates slowly (torsion). Returns the points
    [n, 3] and the unit end tangent [3].
    """
    d, u, w = _orthonormal_frame(direction)
    n = max(2, math.ceil(length / _POLYLINE_STEP))
    turn = rng.uniform(0.0, max_turn)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    twist = rng.uniform(-0.5 * np.pi, 0.5 * np.pi)

    def tangent(s: np.ndarray) -> np.ndarray:
        tilt, azimuth = turn * s, phase + twist * s
        side = np.cos(azimuth)[:, None] * u + np.sin(azimuth)[:, None] * w
        return np.cos(tilt)[:, None] * d + np.sin(tilt)[:, None] * side

    # Midpoint tangents of unit length keep the polyline's arc length exactly `length`.
    steps = tangent((np.arange(n) + 0.5) / n) * (length / n)
    points = start + np.vstack([np.zeros(3), np.cumsum(steps, axis=0)])
    return points, tangent(np.array([1.0]))[0]


def _daughter_fractions(
    rng: np.random.Generator, n_daughters: int, fraction_range: tuple[float, float]
) -> list[float]:
    """Flow shares (sum 1) of the daughters of one junction (2 or 3 daughters)."""
    small = rng.uniform(*fraction_range)
    if n_daughters == 2:
        return [1.0 - small, small]
    # A trifurcation is a bifurcation whose larger daughter splits again at the same point.
    second = rng.uniform(*fraction_range)
    return [(1.0 - small) * (1.0 - second), (1.0 - small) * second, small]


def build_tree(
    rng: np.random.Generator, params: SimulationParams = SimulationParams()
) -> VascularTree:
    """Draw a random vascular tree: topology, Murray's-law radii (cm), 3D curved centerlines (cm).

    Terminal vessels are split with probability ∝ their flow share r^γ, so the tree grows where
    the flow is (large vessels branch, small ones end). Vessels are numbered depth first.
    """
    lo, hi = params.branch_count_range
    n_branches = int(rng.choice([n for n in range(lo, hi + 1) if n != 2]))
    n_tri = (n_branches - 1) % 2
    kinds = [2] * ((n_branches - 1 - 3 * n_tri) // 2) + [3] * n_tri
    rng.shuffle(kinds)

    gamma = params.murray_exponent
    radius = [rng.uniform(*params.root_radius_range)]
    parent = [-1]
    children: list[list[int]] = [[]]
    leaves = [0]
    for n_daughters in kinds:
        weights = np.array([radius[v] ** gamma for v in leaves])
        v = leaves.pop(int(rng.choice(len(leaves), p=weights / weights.sum())))
        for share in _daughter_fractions(rng, n_daughters, params.daughter_flow_fraction_range):
            radius.append(radius[v] * share ** (1.0 / gamma))
            parent.append(v)
            children.append([])
            children[v].append(len(radius) - 1)
            leaves.append(len(radius) - 1)

    order = []
    stack = [0]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(children[v]))
    new_index = {old: new for new, old in enumerate(order)}

    max_turn = math.radians(params.curvature_angle_max_deg)
    angle_lo, angle_hi = (math.radians(a) for a in params.branching_angle_range_deg)
    start = {0: np.zeros(3)}
    direction = {0: _orthonormal_frame(rng.normal(size=3))[0]}
    vessels = []
    for v in order:
        length = rng.uniform(*params.length_range)
        points, end_tangent = _curved_polyline(rng, start[v], direction[v], length, max_turn)
        vessels.append(
            Vessel(
                points=points,
                radius=float(radius[v]),
                parent=new_index[parent[v]] if parent[v] >= 0 else -1,
            )
        )
        if children[v]:
            d, u, w = _orthonormal_frame(end_tangent)
            # Larger daughters deviate less from the parent's direction (as in real bifurcations).
            angles = np.sort(rng.uniform(angle_lo, angle_hi, size=len(children[v])))
            by_size = np.argsort([-radius[c] for c in children[v]], kind="stable")
            phase = rng.uniform(0.0, 2.0 * np.pi)
            for rank, i in enumerate(by_size):
                azimuth = phase + 2.0 * np.pi * i / len(children[v])
                alpha = angles[rank]
                c = children[v][i]
                start[c] = points[-1]
                direction[c] = np.cos(alpha) * d + np.sin(alpha) * (
                    np.cos(azimuth) * u + np.sin(azimuth) * w
                )
    return VascularTree(vessels=tuple(vessels))


# --------------------------------------------------------------------------------------------
# 1D network (the lumped circuit)


@dataclass(frozen=True, eq=False)
class Network1D:
    """The discretised tree: N points, E segments (upstream id < downstream id), outlets.

    Point arrays [N]: `positions` [N, 3] (cm), `compliance` (cm⁵/dyn, 0 on junctions), `area`
    (cm²), `point_vessel` (vessel id, -1 on junctions), `point_junction` (junction id, else -1).
    Segment arrays [E]: `segments` [E, 2] point ids, `resistance` (dyn·s/cm⁵), `inductance`
    (g/cm⁴), `segment_vessel`. `outlets` [n_out] point ids, ascending. Per vessel, the nodes along
    its arc from s = 0 to its length: `vessel_nodes` (point ids, junction ends included),
    `vessel_arc` (cm) and `vessel_flow_index` (index into [segment flowrates..., inflow]: the flow
    entering that node along the vessel).
    """

    tree: VascularTree
    positions: np.ndarray
    compliance: np.ndarray
    area: np.ndarray
    point_vessel: np.ndarray
    point_junction: np.ndarray
    segments: np.ndarray
    resistance: np.ndarray
    inductance: np.ndarray
    segment_vessel: np.ndarray
    outlets: np.ndarray
    vessel_nodes: tuple[np.ndarray, ...]
    vessel_arc: tuple[np.ndarray, ...]
    vessel_flow_index: tuple[np.ndarray, ...]

    @property
    def n_points(self) -> int:
        """Number of points N (pressure unknowns)."""
        return len(self.positions)

    @property
    def n_segments(self) -> int:
        """Number of segments E (flowrate unknowns)."""
        return len(self.segments)

    @property
    def junctions(self) -> np.ndarray:
        """Point ids of the junction points, by junction id."""
        ids = np.flatnonzero(self.point_junction >= 0)
        return ids[np.argsort(self.point_junction[ids])]


def _arc_length(points: np.ndarray) -> np.ndarray:
    """Cumulative arc length [n] (cm) of a polyline [n, 3]."""
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


def _along(points: np.ndarray, arc: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Positions [len(s), 3] at arc lengths `s` (cm) along a polyline with cumulative arc `arc`."""
    return np.stack([np.interp(s, arc, points[:, k]) for k in range(3)], axis=1)


def discretize(
    tree: VascularTree,
    *,
    segment_length: float = 0.35,
    viscosity: float = BLOOD_VISCOSITY,
    density: float = BLOOD_DENSITY,
    stiffness: tuple[float, float, float] = OLUFSEN_STIFFNESS,
) -> Network1D:
    """Discretise a tree into the lumped 1D circuit.

    Every vessel of length l (cm) gets max(2, round(l/segment_length)) equal segments; viscosity in
    P, density in g/cm³, `stiffness` = (k1, k2, k3) of Eh/r0. Points are numbered depth first
    (inlet 0, a junction after its parent's points and before its daughters'), so every segment
    runs from a lower to a higher id.
    """
    for name, value in (
        ("segment_length", segment_length),
        ("viscosity", viscosity),
        ("density", density),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise SciquantError(f"discretize: {name} must be > 0, got {value}")
    children = tree.children()
    positions: list[np.ndarray] = []
    area: list[float] = []
    point_vessel: list[int] = []
    point_junction: list[int] = []
    up: list[int] = []
    down: list[int] = []
    seg_vessel: list[int] = []
    seg_h: list[float] = []
    outlets: list[int] = []
    n_vessels = tree.n_branches
    vessel_nodes: list[np.ndarray] = [np.empty(0, np.int64)] * n_vessels
    vessel_arc: list[np.ndarray] = [np.empty(0)] * n_vessels
    vessel_flow: list[np.ndarray] = [np.empty(0, np.int64)] * n_vessels
    junction_of_vessel: dict[int, int] = {}

    def new_point(position: np.ndarray, vessel: int, junction: int, radius: float) -> int:
        positions.append(position)
        area.append(math.pi * radius**2)
        point_vessel.append(vessel)
        point_junction.append(junction)
        return len(positions) - 1

    inflow = -1  # placeholder index of the inflow in the flow vector, set to E below
    stack = [0]
    while stack:
        v = stack.pop()
        vessel = tree.vessels[v]
        points = np.asarray(vessel.points, dtype=np.float64)
        arc = _arc_length(points)
        n = max(2, round(arc[-1] / segment_length))
        s = np.linspace(0.0, arc[-1], n + 1)
        where = _along(points, arc, s)
        r = vessel.radius
        nodes = [
            new_point(where[0], v, -1, r)
            if vessel.parent < 0
            else junction_of_vessel[vessel.parent]
        ]
        nodes += [new_point(where[k], v, -1, r) for k in range(1, n)]
        if children[v]:
            junction_of_vessel[v] = new_point(where[n], -1, len(junction_of_vessel), r)
            nodes.append(junction_of_vessel[v])
        else:
            nodes.append(new_point(where[n], v, -1, r))
            outlets.append(nodes[-1])
        first_segment = len(up)
        up += nodes[:-1]
        down += nodes[1:]
        seg_vessel += [v] * n
        seg_h += [arc[-1] / n] * n
        segment_ids = list(range(first_segment, first_segment + n))
        vessel_nodes[v] = np.asarray(nodes, dtype=np.int64)
        vessel_arc[v] = s
        # The flow entering node 0 along this vessel: the inflow at the inlet, else the flow of
        # the vessel's first segment (a daughter's profile starts with its own flow, not the
        # parent's).
        vessel_flow[v] = np.asarray(
            [inflow if vessel.parent < 0 else first_segment] + segment_ids, dtype=np.int64
        )
        stack.extend(reversed(children[v]))

    segments = np.stack([up, down], axis=1).astype(np.int64)
    n_segments = len(segments)
    vessel_flow = [np.where(f < 0, n_segments, f) for f in vessel_flow]
    radius = np.array([tree.vessels[v].radius for v in seg_vessel])
    h = np.asarray(seg_h)
    k1, k2, k3 = stiffness
    segment_compliance = 3.0 * np.pi * radius**2 * h / (2.0 * wall_stiffness(radius, k1, k2, k3))
    if not np.all(segment_compliance > 0):
        raise SciquantError(f"discretize: wall stiffness {stiffness} gives non-positive compliance")

    # Half of each segment's compliance to each end; a junction holds none (it is a KCL node), so
    # its half goes to the segment's other end and the vessel's total compliance is conserved.
    is_junction = np.asarray(point_junction) >= 0
    up_share = np.where(
        is_junction[segments[:, 1]], 1.0, np.where(is_junction[segments[:, 0]], 0.0, 0.5)
    )
    compliance = np.zeros(len(positions))
    np.add.at(compliance, segments[:, 0], up_share * segment_compliance)
    np.add.at(compliance, segments[:, 1], (1.0 - up_share) * segment_compliance)

    return Network1D(
        tree=tree,
        positions=np.asarray(positions),
        compliance=compliance,
        area=np.asarray(area),
        point_vessel=np.asarray(point_vessel, dtype=np.int64),
        point_junction=np.asarray(point_junction, dtype=np.int64),
        segments=segments,
        resistance=8.0 * viscosity * h / (np.pi * radius**4),
        inductance=density * h / (np.pi * radius**2),
        segment_vessel=np.asarray(seg_vessel, dtype=np.int64),
        outlets=np.asarray(sorted(outlets), dtype=np.int64),
        vessel_nodes=tuple(vessel_nodes),
        vessel_arc=tuple(vessel_arc),
        vessel_flow_index=tuple(vessel_flow),
    )


# --------------------------------------------------------------------------------------------
# Boundary conditions


@dataclass(frozen=True)
class Windkessel:
    """RCR Windkessel outlet; the distal pressure is 0.

    `proximal_resistance` Rp and `distal_resistance` Rd (dyn·s/cm⁵), `compliance` C (cm⁵/dyn).
    """

    proximal_resistance: float
    compliance: float
    distal_resistance: float

    def __post_init__(self) -> None:
        for name in ("proximal_resistance", "compliance", "distal_resistance"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise SciquantError(f"Windkessel.{name} must be > 0, got {value}")


@dataclass(frozen=True, eq=False)
class InflowWaveform:
    """Periodic inlet flowrate Q(t) = mean + Σ_n a_n·cos(nωt) + b_n·sin(nωt), ω = 2π/T.

    `period` T (s), `mean` (cm³/s), `cosine` a_n and `sine` b_n [n_harmonics] (cm³/s). Calling it
    with times (s, any shape) returns the flowrate (cm³/s, same shape).
    """

    period: float
    mean: float
    cosine: np.ndarray
    sine: np.ndarray

    def __call__(self, t: np.ndarray | float) -> np.ndarray:
        phase = 2.0 * np.pi / self.period * np.asarray(t, dtype=np.float64)[..., None]
        n = np.arange(1, len(self.cosine) + 1)
        return self.mean + (np.cos(n * phase) @ self.cosine + np.sin(n * phase) @ self.sine)

    @property
    def harmonics(self) -> np.ndarray:
        """Complex amplitudes Q̂_n [n_harmonics] with Q(t) = mean + Re Σ Q̂_n e^(i n ω t)."""
        return np.asarray(self.cosine) - 1j * np.asarray(self.sine)


def _periodic_gaussian(t: np.ndarray, center: float, width: float, period: float) -> np.ndarray:
    """A Gaussian pulse of unit height, summed over neighbouring periods so it wraps smoothly."""
    return sum(np.exp(-0.5 * ((t - center - k * period) / width) ** 2) for k in (-2, -1, 0, 1, 2))


def make_inflow(
    rng: np.random.Generator,
    period: float,
    root_radius: float,
    params: SimulationParams = SimulationParams(),
) -> InflowWaveform:
    """Draw a smooth cardiac inflow waveform (cm³/s) of `period` (s) for a root of `root_radius`.

    `root_radius` in cm. A systolic pulse, a small backflow dip and a diastolic bump, projected
    onto the first `params.inflow_harmonics` Fourier harmonics and scaled to the drawn mean and
    peak.
    """
    mean = rng.uniform(*params.mean_velocity_range) * math.pi * root_radius**2
    peak_to_mean = rng.uniform(*params.inflow_peak_to_mean_range)
    # Times in s from the start of the cycle; a systolic pulse of width 0.05–0.08 s ejects over
    # ≈ 0.25–0.35 s, as in the human aorta, independent of the heart rate.
    systole, systole_width = rng.uniform(0.10, 0.16), rng.uniform(0.05, 0.08)
    backflow = rng.uniform(0.0, 0.25)
    backflow_at, backflow_width = systole + rng.uniform(0.14, 0.20), rng.uniform(0.025, 0.045)
    diastole = rng.uniform(0.0, 0.15)
    diastole_at, diastole_width = systole + rng.uniform(0.30, 0.45), rng.uniform(0.05, 0.10)

    n_grid = 1024
    t = np.arange(n_grid) * (period / n_grid)
    shape = (
        _periodic_gaussian(t, systole, systole_width, period)
        - backflow * _periodic_gaussian(t, backflow_at, backflow_width, period)
        + diastole * _periodic_gaussian(t, diastole_at, diastole_width, period)
    )
    spectrum = np.fft.rfft(shape)[1 : params.inflow_harmonics + 1] * (2.0 / n_grid)
    cosine, sine = spectrum.real.copy(), -spectrum.imag.copy()
    oscillation = InflowWaveform(period, 0.0, cosine, sine)(t)
    scale = (peak_to_mean - 1.0) * mean / oscillation.max()
    return InflowWaveform(period=period, mean=mean, cosine=cosine * scale, sine=sine * scale)


# --------------------------------------------------------------------------------------------
# The linear DAE  M x' = A x + e_0 Q_in(t),
# x = [pressures (N), flowrates (E), Windkessel capacitor pressures (n_out)]


@dataclass(frozen=True, eq=False)
class _System:
    """The circuit's DAE M x' = A x + e_0 Q_in(t).

    `m` [n]: diagonal of M; `minus_a`: −A [n, n] (csc) with every diagonal entry stored, so σ·M − A
    is formed by editing its data at the `diagonal` positions.
    """

    m: np.ndarray
    minus_a: sp.csc_matrix
    diagonal: np.ndarray

    def shifted(self, sigma: complex | float, m: np.ndarray | None = None) -> sp.csc_matrix:
        """σ·M − A (csc); `m` replaces the diagonal of M if given."""
        data = self.minus_a.data.astype(np.complex128 if np.iscomplexobj(sigma) else np.float64)
        data[self.diagonal] += sigma * (self.m if m is None else m)
        return sp.csc_matrix(
            (data, self.minus_a.indices, self.minus_a.indptr), shape=self.minus_a.shape
        )


def _system(network: Network1D, windkessels: Sequence[Windkessel]) -> _System:
    """Assemble the circuit; row 0 (the inlet point) is the one that receives Q_in(t)."""
    n_p, n_e, n_o = network.n_points, network.n_segments, len(network.outlets)
    if len(windkessels) != n_o:
        raise SciquantError(f"simulate: {len(windkessels)} Windkessels for {n_o} outlets")
    n = n_p + n_e + n_o
    up, down = network.segments[:, 0], network.segments[:, 1]
    q = n_p + np.arange(n_e)
    outlet = network.outlets
    capacitor = n_p + n_e + np.arange(n_o)
    g_p = np.array([1.0 / w.proximal_resistance for w in windkessels])
    g_d = np.array([1.0 / w.distal_resistance for w in windkessels])
    diagonal = np.arange(n)
    rows = np.concatenate([down, up, q, q, q, outlet, outlet, capacitor, capacitor, diagonal])
    cols = np.concatenate([q, q, up, down, q, outlet, capacitor, outlet, capacitor, diagonal])
    vals = np.concatenate(
        [
            np.ones(n_e),
            -np.ones(n_e),  # mass balance: a segment's flow leaves `up`, enters `down`
            np.ones(n_e),
            -np.ones(n_e),
            -network.resistance,  # L dQ/dt = P_up − P_down − R Q
            -g_p,
            g_p,  # flow leaving each outlet point through Rp
            g_p,
            -(g_p + g_d),  # C dPc/dt = (P_out − Pc)/Rp − Pc/Rd
            np.zeros(n),  # explicit diagonal (junction rows have none) for fast σ·M − A
        ]
    )
    minus_a = sp.csc_matrix((-vals, (rows, cols)), shape=(n, n))
    minus_a.sort_indices()
    col_of_entry = np.repeat(np.arange(n), np.diff(minus_a.indptr))
    positions = np.flatnonzero(minus_a.indices == col_of_entry)
    m = np.concatenate(
        [network.compliance, network.inductance, [w.compliance for w in windkessels]]
    )
    return _System(m=m, minus_a=minus_a, diagonal=positions)


def _steady_state(system: _System, inflow: float) -> np.ndarray:
    """State [n] for a constant inflow (cm³/s): solve 0 = A x + e_0 Q."""
    rhs = np.zeros(len(system.m))
    rhs[0] = inflow
    return spla.splu(system.shifted(0.0)).solve(rhs)


def _harmonic_states(
    system: _System, inflow: InflowWaveform, m: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact periodic solution of the DAE: mean state [n] and complex amplitudes [H, n].

    x(t) = mean + Re Σ_h x̂_h e^(i h ω t), each x̂_h solving (i h ω M − A) x̂_h = e_0 Q̂_h. `m`
    overrides the diagonal of M.
    """
    x_mean = _steady_state(system, inflow.mean)
    omega = 2.0 * np.pi / inflow.period
    amplitudes = np.empty((len(inflow.cosine), len(system.m)), dtype=np.complex128)
    rhs = np.zeros(len(system.m), dtype=np.complex128)
    for h, q_hat in enumerate(inflow.harmonics, start=1):
        rhs[0] = q_hat
        amplitudes[h - 1] = spla.splu(system.shifted(1j * h * omega, m)).solve(rhs)
    return x_mean, amplitudes


def _evaluate_harmonics(
    x_mean: np.ndarray, amplitudes: np.ndarray, period: float, times: np.ndarray
) -> np.ndarray:
    """States [len(times), n] of a harmonic solution at `times` (s)."""
    h = np.arange(1, len(amplitudes) + 1)
    phase = np.exp(1j * 2.0 * np.pi / period * np.outer(times, h))
    return x_mean + (phase @ amplitudes).real


def periodic_state(
    network: Network1D, windkessels: Sequence[Windkessel], inflow: InflowWaveform, times: np.ndarray
) -> np.ndarray:
    """Exact periodic (frequency-domain) solution at `times` (s), states [len(times), n].

    State order: pressures [N] (dyn/cm²), segment flowrates [E] (cm³/s), Windkessel capacitor
    pressures [n_out] (dyn/cm²).
    """
    x_mean, amplitudes = _harmonic_states(_system(network, windkessels), inflow)
    return _evaluate_harmonics(x_mean, amplitudes, inflow.period, np.asarray(times, float))


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """The last simulated cycle, sampled every stored step (K steps).

    `times` [K] (s, from `time_shift`), `pressure` [K, N] (dyn/cm², per point), `flowrate` [K, E]
    (cm³/s, per segment), `inflow` [K] (cm³/s), `windkessel_pressure` [K, n_out] (dyn/cm², capacitor
    of each outlet), `periodicity_error`: max over pressure and flowrate of
    max|x_last − x_previous| / max|x_last| between the last two cycles.
    """

    times: np.ndarray
    pressure: np.ndarray
    flowrate: np.ndarray
    inflow: np.ndarray
    windkessel_pressure: np.ndarray
    time_shift: float
    periodicity_error: float


def simulate(
    network: Network1D,
    windkessels: Sequence[Windkessel],
    inflow: Callable[[np.ndarray], np.ndarray],
    period: float,
    *,
    n_cycles: int = 3,
    dt: float = 1e-3,
    store_every: int = 5,
    initial: str | np.ndarray = "steady",
) -> SimulationResult:
    """Integrate the circuit with BDF2 over `n_cycles` periods (s) and return the last cycle.

    `inflow`: vectorised t (s) → inlet flowrate (cm³/s). `windkessels`: one per `network.outlets`
    entry, same order. `dt` (s) must divide `period`, `store_every` (steps) the steps per cycle.
    `initial`: "steady" (the steady state for the cycle-mean inflow), "zero", or a state vector.
    """
    steps_per_cycle = round(period / dt)
    if steps_per_cycle < 1 or abs(steps_per_cycle * dt - period) > 1e-9 * period:
        raise SciquantError(f"simulate: period {period} s is not a multiple of dt {dt} s")
    if store_every < 1 or steps_per_cycle % store_every:
        raise SciquantError(
            f"simulate: store_every {store_every} does not divide the "
            f"{steps_per_cycle} steps of a cycle"
        )
    if n_cycles < 2:
        raise SciquantError(
            f"simulate: n_cycles must be ≥ 2 (got {n_cycles}) to measure periodicity"
        )
    n_steps = n_cycles * steps_per_cycle
    t = np.arange(n_steps + 1) * dt
    q_in = np.broadcast_to(np.asarray(inflow(t), dtype=np.float64), t.shape)
    system = _system(network, windkessels)
    n = len(system.m)

    if isinstance(initial, str):
        if initial == "steady":
            x = _steady_state(system, float(q_in[-steps_per_cycle - 1 : -1].mean()))
        elif initial == "zero":
            x = np.zeros(n)
        else:
            raise SciquantError(
                f"simulate: initial must be 'steady', 'zero' or a state, got {initial!r}"
            )
    else:
        x = np.asarray(initial, dtype=np.float64).copy()
        if x.shape != (n,):
            raise SciquantError(f"simulate: initial state has shape {x.shape}, expected ({n},)")

    per_cycle = steps_per_cycle // store_every
    first_stored = (n_cycles - 2) * steps_per_cycle
    stored = np.empty((2 * per_cycle, n))

    def store(step: int, state: np.ndarray) -> None:
        offset = step - first_stored
        if offset >= 0 and offset % store_every == 0:
            stored[offset // store_every] = state

    m_dt = system.m / dt
    # dt is constant, so each implicit matrix is factorised once; BDF2 needs one backward-Euler
    # start step. Both damp the index-2 junction constraints' modes (trapezoidal would not).
    euler = spla.splu(system.shifted(1.0 / dt))
    bdf2 = spla.splu(system.shifted(1.5 / dt))
    store(0, x)
    rhs = m_dt * x
    rhs[0] += q_in[1]
    x_previous, x = x, euler.solve(rhs)
    store(1, x)
    for step in range(2, n_steps):
        rhs = m_dt * (2.0 * x - 0.5 * x_previous)
        rhs[0] += q_in[step]
        x_previous, x = x, bdf2.solve(rhs)
        store(step, x)

    n_p, n_e = network.n_points, network.n_segments
    previous, last = stored[:per_cycle], stored[per_cycle:]
    errors = [
        np.abs(last[:, cols] - previous[:, cols]).max() / max(np.abs(last[:, cols]).max(), 1e-300)
        for cols in (slice(0, n_p), slice(n_p, n_p + n_e))
    ]
    steps = first_stored + steps_per_cycle + store_every * np.arange(per_cycle)
    return SimulationResult(
        times=t[steps],
        pressure=last[:, :n_p],
        flowrate=last[:, n_p : n_p + n_e],
        inflow=np.array(q_in[steps]),
        windkessel_pressure=last[:, n_p + n_e :],
        time_shift=float(t[first_stored + steps_per_cycle]),
        periodicity_error=float(max(errors)),
    )


# --------------------------------------------------------------------------------------------
# Windkessel calibration


def steady_pressures(
    network: Network1D, outlet_flowrates: np.ndarray, inlet_pressure: float
) -> np.ndarray:
    """Steady point pressures [N] (dyn/cm²) for prescribed outlet flowrates.

    `outlet_flowrates` [n_out] (cm³/s, `network.outlets` order); `inlet_pressure` (dyn/cm²).
    """
    demand = np.zeros(network.n_points)
    demand[network.outlets] = outlet_flowrates
    entering = np.full(network.n_points, -1)
    entering[network.segments[:, 1]] = np.arange(network.n_segments)
    flow = np.zeros(network.n_segments)
    # Depth-first numbering puts every point after its upstream neighbour, so a reverse sweep
    # accumulates downstream demand and a forward sweep integrates the pressure drops.
    for point in range(network.n_points - 1, 0, -1):
        e = entering[point]
        flow[e] = demand[point]
        demand[network.segments[e, 0]] += demand[point]
    pressure = np.empty(network.n_points)
    pressure[0] = inlet_pressure
    for point in range(1, network.n_points):
        e = entering[point]
        pressure[point] = pressure[network.segments[e, 0]] - network.resistance[e] * flow[e]
    return pressure


def calibrate_boundary_conditions(
    rng: np.random.Generator,
    network: Network1D,
    inflow: InflowWaveform,
    params: SimulationParams = SimulationParams(),
) -> tuple[tuple[Windkessel, ...], InflowWaveform]:
    """Draw outlet RCR Windkessels that give the inlet a drawn mean and pulse pressure.

    Returns the Windkessels (`network.outlets` order) and the inflow, whose pulsatile part may be
    rescaled (see below).

    Mean: each outlet's mean flow share ∝ r^γ (jittered); its Rp + Rd is its steady pressure over
    its flow, so the cycle-mean inlet pressure is the target exactly. Pulse: all Windkessel
    compliances (∝ flow share, one common time constant (Rp + Rd)·C) are scaled by one factor found
    by root finding on the exact periodic (frequency-domain) inlet pressure. Where no time constant
    in `params.windkessel_time_constant_range` reaches the target (the tree's own compliance or
    inertance dominates), the inflow's pulsatile part is scaled instead (pressure is linear in
    it), within `params.inflow_pulse_scale_range`.
    """
    mean_target = rng.uniform(*params.mean_pressure_range_mmhg) * MMHG
    pulse_target = rng.uniform(*params.pulse_pressure_range_mmhg) * MMHG
    proximal_fraction = rng.uniform(*params.proximal_resistance_fraction_range)
    outlet_vessels = network.point_vessel[network.outlets]
    radius = np.array([network.tree.vessels[v].radius for v in outlet_vessels])
    n_out = len(radius)
    share = radius**params.murray_exponent * (
        1.0 + params.outlet_flow_jitter * rng.uniform(-1.0, 1.0, size=n_out)
    )
    share /= share.sum()
    fraction = np.minimum(proximal_fraction * rng.uniform(0.8, 1.2, size=n_out), 0.95)

    outlet_flow = share * inflow.mean
    outlet_pressure = steady_pressures(network, outlet_flow, mean_target)[network.outlets]
    if outlet_pressure.min() < 0.2 * mean_target:
        raise SciquantError(
            "SimulationParams: the tree's own resistance drops the mean pressure below 20 % of "
            f"the target at an outlet ({outlet_pressure.min() / MMHG:.1f} mmHg); raise "
            "root_radius_range or mean_pressure_range_mmhg, or shorten length_range"
        )
    total_resistance = outlet_pressure / outlet_flow
    # Compliance per unit time constant: C_k = τ · share_k · Q̄ / P̄ (≈ τ / (Rp + Rd)_k).
    unit_compliance = share * inflow.mean / mean_target

    system = _system(
        network,
        [
            Windkessel(float(r * f), float(c), float(r * (1.0 - f)))
            for r, f, c in zip(total_resistance, fraction, unit_compliance, strict=True)
        ],
    )
    capacitors = slice(network.n_points + network.n_segments, None)
    samples = np.arange(_PULSE_SAMPLES) * (inflow.period / _PULSE_SAMPLES)

    def pulse_pressure(log_tau: float) -> float:
        m = system.m.copy()
        m[capacitors] = math.exp(log_tau) * unit_compliance
        x_mean, amplitudes = _harmonic_states(system, inflow, m)
        inlet = _evaluate_harmonics(x_mean[:1], amplitudes[:, :1], inflow.period, samples)
        return float(np.ptp(inlet))

    low, high = (math.log(t) for t in params.windkessel_time_constant_range)
    pulse_scale = 1.0
    if (pulse_high := pulse_pressure(high)) > pulse_target:
        log_tau, pulse_scale = high, pulse_target / pulse_high
    elif (pulse_low := pulse_pressure(low)) < pulse_target:
        log_tau, pulse_scale = low, pulse_target / pulse_low
    else:
        log_tau = brentq(lambda t: pulse_pressure(t) - pulse_target, low, high, xtol=1e-3)
    pulse_scale = float(np.clip(pulse_scale, *params.inflow_pulse_scale_range))
    compliance = math.exp(log_tau) * unit_compliance
    windkessels = tuple(
        Windkessel(float(r * f), float(c), float(r * (1.0 - f)))
        for r, f, c in zip(total_resistance, fraction, compliance, strict=True)
    )
    inflow = InflowWaveform(
        inflow.period, inflow.mean, inflow.cosine * pulse_scale, inflow.sine * pulse_scale
    )
    return windkessels, inflow


# --------------------------------------------------------------------------------------------
# One simulation and the written data set


@dataclass(frozen=True, eq=False)
class SimulatedCase:
    """Everything about one synthetic simulation: geometry, circuit, boundary conditions, result.

    `physics`: the nonlinear model's constants (None for the linear model); `stenosis`: the tree's
    Young–Tsai stenosis, if any; `result`: SimulationResult (linear) or Solution1D (nonlinear).
    """

    tree: VascularTree
    network: Network1D
    windkessels: tuple[Windkessel, ...]
    inflow: InflowWaveform
    result: SimulationResult | Solution1D
    physics: Physics1D | None = None
    stenosis: Stenosis | None = None


def draw_stenosis(
    rng: np.random.Generator, network: Network1D, params: SimulationParams
) -> Stenosis | None:
    """With probability `params.stenosis_probability`, a stenosis in a vessel that holds it.

    A vessel holds a stenosis of length L_s (cm) if L_s plus one segment on each side fits in it
    and its generation (root 0, its daughters 1, ...) is at most `stenosis_max_generation`; the
    stenosis starts ≥ one segment from either end.
    """
    if rng.uniform() >= params.stenosis_probability:
        return None
    length = rng.uniform(*params.stenosis_length_range)
    reduction = rng.uniform(*params.stenosis_area_reduction_range)
    generation = np.zeros(network.tree.n_branches, dtype=np.int64)
    for v, vessel in enumerate(network.tree.vessels[1:], start=1):
        generation[v] = generation[vessel.parent] + 1
    candidates = []
    for v, arc in enumerate(network.vessel_arc):
        h = arc[-1] / (len(arc) - 1)
        if generation[v] > params.stenosis_max_generation:
            continue
        if arc[-1] - 2.0 * h >= length + 0.5 * h:
            candidates.append((v, h, arc[-1]))
    if not candidates:
        return None
    v, h, total = candidates[int(rng.integers(len(candidates)))]
    start = rng.uniform(h, total - h - length)
    return Stenosis(vessel=v, start=float(start), length=float(length), area_ratio=1.0 - reduction)


def _draw_physics(rng: np.random.Generator, params: SimulationParams) -> Physics1D:
    """The hidden per-simulation constants (μ, α, p0, stiffness scale)."""
    scale = rng.uniform(*params.stiffness_scale_range)
    return Physics1D(
        viscosity=float(rng.uniform(*params.viscosity_range)),
        density=params.density,
        alpha=float(rng.uniform(*params.velocity_profile_range)),
        reference_pressure=float(rng.uniform(*params.reference_pressure_range_mmhg) * MMHG),
        stiffness=(params.stiffness_k1 * scale, params.stiffness_k2, params.stiffness_k3 * scale),
    )


def _harmonic_initial(
    network: Network1D, windkessels: Sequence[Windkessel], inflow: InflowWaveform
) -> Callable[[float], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """t (s) → (point pressures, segment flowrates, capacitor pressures) of the linear periodic
    solution."""
    x_mean, amplitudes = _harmonic_states(_system(network, windkessels), inflow)
    n_p, n_e = network.n_points, network.n_segments

    def state(t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = _evaluate_harmonics(x_mean, amplitudes, inflow.period, np.array([t]))[0]
        return x[:n_p], x[n_p : n_p + n_e], x[n_p + n_e :]

    return state


def run_nonlinear(
    network: Network1D,
    windkessels: Sequence[Windkessel],
    inflow: InflowWaveform,
    physics: Physics1D,
    params: SimulationParams = SimulationParams(),
    stenosis: Stenosis | None = None,
) -> Solution1D:
    """The nonlinear 1D run started on the linear periodic solution, dt from the CFL condition."""
    initial = _harmonic_initial(network, windkessels, inflow)
    samples = periodic_state(
        network, windkessels, inflow, np.linspace(0.0, inflow.period, 64, endpoint=False)
    )
    n_p, n_e = network.n_points, network.n_segments
    peak_velocity = float(
        np.max(np.abs(samples[:, n_p : n_p + n_e]) / network.area[network.segments[:, 1]])
    )
    lowest = min(0.0, float(samples[:, :n_p].min()))
    dt = stable_time_step(
        network, physics, 1.5 * peak_velocity, params.dt_store, params.cfl, (lowest, 0.0)
    )
    return simulate_nonlinear(
        network,
        windkessels,
        inflow,
        inflow.period,
        physics,
        initial=initial,
        dt=dt,
        dt_store=params.dt_store,
        n_cycles=params.n_cycles,
        stenosis=stenosis,
    )


def run_case(seed: int, index: int, params: SimulationParams = SimulationParams()) -> SimulatedCase:
    """Simulation `index` of data set `seed`; its generator is seeded from (seed, index) only.

    Boundary conditions are calibrated on the linear circuit with the simulation's own μ and
    stiffness; the nonlinear run then departs from the targets through its physics.
    """
    rng = np.random.default_rng([seed, index])
    tree = build_tree(rng, params)
    physics = _draw_physics(rng, params)
    network = discretize(
        tree,
        segment_length=params.segment_length,
        viscosity=physics.viscosity,
        density=params.density,
        stiffness=physics.stiffness,
    )
    # Rounded so the file's T has no binary noise (0.83, not 0.8300000000000001).
    period = round(
        max(4, round(rng.uniform(*params.period_range) / params.dt_store)) * params.dt_store, 12
    )
    inflow = make_inflow(rng, period, tree.vessels[0].radius, params)
    windkessels, inflow = calibrate_boundary_conditions(rng, network, inflow, params)
    if params.model == "nonlinear":
        stenosis = draw_stenosis(rng, network, params)
        result = run_nonlinear(network, windkessels, inflow, physics, params, stenosis)
        return SimulatedCase(tree, network, windkessels, inflow, result, physics, stenosis)
    # Start on the exact periodic solution so the integrated cycles are periodic from the start.
    initial = periodic_state(network, windkessels, inflow, np.zeros(1))[0]
    result = simulate(
        network,
        windkessels,
        inflow,
        period,
        n_cycles=params.n_cycles,
        dt=params.dt_store / params.substeps,
        store_every=params.substeps,
        initial=initial,
    )
    return SimulatedCase(tree, network, windkessels, inflow, result)


def _dilation(case: SimulatedCase, nodes: np.ndarray, pieces: int) -> np.ndarray:
    """Cycle-mean lumen area over reference area A0 along one vessel's written points.

    The nonlinear model's vessels distend under pressure (tube law): the written `area` is the
    lumen an image of the vessel shows, its cycle mean, not the unloaded A0 — the same for real
    data, whose centerline areas come from segmented images. The ratio is taken at the vessel's
    simulation points (at a junction end: the point before it) and interpolated linearly
    between them. 1 everywhere for the linear model, whose areas do not change.
    """
    if not isinstance(case.result, Solution1D):
        return np.ones((len(nodes) - 1) * pieces + 1)
    mean_area = case.result.area[:, nodes].mean(axis=0)
    reference = case.network.area[nodes]
    valid = mean_area > 0  # junction points hold no area
    if not valid.any():
        return np.ones((len(nodes) - 1) * pieces + 1)
    abscissa = np.arange(len(nodes)) * pieces
    # np.interp holds the end values: a junction end takes its neighbour's ratio.
    return np.interp(
        np.arange((len(nodes) - 1) * pieces + 1),
        abscissa[valid],
        mean_area[valid] / reference[valid],
    )


def centerline_output(
    case: SimulatedCase, output_spacing: float = 0.1
) -> tuple[Centerline, np.ndarray]:
    """The `.vtp` content of a case and the written point id of every network point [N].

    Each segment is split into max(1, round(h/output_spacing)) pieces; pressure and flowrate are
    interpolated linearly along each vessel between its nodes (flow at a node = flow entering it
    along that vessel). Written arrays: `area` (cm², float64), `BranchIdTmp`, `BifurcationId`
    (int32), `pressure_<k>` (dyn/cm²) and `flow_<k>` (cm³/s) (float32), k = 0..K−1.
    """
    network, result = case.network, case.result
    n_p, n_e = network.n_points, network.n_segments
    children = network.tree.children()
    points: list[np.ndarray] = []
    area: list[float] = []
    branch: list[int] = []
    bifurcation: list[int] = []
    edges: list[tuple[int, int]] = []
    p_rows: list[int] = []
    p_cols: list[int] = []
    p_vals: list[float] = []
    q_rows: list[int] = []
    q_cols: list[int] = []
    q_vals: list[float] = []
    written = np.full(n_p, -1, dtype=np.int64)
    daughters_of_junction: dict[int, list[int]] = {}

    def emit(
        position: np.ndarray,
        cross_section: float,
        vessel: int,
        junction: int,
        pressure: list[tuple[int, float]],
        flow: list[tuple[int, float]],
    ) -> int:
        row = len(points)
        points.append(position)
        area.append(cross_section)
        branch.append(vessel)
        bifurcation.append(junction)
        for col, weight in pressure:
            p_rows.append(row)
            p_cols.append(col)
            p_vals.append(weight)
        for col, weight in flow:
            q_rows.append(row)
            q_cols.append(col)
            q_vals.append(weight)
        return row

    stack = [0]
    while stack:
        v = stack.pop()
        vessel = network.tree.vessels[v]
        nodes, arc, flow_index = (
            network.vessel_nodes[v],
            network.vessel_arc[v],
            network.vessel_flow_index[v],
        )
        n = len(nodes) - 1
        pieces = max(1, round((arc[-1] / n) / output_spacing))
        polyline = np.asarray(vessel.points, dtype=np.float64)
        positions = _along(polyline, _arc_length(polyline), np.linspace(0, arc[-1], n * pieces + 1))
        cross_section = math.pi * vessel.radius**2
        if case.stenosis is not None and case.stenosis.vessel == v:
            written_area = case.stenosis.area(
                np.linspace(0, arc[-1], n * pieces + 1), cross_section
            )
        else:
            written_area = np.full(n * pieces + 1, cross_section)
        written_area = written_area * _dilation(case, nodes, pieces)
        ends_in_junction = bool(children[v])
        first = 0 if vessel.parent < 0 else 1
        last = n * pieces - 1 if ends_in_junction else n * pieces
        previous = written[nodes[0]] if vessel.parent >= 0 else None
        for j in range(first, last + 1):
            k, r = divmod(j, pieces)
            t = r / pieces
            if r == 0:
                pressure, flow = [(nodes[k], 1.0)], [(flow_index[k], 1.0)]
            else:
                pressure = [(nodes[k], 1.0 - t), (nodes[k + 1], t)]
                # Equal flow indices (a daughter's first segment) must give that flow exactly.
                flow = (
                    [(flow_index[k], 1.0)]
                    if flow_index[k] == flow_index[k + 1]
                    else [(flow_index[k], 1.0 - t), (flow_index[k + 1], t)]
                )
            row = emit(positions[j], float(written_area[j]), v, -1, pressure, flow)
            if r == 0:
                written[nodes[k]] = row
            if previous is not None:
                edges.append((int(previous), row))
            if j == 1 and vessel.parent >= 0:
                daughters_of_junction[int(previous)].append(row)
            previous = row
        if ends_in_junction:
            junction = nodes[n]
            row = emit(
                positions[-1],
                cross_section,
                -1,
                int(network.point_junction[junction]),
                [(junction, 1.0)],
                [(flow_index[n], 1.0)],
            )
            written[junction] = row
            edges.append((int(previous), row))
            daughters_of_junction[row] = []
        stack.extend(reversed(children[v]))

    n_out = len(points)
    interp_p = sp.csr_matrix((p_vals, (p_rows, p_cols)), shape=(n_out, n_p))
    interp_q = sp.csr_matrix((q_vals, (q_rows, q_cols)), shape=(n_out, n_e + 1))
    pressure = (interp_p @ result.pressure.T).astype(np.float32)
    flows = np.concatenate([result.flowrate, result.inflow[:, None]], axis=1)
    flowrate64 = interp_q @ flows.T
    flowrate = flowrate64.astype(np.float32)
    # flow(J) is the parent's last segment flow, equal to the daughters' sum up to solver round-off
    # (checked here). Rounding Q_in and each Q_out to float32 independently would break
    # |Q_in − ΣQ_out| ≤ 1e-6·|Q_in| when Q_in ≈ 0 with opposite daughter flows, so flow(J) is
    # written as the float32 rounding of the written daughters' sum.
    for junction, daughters in daughters_of_junction.items():
        residual = np.abs(flowrate64[junction] - flowrate64[daughters].sum(axis=0)).max()
        if residual > 1e-8 * np.abs(flowrate64[[junction, *daughters]]).max():
            raise RuntimeError(
                f"bloodflow_sim: Kirchhoff residual {residual:.3g} cm³/s at "
                f"written junction point {junction} (internal error)"
            )
        flowrate[junction] = flowrate[daughters].astype(np.float64).sum(axis=0).astype(np.float32)

    point_data: dict[str, np.ndarray] = {
        "area": np.asarray(area, dtype=np.float64),
        "BranchIdTmp": np.asarray(branch, dtype=np.int32),
        "BifurcationId": np.asarray(bifurcation, dtype=np.int32),
    }
    for k in range(pressure.shape[1]):
        point_data[f"pressure_{k}"] = pressure[:, k]
    for k in range(flowrate.shape[1]):
        point_data[f"flow_{k}"] = flowrate[:, k]
    centerline = Centerline(
        points=np.asarray(points), edges=np.asarray(edges, dtype=np.int64), point_data=point_data
    )
    return centerline, written


def dataset_info_entry(case: SimulatedCase, written: np.ndarray, dt_store: float) -> dict[str, Any]:
    """The `dataset_info.json` entry of a case (outlet lists by ascending written point id)."""
    outlets = written[case.network.outlets]
    order = np.argsort(outlets)
    wk = [case.windkessels[i] for i in order]
    return {
        "dt": float(dt_store),
        "T": float(case.inflow.period),
        "time_shift": round(float(case.result.time_shift), 12),
        "bc_type": "RCR",
        "R1": [w.proximal_resistance for w in wk],
        "C": [w.compliance for w in wk],
        "R2": [w.distal_resistance for w in wk],
        "outlets": [int(o) for o in outlets[order]],
        "periodicity_error": float(case.result.periodicity_error),
    }


def synthesize(
    out_dir: Path,
    n_simulations: int,
    seed: int,
    params: SimulationParams = SimulationParams(),
    progress: bool = True,
) -> list[str]:
    """Write `n_simulations` simulations to `out_dir/vtps/` and return their names (`sim_<iii>`).

    Files: `vtps/<name>.vtp` and `vtps/dataset_info.json` (see the module docstring). Simulation i
    depends on (seed, i) and `params` only, so it is the same whatever `n_simulations`.

    Synthesis owns `out_dir`: afterwards it holds exactly these files (`sciquant synthesize` then
    adds `manifest.json`). What an earlier synthesis left there, more simulations included, is
    removed first, its `manifest.json` before anything else, so an interrupted run never leaves
    a folder that looks complete. A folder holding anything else (a download, other files) is
    refused with a `SciquantError` before anything is removed; see `_clear_earlier_synthesis`.
    """
    if not isinstance(n_simulations, int | np.integer) or n_simulations < 0:
        raise SciquantError(
            f"synthesize: n_simulations must be an integer ≥ 0, got {n_simulations!r}"
        )
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise SciquantError(f"synthesize: seed must be an integer ≥ 0, got {seed!r}")
    _clear_earlier_synthesis(Path(out_dir))
    vtps = Path(out_dir) / "vtps"
    vtps.mkdir(parents=True, exist_ok=True)
    # Multithreaded BLAS sums in an order that depends on the thread count: one thread keeps the
    # raw files bit-identical on every machine and under every scheduler.
    with threadpool_limits(limits=1, user_api="blas"):
        return _synthesize(vtps, n_simulations, seed, params, progress)


# The files a synthesis leaves in its output folder, relative to it: the simulations, their
# dataset_info.json and the manifest written by `sciquant synthesize`, and the temporary names
# (`.<stem>.<random><suffix>`, see `sciquant.provenance.atomic_path`) an interrupted write leaves.
_OWN_FILE = re.compile(
    r"vtps/sim_\d{3,}\.vtp|vtps/\.sim_\d{3,}\.[^/]+\.vtp"
    r"|vtps/dataset_info\.json|vtps/\.dataset_info\.[^/]+\.json"
    r"|manifest\.json|\.manifest\.[^/]+\.json"
)


def _clear_earlier_synthesis(out_dir: Path) -> None:
    """Remove what an earlier synthesis left in `out_dir` (`_OWN_FILE`, the `vtps` folder), or
    refuse a folder it did not write (`sciquant.data.manifest.clear_earlier_synthesis`)."""
    from sciquant.data.manifest import clear_earlier_synthesis

    clear_earlier_synthesis(out_dir, _OWN_FILE, "blood-flow simulator", subfolders=("vtps",))


def _synthesize(
    vtps: Path, n_simulations: int, seed: int, params: SimulationParams, progress: bool
) -> list[str]:
    """`synthesize`'s loop over the simulations."""
    info: dict[str, Any] = {}
    names = []
    for index in tqdm(
        range(n_simulations), desc="bloodflow simulations", unit="sim", disable=not progress
    ):
        name = f"sim_{index:03d}"
        case = run_case(int(seed), index, params)
        centerline, written = centerline_output(case, params.output_spacing)
        write_centerline(vtps / f"{name}.vtp", centerline)
        info[name] = dataset_info_entry(case, written, params.dt_store)
        names.append(name)
    with atomic_path(vtps / "dataset_info.json") as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    return names
