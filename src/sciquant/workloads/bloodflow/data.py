"""Blood-flow ingestion: VMR centerlines (`vtps/*.vtp` + `dataset_info.json`) → graph samples.

Graphs are built as PhysicsNeMo's bloodflow_1d_mgn builds them: a fraction of the centerline points
is kept (inlet, outlets and junction points always), consecutive kept points are joined by
bidirectional edges, and inlet/outlet nodes get boundary edges to nodes a few hops away. Time is
resampled to `dt` over one cardiac cycle, `loading_steps` ramp-up steps are prepended, and each
training simulation gets `time_offsets` copies resampled from shifted start times.

Output format (`results/<dataset>/prepared/`):

- `graphs/<simulation>_o<k>.npz`, one per sample (k = time-offset copy; test and validation
  samples have k = 0 only). Arrays (N nodes, E directed edges, S steps; CGS units):
  `pos` [N, 3] cm, `node_type` [N] (0 branch, 1 junction, 2 inlet, 3 outlet), `branch_id` [N]
  (-1 on junctions), `area` [N] cm², `tangent` [N, 3], `edge_index` [2, E] (source, destination),
  `edge_features` [E, 9] (relative position 3, distance, edge-type one-hot 5: branch-branch,
  branch-junction, junction-junction, inlet boundary, outlet boundary), `pressure` [S, N] dyn/cm²,
  `flowrate` [S, N] cm³/s, `loading` [S] (1 on ramp-up steps), `R1`, `C`, `R2` [N] (outlet
  Windkessel values, 0 elsewhere), scalars `period` s, `dt` s, `diastolic`, `systolic` dyn/cm²
  (inlet pressure extremes), `source_points` [N] (ids of the kept points in the `.vtp`), and
  the tree's linear hemodynamics (`sciquant.workloads.bloodflow.network`): `flow_share` [N] (steady
  share of the inflow), `pressure_drop` [N] dyn·s/cm⁵ (steady pressure drop from the inlet per unit
  inflow), `flow_response` and `pressure_response` [N, 2·harmonics] (amplitude − 1 and phase per
  harmonic of the cycle, relative to the steady share / to the inlet's pressure), and
  `branch_position` [N] (`branch_positions`: each branch node's place along its branch in
  [−1, 1], centred over the branch's nodes; 0 on junctions, and everywhere with
  `branch_fit: mean`), the abscissa of the rollout's per-branch flow fit, and
  `inlet_impedance` [1 + 2·harmonics] (the tree's input impedance at the inlet, dyn·s/cm⁵:
  steady, then amplitude and phase per harmonic), and `linear_pressure`, `linear_flowrate`
  [S, N] dyn/cm², cm³/s: the lumped tree's periodic response to the simulation's own inflow
  (the raw inlet point's flow, every harmonic the time step resolves; `linear_series`), on
  the same times as `pressure` and `flowrate`, its loading ramp made by the same rule from
  its own first step and minimum pressure. Three priors are stored: `lumped_pressure`,
  `lumped_flowrate` (the lumped tree with the `physics` constants), `calibrated_pressure`,
  `calibrated_flowrate` (its wall stiffness and viscosity fitted per simulation to the inlet's
  systolic and diastolic pressure, `calibrate_prior`; the fit's `calibrated_stiffness_factor`,
  `calibrated_viscosity_factor` and `calibrated_pressure_shift` dyn/cm² are scalars of the
  sample) and `expansion_pressure`, `expansion_flowrate` (the same fit of the lumped tree with
  the graph's Borda–Carnot expansion losses linearized into it,
  `network.expansion_resistance`; its factors and shift `expansion_*_factor`,
  `expansion_pressure_shift`); `linear_*` is the one `prepare.prior` names, the residual
  model's prior. All three are the no-network baselines every surrogate is judged against.
- `index.json`: format version, settings, the splits (sample names per split, by simulation),
  node/edge feature names, and z-score statistics (mean, std) computed on the training split
  (`physical_*`: those of the physical pressure, flow and their increments, which the
  reference formulation z-scores, as the reference does).

Per-simulation scales (`sample_scales`): the model sees pressure and flow made dimensionless
before the z-score, p̃ = (p − p_dia) / (p_sys − p_dia) and q̃ = q / (s·Q̄_in), with p_dia, p_sys
the inlet pressure extremes (already node features, as in the reference), Q̄_in the cycle-mean of
the imposed inlet flow (known in advance, like the inlet flow itself) and s the node's steady
share of it (`flow_share`). Every node's q̃ then has cycle mean 1 (exactly for a linear network):
trees whose flows differ tenfold, and a daughter carrying 90 % of its parent's flow next to one
carrying 10 %, look alike to the network, which is left to learn how the pulse departs from the
inflow's waveform. The statistics of `pressure`, `flowrate` and their increments in
`index.json` are those of p̃ and q̃. The stored arrays stay physical.
"""

from __future__ import annotations

import json
import math
import re
import sys
import zipfile
import zlib
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sciquant.data.manifest import check_delivered
from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path, write_json
from sciquant.workloads.bloodflow.network import (
    FOURIER_POINTS,
    Physics,
    Tree,
    cycle_samples,
    expansion_drop,
    expansion_resistance,
    harmonic_response,
    inlet_impedance,
    periodic_response,
    steady_pressure_drop,
    steady_share,
    transfer_functions,
)
from sciquant.workloads.bloodflow.vtp import Centerline, read_centerline

# 2: statistics of the per-simulation scaled pressure and flow; 3: the tree's linear hemodynamics
# (flow_share, pressure_drop, flow_response, pressure_response), flow scaled per node;
# 4: branch_position (the rollout's per-branch linear flow fit), inlet_impedance, the previous
# step's increments as node features; 5: linear_pressure, linear_flowrate (the lumped tree's
# response to the inflow); 6: the calibrated prior (`calibrated_*`, `lumped_*`, `prepare.prior`)
# and the physical statistics of the reference formulation (`physical_*`); 7: `expansion_loss`,
# `expansion_drop` (the Borda–Carnot losses of the graph's widenings), throats kept by default;
# 8: the expansion-calibrated prior (`expansion_*`)
FORMAT_VERSION = 8
#: `PrepareSettings.branch_fit` values: the rollout's fit of the flow along each branch.
BRANCH_FITS = ("linear", "mean")
#: `PrepareSettings.prior` values: which physics prior feeds the residual model (`linear_*`).
PRIORS = ("calibrated", "lumped", "expansion")
#: Bounds of the calibrated prior's wall-stiffness and viscosity factors (`calibrate_prior`):
#: what a physiologist would accept for a 1D tree, not what makes the inlet fit. Stiffness: the
#: embedded simulator's per-simulation scale (0.4–2.5) widened for the tube law's stiffening
#: at mean pressure. Viscosity, as a factor on every vessel's Poiseuille resistance: blood's
#: 0.025–0.06 P over the prior's 0.04, times the friction of a blunt profile (α = 1.05 gives
#: 5.25× Poiseuille's). Wider bounds let a stenosis near the inlet drive the fit to 20× the
#: viscosity: the inlet then matches and the rest of the tree is wrong (35 % on one tree).
STIFFNESS_FACTOR_BOUNDS = (0.2, 5.0)
VISCOSITY_FACTOR_BOUNDS = (0.5, 8.0)
BRANCH, JUNCTION, INLET, OUTLET = range(4)
#: Harmonics of the cycle whose linear response is a node feature (`PrepareSettings.harmonics`).
HARMONICS = 3


def inlet_feature_names(harmonics: int = HARMONICS) -> tuple[str, ...]:
    """The inlet-impedance node features (`inlet_response`), the same on every node of a graph."""
    return ("inlet_mean_pressure",) + tuple(
        f"inlet_impedance_h{k}_{part}"
        for k in range(1, harmonics + 1)
        for part in ("amplitude", "phase")
    )


def node_feature_names(harmonics: int = HARMONICS) -> tuple[str, ...]:
    """The model's node features in order (see `sciquant.workloads.bloodflow.features`)."""
    response = [
        f"{field}_h{k}_{part}"
        for field in ("flow", "pressure")
        for k in range(1, harmonics + 1)
        for part in ("amplitude", "phase")
    ]
    return (
        "pressure", "flowrate", "area", "tangent_x", "tangent_y", "tangent_z",
        "is_branch", "is_junction", "is_inlet", "is_outlet", "period", "diastolic", "systolic",
        "R1", "C", "R2", "flow_share", "pressure_drop", "expansion_loss", "expansion_drop",
        "calibrated_stiffness", "calibrated_viscosity", "calibrated_shift", *response,
        *inlet_feature_names(harmonics),
        "loading", "next_inlet_flowrate", "inlet_flowrate_increment",
        "previous_delta_pressure", "previous_delta_flowrate",
        "linear_delta_pressure", "linear_delta_flowrate",
        "linear_deviation_pressure", "linear_deviation_flowrate",
        "expansion_delta_pressure", "expansion_pressure",
    )  # fmt: skip


NODE_FEATURES = node_feature_names()
EDGE_FEATURES = (
    "dx", "dy", "dz", "distance",
    "branch_branch", "branch_junction", "junction_junction", "inlet_boundary", "outlet_boundary",
)  # fmt: skip
#: Quantities with z-score statistics (computed over the training split).
STATISTICS = (
    "pressure", "flowrate", "delta_pressure", "delta_flowrate", "area", "period",
    "diastolic", "systolic", "R1", "C", "R2", "dx", "dy", "dz", "distance",
    "linear_deviation_pressure", "linear_deviation_flowrate",
    "physical_pressure", "physical_flowrate", "physical_delta_pressure", "physical_delta_flowrate",
)  # fmt: skip
#: The reference MeshGraphNet's node features (Pegolotti et al.; PhysicsNeMo bloodflow_1d_mgn):
#: the first 16 of `node_feature_names` after p and q, then the loading flag and the next
#: inlet flow. No physics prior: the `reference` formulation
#: (`sciquant.workloads.bloodflow.features`).
REFERENCE_NODE_FEATURES = (
    "pressure", "flowrate", "area", "tangent_x", "tangent_y", "tangent_z",
    "is_branch", "is_junction", "is_inlet", "is_outlet", "period", "diastolic", "systolic",
    "R1", "C", "R2", "loading", "next_inlet_flowrate",
)  # fmt: skip
_STEP_ARRAY = re.compile(r"^(pressure|flow|velocity)_(\d+)$")


@dataclass(frozen=True)
class Split:
    train: float = 0.7
    valid: float = 0.1
    test: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6 or self.train <= 0 or self.test <= 0 or self.valid < 0:
            raise SciquantError(
                f"prepare.split: train, valid and test must add up to 1 with train and test > 0 "
                f"and valid ≥ 0; got {self.train:g} + {self.valid:g} + {self.test:g} = {total:g}"
            )


@dataclass(frozen=True)
class PrepareSettings:
    """How raw centerlines become graph samples (the config's `datasets.<name>.prepare`)."""

    keep_fraction: float = 0.06
    throat_narrowing: float = 0.2
    dt: float = 0.01
    loading_steps: int = 10
    time_offsets: int = 4
    boundary_edge_hops: int = 3
    harmonics: int = HARMONICS
    branch_fit: str = "linear"
    prior: str = "calibrated"
    physics: Physics = field(default_factory=Physics)
    split: Split = field(default_factory=Split)

    def __post_init__(self) -> None:
        if not 0.0 <= self.throat_narrowing < 1.0:
            raise SciquantError(
                f"prepare.throat_narrowing: {self.throat_narrowing!r} must be in [0, 1) (0 keeps "
                "no throats; 0.2 keeps the throat of every narrowing by ≥ 20 %)"
            )
        if self.branch_fit not in BRANCH_FITS:
            raise SciquantError(
                f"prepare.branch_fit: {self.branch_fit!r} is not one of {', '.join(BRANCH_FITS)}"
            )
        if self.prior not in PRIORS:
            raise SciquantError(f"prepare.prior: {self.prior!r} is not one of {', '.join(PRIORS)}")
        if isinstance(self.split, dict):
            object.__setattr__(self, "split", Split(**self.split))
        if isinstance(self.physics, dict):
            object.__setattr__(self, "physics", Physics(**self.physics))


@dataclass
class Simulation:
    """One raw simulation: its centerline and its `dataset_info.json` entry."""

    name: str
    path: Path
    centerline: Centerline
    info: dict[str, Any]
    times: np.ndarray  # [K] s, relative to the stored cycle's start
    pressure: np.ndarray  # [K, P] dyn/cm²
    flowrate: np.ndarray  # [K, P] cm³/s


def find_vtps(raw: Path) -> Path:
    """The folder holding `dataset_info.json` (normally `raw/vtps`, or deeper in an archive)."""
    if not raw.is_dir():
        raise SciquantError(
            f"{raw}: no such folder; give the raw data folder (resources/<dataset>/raw after the "
            "fetch/synthesize stage)"
        )
    candidates = sorted(raw.rglob("dataset_info.json"))
    if not candidates:
        raise SciquantError(
            f"{raw}: no dataset_info.json found; expected the VMR layout vtps/*.vtp + "
            "vtps/dataset_info.json (rerun the fetch/synthesize stage)"
        )
    if len(candidates) > 1:
        raise SciquantError(f"{raw}: several dataset_info.json files: {candidates}; keep one")
    return candidates[0].parent


def read_dataset_info(vtps: Path) -> dict[str, Any]:
    """`vtps/dataset_info.json`: one object per simulation name; errors name the file and the fix.

    The entries themselves are checked where each simulation is read (`load_simulation`).
    """
    path = vtps / "dataset_info.json"
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise SciquantError(
            f"{path}: cannot be read ({error}); rerun the fetch/synthesize stage"
        ) from error
    except UnicodeDecodeError as error:
        raise SciquantError(
            f"{path}: not UTF-8 ({error}); save it as UTF-8 (JSON files are UTF-8) or rerun the "
            "fetch/synthesize stage"
        ) from error
    except json.JSONDecodeError as error:
        raise SciquantError(
            f"{path}: not valid JSON ({error}); fix it or rerun the fetch/synthesize stage"
        ) from error
    if not isinstance(info, dict):
        raise SciquantError(
            f"{path}: not an object of simulations (found a {type(info).__name__}); expected "
            '{"<simulation>": {"dt": ..., "T": ..., ...}, ...}; rerun the fetch/synthesize stage'
        )
    return info


def _positive_seconds(info_file: Path, name: str, entry: dict[str, Any], key: str) -> float:
    """`entry[key]` as a finite number of seconds > 0 (a number, or text that reads as one); an
    error naming the file and key if not."""
    value = entry[key]
    try:
        seconds = float(value) if isinstance(value, int | float | str) else math.nan
    except ValueError:
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        meaning = {"dt": "the time between stored steps", "T": "the cardiac period"}[key]
        raise SciquantError(
            f"{info_file}: '{name}': '{key}' is {value!r}; it must be {meaning} in seconds, a "
            "finite number > 0; correct the entry or rerun the fetch/synthesize stage"
        )
    return seconds


def load_simulation(path: Path, info: dict[str, Any]) -> Simulation:
    """Read one `.vtp` and check it has what ingestion needs; errors name the file (and the key).

    Its `dataset_info.json` entry must be an object with `dt` (s between stored steps) and `T`
    (the period, s), both finite and > 0; the file must store at least 3 time steps that fall at
    distinct times of the cycle (the periodic spline through them needs 3).
    """
    info_file = path.parent / "dataset_info.json"
    centerline = read_centerline(path)
    name = path.stem
    if name not in info:
        raise SciquantError(
            f"{path}: simulation '{name}' is missing from dataset_info.json; add its dt, T, "
            "time_shift, bc_type and outlet values, or remove the file"
        )
    entry = info[name]
    if not isinstance(entry, dict):
        raise SciquantError(
            f"{info_file}: '{name}' is not an object (found a {type(entry).__name__}); give it "
            'as {"dt": ..., "T": ..., "bc_type": ..., ...} or rerun the fetch/synthesize stage'
        )
    for key in ("dt", "T"):
        if key not in entry:
            raise SciquantError(f"{info_file}: '{name}' has no '{key}'")
    dt = _positive_seconds(info_file, name, entry, "dt")
    period = _positive_seconds(info_file, name, entry, "T")
    data = centerline.point_data
    for required in ("area", "BranchIdTmp"):
        if required not in data:
            raise SciquantError(f"{path}: point-data array '{required}' is missing")

    steps: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for array_name, values in data.items():
        match = _STEP_ARRAY.match(array_name)
        if match:
            kind = "flow" if match.group(1) == "velocity" else match.group(1)
            steps[kind][int(match.group(2))] = values
    for kind in ("pressure", "flow"):
        if not steps[kind]:
            raise SciquantError(f"{path}: no '{kind}_<k>' arrays (time series) in the file")
    if sorted(steps["pressure"]) != sorted(steps["flow"]):
        raise SciquantError(f"{path}: pressure_<k> and flow_<k> arrays cover different steps")
    indices = sorted(steps["pressure"])
    pressure = np.stack([steps["pressure"][k] for k in indices]).astype(np.float64)
    flowrate = np.stack([steps["flow"][k] for k in indices]).astype(np.float64)
    for label, values in (("pressure", pressure), ("flow", flowrate), ("area", data["area"])):
        if not np.all(np.isfinite(values)):
            raise SciquantError(f"{path}: '{label}' contains NaN or infinite values")
    if np.any(data["area"] <= 0):
        raise SciquantError(f"{path}: 'area' has non-positive values")
    times = np.asarray(indices, dtype=np.float64) * dt
    # As `network.periodic_spline` counts them: times within a cycle, the cycle's end = its start.
    phase = np.mod(times, period)
    phase[phase > period * (1 - 1e-9)] = 0.0
    distinct = int(np.sum(np.diff(np.sort(phase)) > period * 1e-9)) + 1
    if distinct < 3:
        steps = f"{len(indices)} stored time step{'s' if len(indices) > 1 else ''}"
        raise SciquantError(
            f"{path}: {steps} (pressure_<k>, flow_<k>) at {distinct} distinct time"
            f"{'s' if distinct > 1 else ''} of the cycle (dt = {dt:g} s, T = {period:g} s in "
            f"{info_file}); at least 3 per cycle are needed; check 'dt' and 'T' there or "
            "rerun the fetch/synthesize stage"
        )
    return Simulation(name, path, centerline, entry, times, pressure, flowrate)


#: Fewest resampled steps per cycle `prepare` works with (`PrepareSettings.dt` against `T`).
MIN_CYCLE_STEPS = 3


def check_cycle(sim: Simulation, settings: PrepareSettings) -> None:
    """An error naming dataset_info.json where `T` is shorter than `MIN_CYCLE_STEPS` of `dt`."""
    period = float(sim.info["T"])
    if int(round(period / settings.dt)) < MIN_CYCLE_STEPS:
        raise SciquantError(
            f"{sim.path.parent / 'dataset_info.json'}: '{sim.name}': 'T' is {period:g} s, fewer "
            f"than {MIN_CYCLE_STEPS} steps of the prepare time step dt = {settings.dt:g} s; "
            "correct 'T' or lower `prepare.dt`"
        )


def point_types(centerline: Centerline) -> np.ndarray:
    """Node type of every centerline point: branch, junction, inlet (point 0) or outlet."""
    n_points = len(centerline.points)
    degree = np.bincount(centerline.edges.reshape(-1), minlength=n_points)
    types = np.full(n_points, BRANCH, dtype=np.int8)
    types[np.asarray(centerline.point_data["BranchIdTmp"]) < 0] = JUNCTION
    if "BifurcationId" in centerline.point_data:
        types[np.asarray(centerline.point_data["BifurcationId"]) >= 0] = JUNCTION
    types[(degree == 1)] = OUTLET
    types[0] = INLET
    return types


def _adjacency(n_points: int, edges: np.ndarray) -> list[list[int]]:
    neighbours: list[list[int]] = [[] for _ in range(n_points)]
    for a, b in edges:
        neighbours[a].append(int(b))
        neighbours[b].append(int(a))
    return neighbours


def _throats(
    centerline: Centerline,
    types: np.ndarray,
    neighbours: list[list[int]],
    narrowing: float,
    hops: int,
) -> np.ndarray:
    """Branch points [bool] where the cross-section is a narrowing's throat: the smallest `area`
    within `hops` points along the centerline, and narrower than (1 − `narrowing`) × the widest
    cross-section of its branch (`BranchIdTmp`)."""
    area = np.asarray(centerline.point_data["area"], dtype=np.float64)
    branch = np.asarray(centerline.point_data["BranchIdTmp"]).astype(np.int64)
    on_branch = (types == BRANCH) & (branch >= 0)  # junction points carry no branch (-1)
    widest = np.zeros(int(branch.max(initial=0)) + 1)
    np.maximum.at(widest, branch[on_branch], area[on_branch])
    found = np.zeros(len(area), dtype=bool)
    narrow = np.zeros(len(area), dtype=bool)
    narrow[on_branch] = area[on_branch] < (1.0 - narrowing) * widest[branch[on_branch]]
    for point in np.flatnonzero(narrow):
        seen, frontier = {int(point)}, [int(point)]
        for _ in range(hops):
            frontier = [n for p in frontier for n in neighbours[p] if n not in seen]
            seen.update(frontier)
        # ties (a flat throat) keep the first point along the centerline only
        found[point] = all(
            area[point] < area[n] or (area[point] == area[n] and point < n)
            for n in seen - {int(point)}
        )
    return found


def select_points(
    centerline: Centerline, types: np.ndarray, keep_fraction: float, throat_narrowing: float = 0.0
):
    """Kept point ids and the edges between consecutive kept points (as point-id pairs).

    Walks the tree from the inlet; along each chain of branch points, keeps one point every
    `mean spacing / keep_fraction` of arc length. Inlet, outlets, junction points and points of
    degree ≠ 2 are always kept; so is the throat of every narrowing by ≥ `throat_narrowing` of
    its branch's widest area (`_throats`; 0: none), wherever the spacing would fall, so a
    stenosis shows its depth on the graph instead of wherever sampling lands on it.
    """
    points = centerline.points
    n_points = len(points)
    neighbours = _adjacency(n_points, centerline.edges)
    lengths = np.linalg.norm(
        points[centerline.edges[:, 0]] - points[centerline.edges[:, 1]], axis=1
    )
    spacing = float(lengths.mean()) / keep_fraction
    degree = np.array([len(n) for n in neighbours])
    always = (types != BRANCH) | (degree != 2)
    if throat_narrowing > 0:
        hops = max(1, round(0.5 / keep_fraction))
        always |= _throats(centerline, types, neighbours, throat_narrowing, hops)

    kept = [0]
    kept_edges: list[tuple[int, int]] = []
    visited = np.zeros(n_points, dtype=bool)
    visited[0] = True
    # Each stack entry: (point, last kept point upstream, arc length since it).
    stack = [(0, 0, 0.0)]
    while stack:
        point, anchor, travelled = stack.pop()
        for nxt in neighbours[point]:
            if visited[nxt]:
                continue
            visited[nxt] = True
            distance = travelled + float(np.linalg.norm(points[nxt] - points[point]))
            if always[nxt] or distance >= spacing:
                kept.append(nxt)
                kept_edges.append((anchor, nxt))
                stack.append((nxt, nxt, 0.0))
            else:
                stack.append((nxt, anchor, distance))
    if not visited.all():
        raise SciquantError(
            f"centerline has {int((~visited).sum())} points not connected to the inlet (point 0)"
        )
    # Nodes in the file's point order, whatever order the walk met them in.
    return np.sort(np.asarray(kept)), np.asarray(kept_edges, dtype=np.int64)


def _tangents(pos: np.ndarray, edges: np.ndarray) -> np.ndarray:
    tangent = np.zeros_like(pos)
    for a, b in edges:
        direction = pos[b] - pos[a]  # edges point downstream
        tangent[a] += direction
        tangent[b] += direction
    norm = np.linalg.norm(tangent, axis=1, keepdims=True)
    return tangent / np.where(norm > 0, norm, 1.0)


def _boundary_edges(n_nodes: int, edges: np.ndarray, sources: np.ndarray, hops: int):
    """Edges from each boundary node to nodes 2..hops hops away (direct neighbours have edges)."""
    neighbours = _adjacency(n_nodes, edges)
    pairs = []
    for source in sources:
        depth = {int(source): 0}
        queue = deque([int(source)])
        while queue:
            node = queue.popleft()
            if depth[node] == hops:
                continue
            for nxt in neighbours[node]:
                if nxt not in depth:
                    depth[nxt] = depth[node] + 1
                    queue.append(nxt)
        pairs += [(int(source), node) for node, d in depth.items() if d >= 2]
    return pairs


def build_graph(sim: Simulation, settings: PrepareSettings) -> tuple[dict[str, np.ndarray], Tree]:
    """The static part of a sample (nodes, edges and their features) and its lumped tree."""
    types_all = point_types(sim.centerline)
    kept, point_edges = select_points(
        sim.centerline, types_all, settings.keep_fraction, settings.throat_narrowing
    )
    node_of_point = {int(p): i for i, p in enumerate(kept)}
    tree_edges = np.array([[node_of_point[a], node_of_point[b]] for a, b in point_edges])
    pos = sim.centerline.points[kept]
    node_type = types_all[kept]
    branch_id = np.asarray(sim.centerline.point_data["BranchIdTmp"])[kept].astype(np.int64)
    branch_id[node_type == JUNCTION] = -1

    directed = [(int(a), int(b), _edge_type(node_type[a], node_type[b])) for a, b in tree_edges]
    directed += [(b, a, t) for a, b, t in directed]
    inlet_nodes = np.flatnonzero(node_type == INLET)
    outlet_nodes = np.flatnonzero(node_type == OUTLET)
    hops = settings.boundary_edge_hops
    for sources, edge_type in ((inlet_nodes, 3), (outlet_nodes, 4)):
        for a, b in _boundary_edges(len(kept), tree_edges, sources, hops):
            directed += [(a, b, edge_type), (b, a, edge_type)]
    edge_index = np.array([[a for a, _, _ in directed], [b for _, b, _ in directed]])
    relative = pos[edge_index[1]] - pos[edge_index[0]]
    distance = np.linalg.norm(relative, axis=1, keepdims=True)
    one_hot = np.eye(5)[[t for _, _, t in directed]]
    edge_features = np.concatenate([relative, distance, one_hot], axis=1)

    r1, capacitance, r2 = _outlet_values(sim, kept, node_type)
    area = np.asarray(sim.centerline.point_data["area"])[kept].astype(np.float64)
    tree = Tree.build(
        tree_edges, pos, area, int(inlet_nodes[0]), (r1, capacitance, r2), where=str(sim.path)
    )
    physics = settings.physics
    share = steady_share(tree, physics)
    expansion = expansion_drop(tree, area, share, physics)
    flow_response, pressure_response = harmonic_response(
        tree, float(sim.info["T"]), settings.harmonics, physics
    )
    return {
        "pos": pos.astype(np.float32),
        "node_type": node_type.astype(np.int8),
        "branch_id": branch_id,
        "area": area.astype(np.float32),
        "tangent": _tangents(pos, tree_edges).astype(np.float32),
        "edge_index": edge_index.astype(np.int64),
        "edge_features": edge_features.astype(np.float32),
        "R1": r1, "C": capacitance, "R2": r2,
        "source_points": kept.astype(np.int64),
        "flow_share": share.astype(np.float32),
        "pressure_drop": steady_pressure_drop(tree, physics).astype(np.float32),
        "expansion_loss": expansion[0].astype(np.float32),
        "expansion_drop": expansion[1].astype(np.float32),
        "flow_response": flow_response.astype(np.float32),
        "pressure_response": pressure_response.astype(np.float32),
        "branch_position": branch_positions(tree, branch_id, settings.branch_fit),
        "inlet_impedance": inlet_impedance(tree, float(sim.info["T"]), settings.harmonics, physics),
    }, tree  # fmt: skip


def branch_positions(tree: Tree, branch_id: np.ndarray, branch_fit: str = "linear") -> np.ndarray:
    """Each branch node's place along its branch, in [−1, 1] and centred: the fit's abscissa [N].

    The rollout replaces the flow of every branch by its least-squares fit a + b·x over the
    branch's nodes (`sciquant.workloads.bloodflow.rollout.branch_fit`); x is the path length from
    the inlet, minus its mean over the branch's nodes, over half the branch's extent. Centred, the
    fit's two terms are orthogonal: a is the branch mean, b = Σ x·q / Σ x². Junction nodes
    (branch id −1), single-node branches, and every node with `branch_fit="mean"` get 0: the
    fit is then the reference's branch mean. Float32.
    """
    position = np.zeros(len(branch_id))
    if branch_fit == "mean":
        return position.astype(np.float32)
    distance = np.zeros(len(branch_id))
    for node in tree.order[1:]:  # parents before children
        distance[node] = distance[tree.parent[node]] + tree.length[node]
    for branch in np.unique(branch_id[branch_id >= 0]):
        nodes = branch_id == branch
        centred = distance[nodes] - distance[nodes].mean()
        extent = 0.5 * (centred.max() - centred.min())
        position[nodes] = centred / extent if extent > 0 else 0.0
    return position.astype(np.float32)


def _edge_type(type_a: int, type_b: int) -> int:
    junctions = int(type_a == JUNCTION) + int(type_b == JUNCTION)
    return junctions  # 0 branch-branch, 1 branch-junction, 2 junction-junction


def _outlet_values(sim: Simulation, kept: np.ndarray, node_type: np.ndarray):
    """Windkessel (or resistance) values on outlet nodes, zero elsewhere."""
    info_file = sim.path.parent / "dataset_info.json"
    outlet_points = sorted(int(p) for p in kept[node_type == OUTLET])
    listed = sim.info.get("outlets", outlet_points)
    if sorted(int(p) for p in listed) != outlet_points:
        raise SciquantError(
            f"{info_file}: '{sim.name}' lists outlets {listed}, but the centerline's outlets "
            f"(degree-1 points other than point 0) are {outlet_points}"
        )
    n = len(kept)
    values = {key: np.zeros(n, dtype=np.float32) for key in ("R1", "C", "R2")}
    bc_type = sim.info.get("bc_type", "RCR")
    node_of_point = {int(p): i for i, p in enumerate(kept)}
    aliases = {"R1": ("R1", "Rp"), "C": ("C",), "R2": ("R2", "Rd")}
    for key, names in aliases.items():
        if bc_type.upper() == "R" and key != "R1":
            continue
        found = next((sim.info[name] for name in names if name in sim.info), None)
        if found is None and bc_type.upper() == "R":
            found = sim.info.get("R")
        if found is None:
            raise SciquantError(f"{info_file}: '{sim.name}' ({bc_type}) has no '{names[0]}' values")
        found = np.atleast_1d(np.asarray(found, dtype=np.float64))
        if len(found) != len(listed):
            raise SciquantError(
                f"{info_file}: '{sim.name}' has {len(found)} '{names[0]}' values for "
                f"{len(listed)} outlets"
            )
        for point, value in zip(listed, found, strict=True):
            values[key][node_of_point[int(point)]] = value
    return values["R1"], values["C"], values["R2"]


def sample_times(sim: Simulation, settings: PrepareSettings, offset: float) -> np.ndarray:
    """The resampled cycle's times (s): `offset + m·dt`, m = 0..round(T/dt)."""
    n_steps = int(round(float(sim.info["T"]) / settings.dt))
    return offset + settings.dt * np.arange(n_steps + 1)


def resample(sim: Simulation, kept: np.ndarray, settings: PrepareSettings, offset: float):
    """Pressure, flow and loading flag at `offset + m·dt` over one cycle, ramp-up prepended."""
    period = float(sim.info["T"])
    times = sample_times(sim, settings, offset)
    # Periodic interpolation: the stored cycle's end joins its start.
    pressure = _interp_periodic(times, sim.times, sim.pressure[:, kept], period)
    flowrate = _interp_periodic(times, sim.times, sim.flowrate[:, kept], period)
    loading = np.concatenate([np.ones(settings.loading_steps), np.zeros(len(times))])
    return (
        *_with_loading(pressure, flowrate, settings.loading_steps),
        loading.astype(np.float32),
    )


def linear_harmonics(period: float, dt: float) -> int:
    """Harmonics of the cycle that the prepared time step resolves (below its Nyquist)."""
    return min((int(round(period / dt)) - 1) // 2, FOURIER_POINTS // 2 - 1)


def linear_series(
    sim: Simulation,
    transfer: tuple[np.ndarray, np.ndarray],
    settings: PrepareSettings,
    offset: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The lumped tree's pressure and flow [S, N] under the simulation's inflow, as `resample`.

    The inflow is the raw inlet point's flow over the stored cycle (imposed, known in advance);
    `transfer`: the tree's `transfer_functions` for `linear_harmonics`. The same times as the
    simulation's own series, and a loading ramp by the same rule (from the lumped series' own
    first step and minimum pressure).
    """
    period = float(sim.info["T"])
    flowrate, pressure = periodic_response(
        transfer, sim.times, sim.flowrate[:, 0], period, sample_times(sim, settings, offset)
    )
    return _with_loading(pressure, flowrate, settings.loading_steps)


def calibrate_prior(
    sim: Simulation,
    tree: Tree,
    inlet_node: int,
    settings: PrepareSettings,
    extra: np.ndarray | None = None,
) -> tuple[Physics, tuple[float, float], float]:
    """The lumped prior fitted to the inlet pressures the features carry.

    Returns (physics, (stiffness factor, viscosity factor), pressure shift dyn/cm²). Two numbers
    of every simulation are node features, hence known at inference: the inlet's diastolic and
    systolic pressure. The prior's wall stiffness (k1 and k3 of `physics`, one factor) and its
    viscosity (one factor: every vessel's resistance) are fitted by least squares so that its
    inlet pressure under the simulation's inflow has the data's systolic and diastolic values;
    what the fit leaves of the diastolic mismatch is removed by one constant pressure shift.
    This is the best a user gets without a network from the lumped model and the inputs: the
    `calibrated_model` baseline, and by default the residual model's prior (`prepare.prior`).
    Where a tree's physics is far from the lumped model's (a tight stenosis near the inlet
    makes a pulse no lumped tree of these vessels has), the factors end at their bounds and the
    calibrated prior can be worse than the plain one away from the inlet: measured, not hidden.
    `extra` [H+1, N]: series resistances per harmonic added to the lumped tree
    (`network.expansion_resistance`, the `expansion_calibrated_model` baseline), H the
    harmonics the prepared time step resolves; the fit and the shift are made with them.
    """
    period = float(sim.info["T"])
    times = sample_times(sim, settings, 0.0)
    inlet_pressure = _interp_periodic(times, sim.times, sim.pressure[:, :1], period)[:, 0]
    systolic, diastolic = float(inlet_pressure.max()), float(inlet_pressure.min())
    pulse = max(systolic - diastolic, 1e-9)
    fit_harmonics = min(linear_harmonics(period, settings.dt), 15)
    base = settings.physics

    def physics_for(log_factors: np.ndarray) -> Physics:
        stiffness, viscosity = np.exp(log_factors)
        k1, k2, k3 = base.stiffness
        return Physics(
            base.viscosity * viscosity, base.density, (k1 * stiffness, k2, k3 * stiffness)
        )

    def inlet_series(physics: Physics, harmonics: int) -> np.ndarray:
        transfer = transfer_functions(tree, period, harmonics, physics, extra)
        pressure = periodic_response(transfer, sim.times, sim.flowrate[:, 0], period, times)[1]
        return pressure[:, inlet_node]

    def mismatch(log_factors: np.ndarray) -> np.ndarray:
        prior = inlet_series(physics_for(log_factors), fit_harmonics)
        return np.array([prior.max() - systolic, prior.min() - diastolic]) / pulse

    from scipy.optimize import least_squares  # here: scipy.optimize is slow to import

    bounds = np.log(np.array([STIFFNESS_FACTOR_BOUNDS, VISCOSITY_FACTOR_BOUNDS])).T
    found = least_squares(mismatch, np.zeros(2), bounds=bounds, xtol=1e-6)
    physics = physics_for(found.x)
    prior_inlet = inlet_series(physics, linear_harmonics(period, settings.dt))
    shift = diastolic - float(prior_inlet.min())
    stiffness, viscosity = (float(v) for v in np.exp(found.x))
    return physics, (stiffness, viscosity), shift


def _with_loading(
    pressure: np.ndarray, flowrate: np.ndarray, loading_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prepends the ramp from zero flow and minimum pressure to the cycle's start; float32."""
    ramp = np.linspace(0.0, 1.0, loading_steps, endpoint=False)[:, None]
    p_min = pressure.min(axis=0, keepdims=True)
    loading_p = p_min + ramp * (pressure[:1] - p_min)
    loading_q = ramp * flowrate[:1]
    return (
        np.concatenate([loading_p, pressure]).astype(np.float32),
        np.concatenate([loading_q, flowrate]).astype(np.float32),
    )


def _interp_periodic(times, sample_times, values, period):
    return np.stack(
        [
            np.interp(times, sample_times, values[:, j], period=period)
            for j in range(values.shape[1])
        ],
        axis=1,
    )


def split_simulations(names: list[str], split: Split) -> dict[str, list[str]]:
    """Shuffle simulations with the split seed, then cut by the fractions (≥ 1 test, ≥ 1 train)."""
    rng = np.random.default_rng(split.seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n_test = max(1, int(round(split.test * len(names))))
    n_valid = int(round(split.valid * len(names)))
    if n_test + n_valid >= len(names):
        raise SciquantError(
            f"prepare.split: {len(names)} simulations leave none for training with "
            f"test={split.test}, valid={split.valid}; add simulations or lower the fractions"
        )
    return {
        "test": sorted(order[:n_test]),
        "valid": sorted(order[n_test : n_test + n_valid]),
        "train": sorted(order[n_test + n_valid :]),
    }


def prepare(raw: Path, out: Path, settings: PrepareSettings) -> Path:
    """Ingest every simulation under `raw`, write samples and `index.json` into `out`.

    BLAS runs on one thread: its sums' order, hence the last bits of the priors, would
    otherwise depend on the machine's core count.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _prepare(raw, out, settings)


def _prepare(raw: Path, out: Path, settings: PrepareSettings) -> Path:
    """`prepare` itself."""
    check_delivered(raw)
    vtps = find_vtps(raw)
    info = read_dataset_info(vtps)
    paths = sorted(vtps.glob("*.vtp"))
    unread = sorted(set(info) - {p.stem for p in paths})
    if unread:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        print(
            f"prepare: {vtps / 'dataset_info.json'} lists {len(unread)} "
            f"simulation{'s' if len(unread) > 1 else ''} without a .vtp file ({shown}); "
            f"preparing the {len(paths)} present",
            file=sys.stderr,
        )
    if len(paths) < 3:
        raise SciquantError(f"{vtps}: found {len(paths)} .vtp files; need at least 3 to split")
    splits = split_simulations([p.stem for p in paths], settings.split)
    split_of = {name: split for split, names in splits.items() for name in names}

    graphs_dir = out / "graphs"
    graphs_dir.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    collected: dict[str, list[np.ndarray]] = defaultdict(list)
    for path in tqdm(paths, desc="prepare", unit="simulation"):
        sim = load_simulation(path, info)
        check_cycle(sim, settings)
        graph, tree = build_graph(sim, settings)
        period = float(sim.info["T"])
        harmonics = linear_harmonics(period, settings.dt)
        transfer = transfer_functions(tree, period, harmonics, settings.physics)
        inlet_node = int(np.flatnonzero(graph["node_type"] == INLET)[0])
        calibrated_physics, (stiffness_factor, viscosity_factor), shift = calibrate_prior(
            sim, tree, inlet_node, settings
        )
        calibrated = transfer_functions(tree, period, harmonics, calibrated_physics)
        node_area = np.asarray(sim.centerline.point_data["area"], dtype=np.float64)
        try:
            extra = expansion_resistance(
                tree, node_area[graph["source_points"]],
                cycle_samples(sim.times, sim.flowrate[:, 0], period), harmonics, settings.physics,
            )  # fmt: skip
        except SciquantError as error:
            raise SciquantError(
                f"{path}: {error} (check the flow sign convention of the raw data)"
            ) from None
        expansion_physics, expansion_factors, expansion_shift = calibrate_prior(
            sim, tree, inlet_node, settings, extra
        )
        expansion = transfer_functions(tree, period, harmonics, expansion_physics, extra)
        split = split_of[sim.name]
        offsets = settings.time_offsets if split == "train" else 1
        for k in range(offsets):
            offset = k * settings.dt / offsets
            pressure, flowrate, loading = resample(sim, graph["source_points"], settings, offset)
            lumped_pressure, lumped_flowrate = linear_series(sim, transfer, settings, offset)
            calibrated_pressure, calibrated_flowrate = linear_series(
                sim, calibrated, settings, offset
            )
            calibrated_pressure = calibrated_pressure + np.float32(shift)
            expansion_pressure, expansion_flowrate = linear_series(sim, expansion, settings, offset)
            expansion_pressure = expansion_pressure + np.float32(expansion_shift)
            prior = {
                "calibrated": (calibrated_pressure, calibrated_flowrate),
                "lumped": (lumped_pressure, lumped_flowrate),
                "expansion": (expansion_pressure, expansion_flowrate),
            }[settings.prior]
            inlet = graph["node_type"] == INLET
            sample = dict(
                graph,
                pressure=pressure,
                flowrate=flowrate,
                loading=loading,
                linear_pressure=prior[0],
                linear_flowrate=prior[1],
                lumped_pressure=lumped_pressure,
                lumped_flowrate=lumped_flowrate,
                calibrated_pressure=calibrated_pressure,
                calibrated_flowrate=calibrated_flowrate,
                calibrated_stiffness_factor=np.float32(stiffness_factor),
                calibrated_viscosity_factor=np.float32(viscosity_factor),
                calibrated_pressure_shift=np.float32(shift),
                expansion_pressure=expansion_pressure,
                expansion_flowrate=expansion_flowrate,
                expansion_stiffness_factor=np.float32(expansion_factors[0]),
                expansion_viscosity_factor=np.float32(expansion_factors[1]),
                expansion_pressure_shift=np.float32(expansion_shift),
                period=np.float32(sim.info["T"]),
                dt=np.float32(settings.dt),
                diastolic=np.float32(pressure[settings.loading_steps :, inlet].min()),
                systolic=np.float32(pressure[settings.loading_steps :, inlet].max()),
            )
            name = f"{sim.name}_o{k}"
            scales = sample_scales(sample, f"{path}")  # fails here, naming the file
            _save_npz(graphs_dir / f"{name}.npz", sample)
            samples[split].append(name)
            if split == "train":
                _collect_statistics(collected, sample, scales)

    index = {
        "format_version": FORMAT_VERSION,
        "workload": "bloodflow",
        "settings": asdict(settings),
        "simulations": splits,
        "samples": samples,
        "node_features": list(node_feature_names(settings.harmonics)),
        "edge_features": list(EDGE_FEATURES),
        "statistics": _statistics(collected),
    }
    return write_json(out / "index.json", index)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def sample_scales(sample: dict[str, Any], name: str = "sample") -> tuple[float, float, np.ndarray]:
    """(pressure offset p_dia, pressure scale p_sys − p_dia, flow scales s·Q̄_in [N]) of a sample.

    See the module docstring. Errors name the sample when a scale is not positive (a constant
    inlet pressure, or a cycle-mean inlet flow ≤ 0: no forward flow to scale by).
    """
    diastolic, systolic = float(sample["diastolic"]), float(sample["systolic"])
    cycle = np.asarray(sample["loading"]) == 0
    inlet = np.asarray(sample["node_type"]) == INLET
    mean_inflow = float(np.asarray(sample["flowrate"], dtype=np.float64)[cycle][:, inlet].mean())
    if not systolic > diastolic:
        raise SciquantError(
            f"{name}: the inlet pressure is constant over the cycle (systolic {systolic} = "
            f"diastolic {diastolic} dyn/cm²); a pulsatile simulation is needed"
        )
    if not mean_inflow > 0:
        raise SciquantError(
            f"{name}: the cycle-mean inlet flow is {mean_inflow:.4g} cm³/s; the surrogate "
            "needs a net forward inflow (check the flow sign convention of the raw data)"
        )
    share = np.asarray(sample["flow_share"], dtype=np.float64)
    if not np.all(share > 0):
        raise SciquantError(f"{name}: a node's steady flow share is ≤ 0; rerun prepare")
    return diastolic, systolic - diastolic, mean_inflow * share


def scaled_series(
    sample: dict[str, Any],
    scales: tuple[float, float, np.ndarray],
    keys: tuple[str, str] = ("pressure", "flowrate"),
) -> tuple[np.ndarray, np.ndarray]:
    """The sample's pressure and flow [S, N] made dimensionless by its `sample_scales`.

    `keys`: which pressure and flow series (e.g. `linear_pressure`, `linear_flowrate`).
    """
    offset, pressure_scale, flow_scale = scales
    pressure = (np.asarray(sample[keys[0]], dtype=np.float64) - offset) / pressure_scale
    flowrate = np.asarray(sample[keys[1]], dtype=np.float64) / flow_scale
    return pressure, flowrate


def _collect_statistics(
    collected: dict[str, list[np.ndarray]],
    sample: dict[str, Any],
    scales: tuple[float, float, np.ndarray],
) -> None:
    steady = sample["loading"] == 0
    outlets = sample["node_type"] == OUTLET
    pressure, flowrate = scaled_series(sample, scales)
    collected["pressure"].append(pressure.ravel())
    collected["flowrate"].append(flowrate.ravel())
    collected["delta_pressure"].append(np.diff(pressure[steady], axis=0).ravel())
    collected["delta_flowrate"].append(np.diff(flowrate[steady], axis=0).ravel())
    linear_pressure, linear_flowrate = scaled_series(
        sample, scales, ("linear_pressure", "linear_flowrate")
    )
    physical_p = np.asarray(sample["pressure"], dtype=np.float64)
    physical_q = np.asarray(sample["flowrate"], dtype=np.float64)
    collected["physical_pressure"].append(physical_p.ravel())
    collected["physical_flowrate"].append(physical_q.ravel())
    collected["physical_delta_pressure"].append(np.diff(physical_p[steady], axis=0).ravel())
    collected["physical_delta_flowrate"].append(np.diff(physical_q[steady], axis=0).ravel())
    collected["linear_deviation_pressure"].append((pressure - linear_pressure)[steady].ravel())
    collected["linear_deviation_flowrate"].append((flowrate - linear_flowrate)[steady].ravel())
    collected["area"].append(sample["area"])
    for key in ("period", "diastolic", "systolic"):
        collected[key].append(np.atleast_1d(sample[key]))
    for key in ("R1", "C", "R2"):
        collected[key].append(sample[key][outlets])
    for j, key in enumerate(("dx", "dy", "dz", "distance")):
        collected[key].append(sample["edge_features"][:, j])
    for key, value in zip(inlet_feature_names(len(sample["inlet_impedance"]) // 2),
                          inlet_response(sample, scales), strict=True):  # fmt: skip
        collected[key].append(np.atleast_1d(value))


def inlet_response(sample: dict[str, Any], scales: tuple[float, float, np.ndarray]) -> np.ndarray:
    """The inlet impedance made dimensionless by the sample's scales: [1 + 2·harmonics].

    First the lumped model's cycle-mean inlet pressure in the model's pressure units,
    (Z_0·Q̄_in − p_dia) / (p_sys − p_dia); then per harmonic |Z_k|·Q̄_in / (p_sys − p_dia) (the
    pressure swing a unit-amplitude relative inflow harmonic drives) and arg Z_k.
    """
    offset, pressure_scale, flow_scale = scales
    mean_inflow = float(flow_scale[np.asarray(sample["node_type"]) == INLET][0])
    impedance = np.asarray(sample["inlet_impedance"], dtype=np.float64)
    response = impedance.copy()
    response[0] = (impedance[0] * mean_inflow - offset) / pressure_scale
    response[1::2] = impedance[1::2] * mean_inflow / pressure_scale
    return response


def _statistics(collected: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    statistics = {}
    for key in (*STATISTICS, *(k for k in collected if k.startswith("inlet_"))):
        values = np.concatenate(collected[key]).astype(np.float64)
        std = float(values.std())
        # A constant quantity (e.g. one period for all) must not divide by zero.
        statistics[key] = {"mean": float(values.mean()), "std": std if std > 1e-12 else 1.0}
    return statistics


def load_index(prepared: Path) -> dict[str, Any]:
    """Read `index.json` of a prepared dataset; errors name the file and the fix."""
    path = prepared / "index.json"
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: not found; run the prepare stage first") from error
    except OSError as error:
        raise SciquantError(f"{path}: cannot be read ({error}); rerun the prepare stage") from error
    except UnicodeDecodeError as error:
        raise SciquantError(
            f"{path}: not UTF-8, a damaged file ({error}); rerun the prepare stage"
        ) from error
    except json.JSONDecodeError as error:
        raise SciquantError(f"{path}: not valid JSON ({error}); rerun prepare") from error
    if not isinstance(index, dict):
        raise SciquantError(
            f"{path}: not an object (found a {type(index).__name__}), not written by prepare; "
            "rerun the prepare stage"
        )
    # the md workload's index.json has a `format` and no `workload`
    other = index.get("workload", index.get("format"))
    if other not in (None, "bloodflow"):
        raise SciquantError(
            f"{path}: prepared data of another workload ({other!r}), not blood flow; give the "
            "prepared folder of a bloodflow dataset"
        )
    if index.get("format_version") != FORMAT_VERSION:
        raise SciquantError(
            f"{path}: format version {index.get('format_version')} is not {FORMAT_VERSION}; "
            "rerun the prepare stage with this sciquant"
        )
    missing = [key for key in _INDEX_KEYS if key not in index]
    if missing:
        raise SciquantError(
            f"{path}: no {', '.join(missing)}; not written by prepare (or edited): rerun the "
            "prepare stage"
        )
    return index


#: What every prepared blood-flow `index.json` holds (`prepare` writes them all).
_INDEX_KEYS = ("settings", "simulations", "samples", "node_features", "statistics")


def load_sample(prepared: Path, name: str) -> dict[str, np.ndarray]:
    """One prepared sample's arrays.

    A missing, truncated or damaged file (not a zip archive, a failed checksum, a cut-off
    array) is an error naming it and saying to rerun the prepare stage.
    """
    path = prepared / "graphs" / f"{name}.npz"
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (
        OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error
    ) as error:  # fmt: skip
        raise SciquantError(
            f"{path}: cannot read the sample, missing, truncated or damaged "
            f"({type(error).__name__}: {error}); rerun the prepare stage"
        ) from error
