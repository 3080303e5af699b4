"""Prepared blood-flow samples → normalized tensors, and the node features of one time step.

Normalization is z-score with the training split's statistics (`index.json`):
`x_n = (x - mean) / std`. Pressure and flow are first made dimensionless
(`sciquant.workloads.bloodflow.data.sample_scales`: p̃ = (p − p_dia) / (p_sys − p_dia), q̃ = q /
(s·Q̄_in) with s the node's steady flow share), so `p_n = (p̃ − mean) / std`;
`GraphTensors.physical` maps a normalized series back to dyn/cm² and cm³/s. The model predicts
normalized increments `Δp_n, Δq_n` of p̃, q̃ with `Δp̃ = Δp_n · std(Δp̃) + mean(Δp̃)`; the state is
advanced in those units then re-normalized.

Node features, in order (`sciquant.workloads.bloodflow.data.node_feature_names`; 53 with the default
3 harmonics): p, q, area, tangent (3), node type one-hot (4), period, diastolic, systolic, R1, C,
R2 (outlets only, else 0) — as in the reference — then the tree's linear hemodynamics
(`sciquant.workloads.bloodflow.network`): the steady flow share s, the steady pressure drop from the
inlet in pulse pressures (Q̄_in · drop per unit inflow / (p_sys − p_dia)), the steady Borda–Carnot
loss where the graph widens into the node and its sum from the inlet (`expansion_loss`,
`expansion_drop`, Q̄_in² · loss per unit inflow² / (p_sys − p_dia): where a stenosis's throat
recovers, and everywhere downstream of it), the calibrated prior's fit (log of its stiffness and
viscosity factors, its pressure shift in pulse pressures: how far the inlet's pressure is from
what any lumped tree gives), per harmonic of the cycle the flow's and the pressure's amplitude − 1
and phase (relative to s·inflow and to the inlet's pressure), and, the same on every node, the
tree's input impedance (`inlet_response`: the lumped model's mean inlet pressure, then per
harmonic |Z_in|·Q̄_in / (p_sys − p_dia) and arg Z_in; z-scored); then the reference's loading flag
and next-step inlet flow, the inlet flow's increment to the next step (`inlet_increment`), the
state's increment from the previous step (`state_increment`: pressure, flow), the lumped tree's
own step under the imposed inflow and the state's departure from it (`linear_features`: 4), and
the quasi-steady expansion loss under the prior's flow, its step and its level
(`expansion_features`: 2).

Measured on the default study's earlier, linear-circuit data (the lumped model's own physics; the
embedded data is nonlinear 1D now, where the network's gain over the calibrated prior is much
smaller — see the end of this docstring and the README), flow error, same budget: reference
features 47.7 %; + inlet increment and per-simulation scales 43.6 % (+ area-weighted loss 34.0 %);
+ steady share as feature 16.7 %, and as per-node flow scale 12.4 %; + flow harmonics 8.8 %; +
pressure drop and harmonics 8.2 % (pressure 4.1 → 3.7 %). Later, as the means of two seeds with the
per-branch linear flow fit of the rollout: 3.76 % / 8.61 % (pressure / flow); + previous increments
3.58 / 7.93 %; with three times the training, 3.17 / 5.30 %, and + the inlet impedance 2.39 / 6.01
% (the pressure level the inflow meets depends on resistances and compliances at outlets many
message-passing hops away; locally no node sees it). Seed 0 at that point: 2.08 / 6.37 %; + the
lumped step and departure as features: 0.70 / 1.49 % (the lumped step without the departure: 2.00 /
7.04 %); the network's output as a correction to the lumped step (`step_increments`): 0.63 / 1.26
%. The lumped tree's response alone scores 0.70 / 1.45 % on the same test simulations: the network
has the departure from it to learn.

On the nonlinear 1D data (default study, 13 test trees, network error ÷ calibrated prior's,
pressure / flow; seeds 0 and 1): the 46 features before the expansion losses ×0.87 / ×0.90;
+ every stenosis throat kept as a node (`prepare.throat_narrowing`) ×0.85 / ×1.00; + the
expansion losses, static and under the prior's flow ×0.77 / ×0.93 (seed 0 ×0.71 / ×0.87,
seed 1 ×0.82 / ×0.98); + the calibrated prior's fit ×0.79 / ×0.93 (×0.77 / ×0.87 and
×0.80 / ×0.99). Correcting the plain lumped prior instead (`prepare.prior: lumped`, seed 0)
gave ×0.69 / ×1.36: far better on the worst tree, worse on most others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow.data import (
    BRANCH,
    INLET,
    OUTLET,
    REFERENCE_NODE_FEATURES,
    inlet_feature_names,
    inlet_response,
    node_feature_names,
    sample_scales,
    scaled_series,
)

#: How a MeshGraphNet sees and advances the state (`models.<name>.formulation`):
#: `residual` — the 53 features above, per-simulation dimensionless p and q, the output a
#: correction to the physics prior's step, branch flows fitted by a line (`prepare.branch_fit`);
#: `reference` — the reference's 18 node features (`REFERENCE_NODE_FEATURES`), p and q z-scored
#: in physical units, the output the increments themselves, branch flows averaged.
FORMULATIONS = ("residual", "reference")
#: The `expansion_drop` column of `GraphTensors.static` (the node features less p and q).
EXPANSION_COLUMN = node_feature_names().index("expansion_drop") - 2
#: Static columns the reference formulation keeps (area, tangent, node type, period,
#: diastolic, systolic, R1, C, R2): the first ones of `GraphTensors.static`.
REFERENCE_STATIC = len(REFERENCE_NODE_FEATURES) - 4
#: The reference formulation z-scores physical quantities: these statistics stand in.
_PHYSICAL_STATISTICS = ("pressure", "flowrate", "delta_pressure", "delta_flowrate")


def check_formulation(formulation: str, key: str = "formulation") -> str:
    """`formulation` if known, else SciquantError naming `key`."""
    if formulation not in FORMULATIONS:
        raise SciquantError(f"{key}: {formulation!r} is not one of {', '.join(FORMULATIONS)}")
    return formulation


def feature_count(formulation: str, index: dict[str, Any]) -> int:
    """The model's node-feature count for `formulation` on a prepared dataset's `index.json`."""
    if check_formulation(formulation) == "reference":
        return len(REFERENCE_NODE_FEATURES)
    return len(index["node_features"])


@dataclass
class Normalizer:
    """Means and stds of the prepared dataset's quantities, and the model's formulation."""

    mean: dict[str, float]
    std: dict[str, float]
    formulation: str = "residual"

    @classmethod
    def from_statistics(
        cls, statistics: dict[str, dict[str, float]], formulation: str = "residual"
    ) -> Normalizer:
        """The statistics of `index.json`; the reference formulation takes the physical ones."""
        check_formulation(formulation)
        chosen = dict(statistics)
        if formulation == "reference":
            for key in _PHYSICAL_STATISTICS:
                chosen[key] = statistics[f"physical_{key}"]
        return cls(
            mean={k: float(v["mean"]) for k, v in chosen.items()},
            std={k: float(v["std"]) for k, v in chosen.items()},
            formulation=formulation,
        )

    @classmethod
    def of_checkpoint(cls, state: dict[str, Any]) -> Normalizer:
        """The normalizer a trained (or quantized) model's checkpoint dict was trained with."""
        return cls.from_statistics(state["statistics"], state.get("formulation", "residual"))

    def normalize(self, key: str, values: Any) -> Any:
        return (values - self.mean[key]) / self.std[key]

    def denormalize(self, key: str, values: Any) -> Any:
        return values * self.std[key] + self.mean[key]


@dataclass
class GraphTensors:
    """One sample as tensors: static node features, edges, normalized time series.

    Shapes: `static` [N, F − 13] (all features but p, q and the last eleven), `edge_features`
    [E, 9], `edge_index` [2, E], `pressure` and `flowrate` [S, N] (normalized), `loading` [S],
    `node_type`, `branch_id` and `branch_position` [N] (the abscissa of the rollout's per-branch
    flow fit, `sciquant.workloads.bloodflow.data.branch_positions`), `linear_pressure` and
    `linear_flowrate` [S, N] (the lumped tree's response to the imposed inflow, normalized as
    `pressure` and `flowrate`; `linear_features`).
    """

    name: str
    static: Tensor
    edge_features: Tensor
    edge_index: Tensor
    pressure: Tensor
    flowrate: Tensor
    linear_pressure: Tensor
    linear_flowrate: Tensor
    loading: Tensor
    node_type: Tensor
    branch_id: Tensor
    branch_position: Tensor
    loading_steps: int
    # [N] per-node copies of the sample's scales (`sample_scales`): p = p̃ · scale + offset.
    pressure_offset: Tensor
    pressure_scale: Tensor
    flow_scale: Tensor
    inlet_index: Tensor | None = None  # [N] each node's inlet node, when graphs are merged

    def physical(self, norm: Normalizer, field: str, values: Any) -> Any:
        """Normalized `pressure` or `flowrate` series [S, N] (tensor or array) → dyn/cm², cm³/s."""
        dimensionless = norm.denormalize(field, values)
        if field == "pressure":
            scale, offset = self.pressure_scale, self.pressure_offset
        elif field == "flowrate":
            scale, offset = self.flow_scale, torch.zeros_like(self.flow_scale)
        else:
            raise ValueError(f"no physical scale for {field!r}")
        if isinstance(values, np.ndarray):
            scale = scale.cpu().numpy().astype(np.float64)
            offset = offset.cpu().numpy().astype(np.float64)
            return dimensionless.astype(np.float64) * scale + offset
        return dimensionless * scale.to(values.device) + offset.to(values.device)

    def to(self, device: torch.device | str) -> GraphTensors:
        """The same sample with every tensor on `device` (itself if they are there already)."""
        device = torch.device(device)
        if self.static.device == device:
            return self
        moved = {
            f.name: value.to(device) if isinstance(value, Tensor) else value
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }
        return GraphTensors(**moved)

    def inlet_of_nodes(self) -> Tensor:
        """[N] index of the inlet node of each node's own graph (its inlet flow is imposed)."""
        if self.inlet_index is not None:
            return self.inlet_index
        inlet_node = int(torch.nonzero(self.inlet)[0])
        return torch.full((self.num_nodes,), inlet_node, dtype=torch.long)

    @property
    def num_nodes(self) -> int:
        return self.static.shape[0]

    @property
    def num_steps(self) -> int:
        return self.pressure.shape[0]

    @property
    def inlet(self) -> Tensor:
        return self.node_type == INLET


def to_tensors(name: str, sample: dict[str, np.ndarray], norm: Normalizer) -> GraphTensors:
    """Normalize one prepared sample (see `sciquant.workloads.bloodflow.data` for its arrays)."""
    n = len(sample["area"])
    node_type = sample["node_type"].astype(np.int64)
    outlet = (node_type == OUTLET).astype(np.float32)
    one_hot = np.eye(4, dtype=np.float32)[node_type]

    def scalar(key: str) -> np.ndarray:
        return np.full((n, 1), norm.normalize(key, float(sample[key])), dtype=np.float32)

    def outlet_value(key: str) -> np.ndarray:
        return (norm.normalize(key, sample[key]) * outlet)[:, None].astype(np.float32)

    offset, pressure_scale, flow_scale = scales = sample_scales(sample, name)
    # The reference formulation sees physical p and q (z-scored with `physical_*` statistics).
    series_scales = (0.0, 1.0, np.ones(n)) if norm.formulation == "reference" else scales
    pressure, flowrate = scaled_series(sample, series_scales)
    linear_pressure, linear_flowrate = scaled_series(
        sample, series_scales, ("linear_pressure", "linear_flowrate")
    )
    mean_inflow = float(flow_scale[node_type == INLET][0])  # the inlet's share is 1
    hemodynamics = np.concatenate(
        [
            sample["flow_share"][:, None],
            (sample["pressure_drop"] * mean_inflow / pressure_scale)[:, None],
            (sample["expansion_loss"] * mean_inflow**2 / pressure_scale)[:, None],
            (sample["expansion_drop"] * mean_inflow**2 / pressure_scale)[:, None],
            np.full((n, 1), math.log(float(sample["calibrated_stiffness_factor"]))),
            np.full((n, 1), math.log(float(sample["calibrated_viscosity_factor"]))),
            np.full((n, 1), float(sample["calibrated_pressure_shift"]) / pressure_scale),
            sample["flow_response"],
            sample["pressure_response"],
        ],
        axis=1,
    )
    names = inlet_feature_names(len(sample["inlet_impedance"]) // 2)
    response = inlet_response(sample, scales)
    inlet_values = [norm.normalize(k, v) for k, v in zip(names, response, strict=True)]
    static = np.concatenate(
        [
            norm.normalize("area", sample["area"])[:, None],
            sample["tangent"],
            one_hot,
            scalar("period"),
            scalar("diastolic"),
            scalar("systolic"),
            outlet_value("R1"),
            outlet_value("C"),
            outlet_value("R2"),
            hemodynamics,
            np.broadcast_to(np.asarray(inlet_values, dtype=np.float32), (n, len(names))),
        ],
        axis=1,
    ).astype(np.float32)
    edges = sample["edge_features"].astype(np.float32).copy()
    for j, key in enumerate(("dx", "dy", "dz", "distance")):
        edges[:, j] = norm.normalize(key, edges[:, j])
    loading = sample["loading"]
    return GraphTensors(
        name=name,
        static=torch.from_numpy(static),
        edge_features=torch.from_numpy(edges),
        edge_index=torch.from_numpy(sample["edge_index"].astype(np.int64)),
        pressure=torch.from_numpy(norm.normalize("pressure", pressure).astype(np.float32)),
        flowrate=torch.from_numpy(norm.normalize("flowrate", flowrate).astype(np.float32)),
        linear_pressure=torch.from_numpy(
            norm.normalize("pressure", linear_pressure).astype(np.float32)
        ),
        linear_flowrate=torch.from_numpy(
            norm.normalize("flowrate", linear_flowrate).astype(np.float32)
        ),
        loading=torch.from_numpy(loading.astype(np.float32)),
        node_type=torch.from_numpy(node_type),
        branch_id=torch.from_numpy(sample["branch_id"].astype(np.int64)),
        # The reference averages each branch's flow: the fit's abscissa 0 gives the mean.
        branch_position=torch.from_numpy(
            sample["branch_position"].astype(np.float32) * (norm.formulation != "reference")
        ),
        loading_steps=int(loading.sum()),
        pressure_offset=torch.full((n,), series_scales[0], dtype=torch.float64),
        pressure_scale=torch.full((n,), series_scales[1], dtype=torch.float64),
        flow_scale=torch.from_numpy(np.asarray(series_scales[2], dtype=np.float64)),
    )


def merge_graphs(graphs: list[GraphTensors]) -> tuple[GraphTensors, list[tuple[slice, int]]]:
    """Several samples as one disjoint graph (rolled out at once), and each one's nodes and steps.

    Time series are padded to the longest sample by repeating their last step; branch ids are
    made unique across samples. Every sample must have the same loading ramp.
    """
    steps = max(g.num_steps for g in graphs)
    if len({g.loading_steps for g in graphs}) != 1:
        raise ValueError("merged samples must share their number of loading steps")

    def padded(series: Tensor) -> Tensor:
        return torch.cat([series, series[-1:].expand(steps - series.shape[0], -1)])

    parts: list[tuple[slice, int]] = []
    inlet_index, branch_id, edge_index = [], [], []
    node_offset = branch_offset = 0
    for g in graphs:
        parts.append((slice(node_offset, node_offset + g.num_nodes), g.num_steps))
        inlet_index.append(g.inlet_of_nodes() + node_offset)
        branch_id.append(torch.where(g.branch_id >= 0, g.branch_id + branch_offset, -1))
        edge_index.append(g.edge_index + node_offset)
        node_offset += g.num_nodes
        branch_offset += int(g.branch_id.max()) + 1
    loading = graphs[0].loading
    merged = GraphTensors(
        name="+".join(g.name for g in graphs),
        static=torch.cat([g.static for g in graphs]),
        edge_features=torch.cat([g.edge_features for g in graphs]),
        edge_index=torch.cat(edge_index, dim=1),
        pressure=torch.cat([padded(g.pressure) for g in graphs], dim=1),
        flowrate=torch.cat([padded(g.flowrate) for g in graphs], dim=1),
        linear_pressure=torch.cat([padded(g.linear_pressure) for g in graphs], dim=1),
        linear_flowrate=torch.cat([padded(g.linear_flowrate) for g in graphs], dim=1),
        loading=torch.cat([loading, loading.new_zeros(steps - loading.shape[0])]),
        node_type=torch.cat([g.node_type for g in graphs]),
        branch_id=torch.cat(branch_id),
        branch_position=torch.cat([g.branch_position for g in graphs]),
        loading_steps=graphs[0].loading_steps,
        pressure_offset=torch.cat([g.pressure_offset for g in graphs]),
        pressure_scale=torch.cat([g.pressure_scale for g in graphs]),
        flow_scale=torch.cat([g.flow_scale for g in graphs]),
        inlet_index=torch.cat(inlet_index),
    )
    return merged, parts


def node_features(
    static: Tensor,
    pressure: Tensor,
    flowrate: Tensor,
    loading: Tensor,
    next_inlet: Tensor,
    inlet_step: Tensor,
    previous: Tensor,
    linear: Tensor,
) -> Tensor:
    """The node features of one step: [N, F] from state p, q [N], flags/inlet flow [N].

    `next_inlet`: each node's graph's imposed inlet flow at the next step (normalized);
    `inlet_step`: its increment from this step (`inlet_increment`); `previous` [N, 2]: the
    state's increment from the previous step (`state_increment`); `linear` [N, 4]: the lumped
    tree's step and the state's departure from it (`linear_features`).
    """
    return torch.cat(
        [pressure[:, None], flowrate[:, None], static, loading[:, None], next_inlet[:, None],
         inlet_step[:, None], previous, linear],
        dim=1,
    )  # fmt: skip


def linear_features(
    pressure: Tensor,
    flowrate: Tensor,
    linear_now: tuple[Tensor, Tensor],
    linear_next: tuple[Tensor, Tensor],
    norm: Normalizer,
) -> Tensor:
    """The lumped tree's increment to the next step and the state's departure from it: [N, 4].

    `linear_now`, `linear_next`: the normalized linear pressure and flow [N] at this step and
    the next (`GraphTensors.linear_pressure` / `linear_flowrate`). Columns: the linear
    increment of p and q in model-output units (as `state_increment`), then the departures
    p̃ − p̃_lin and q̃ − q̃_lin, z-scored with the training data's own statistics
    (`linear_deviation_*`). Their spread is 15–20 times smaller than that of p̃ and q̃: left in
    the state's units they would share one 8-bit input range with features 20 times wider
    (measured on the default study while the network still had to reproduce the lumped step
    itself: W4A8 min-max flow error ×1.93 of FP32 that way, ×1.13 z-scored).

    The inflow is imposed for the whole cycle, so the tree's linear response to it is known in
    advance at every node (`sciquant.workloads.bloodflow.network.periodic_response`). The last
    features of the reference carry the inflow only at the inlet node and its next value to every
    node; this is that inflow carried through the tree's lumped hemodynamics to each node, every
    step: the network is left to learn how the data depart from the lumped model (the coarse tree,
    and for real data the nonlinear 1D flow), and the departure tells it how far its own rollout
    has drifted from that trajectory.
    """
    (p_now, q_now), (p_next, q_next) = linear_now, linear_next
    return torch.stack(
        [
            norm.normalize("delta_pressure", (p_next - p_now) * norm.std["pressure"]),
            norm.normalize("delta_flowrate", (q_next - q_now) * norm.std["flowrate"]),
            norm.normalize("linear_deviation_pressure", (pressure - p_now) * norm.std["pressure"]),
            norm.normalize("linear_deviation_flowrate", (flowrate - q_now) * norm.std["flowrate"]),
        ],
        dim=1,
    )


def step_inputs(
    norm: Normalizer,
    static: Tensor,
    pressure: Tensor,
    flowrate: Tensor,
    loading: Tensor,
    next_inlet: Tensor,
    inlet_now: Tensor,
    previous: Tensor,
    linear_now: tuple[Tensor, Tensor],
    linear_next: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor | None]:
    """One rollout step's model input [N, F] and the prior's step [N, 2] (None: no prior).

    The one place a step's input is assembled, for training, calibration and evaluation alike,
    by `norm.formulation`. State p, q [N] (normalized); `loading`, `next_inlet` (the imposed
    inlet flow at the next step), `inlet_now` (the inlet flow now) [N] per node; `previous`
    [N, 2] the state's increment from the step before (`state_increment`); `linear_now`,
    `linear_next`: the prior's p, q [N] now and at the next step. The residual formulation's
    53 features are `node_features` and `expansion_features`; the reference's 18 are p, q,
    the reference's static features, the loading flag and the next inlet flow.
    """
    if norm.formulation == "reference":
        x = torch.cat(
            [pressure[:, None], flowrate[:, None], static[:, :REFERENCE_STATIC],
             loading[:, None], next_inlet[:, None]],
            dim=1,
        )  # fmt: skip
        return x, None
    linear = linear_features(pressure, flowrate, linear_now, linear_next, norm)
    step_in = inlet_increment(next_inlet, inlet_now, norm)
    x = node_features(static, pressure, flowrate, loading, next_inlet, step_in, previous, linear)
    expansion = expansion_features(static, linear_now[1], linear_next[1], norm)
    return torch.cat([x, expansion], dim=1), linear[:, :2]


def expansion_features(
    static: Tensor, flow_now: Tensor, flow_next: Tensor, norm: Normalizer
) -> Tensor:
    """The quasi-steady expansion loss under the prior's flow: its step and its level [N, 2].

    `flow_now`, `flow_next`: the prior's normalized flow [N] at this step and the next. With q̃
    the prior's dimensionless flow (1 on average over the cycle) and D the node's
    `expansion_drop` feature (the steady Borda–Carnot losses from the inlet, in pulse pressures
    at the mean inflow), the loss now is D·q̃|q̃|: a stenosis's pressure drop grows with the
    square of the flow through it (the Young–Tsai type term the lumped prior lacks). Columns:
    the step of −D·q̃|q̃| in model-output units (as the prior's step in `linear_features`), then
    −D·q̃|q̃| in the pressure's z-score scale. The flow through the throat is taken as the node's
    own, which holds in the throat's vessel and, scaled, downstream of it; the network learns the
    rest (the loss coefficient, the unsteady terms, the flow split the loss shifts).
    """
    drop = static[:, EXPANSION_COLUMN]
    q_now = norm.denormalize("flowrate", flow_now)
    q_next = norm.denormalize("flowrate", flow_next)
    loss_now = -drop * q_now * q_now.abs()
    loss_next = -drop * q_next * q_next.abs()
    return torch.stack(
        [
            norm.normalize("delta_pressure", loss_next - loss_now),
            loss_now / norm.std["pressure"],
        ],
        dim=1,
    )


def step_increments(correction: Tensor, prior_step: Tensor | None) -> Tensor:
    """A step's increments of p and q [N, 2], model-output units: the prior's step plus the
    network's correction (the network's output alone where there is no prior).

    `prior_step`: the prior's own step (`step_inputs`, the first two columns of
    `linear_features`); `correction`: the network's output [N, 2]. The residual network learns
    only how the data depart from the prior's step, not the step itself: a network that outputs
    zeros rolls the prior's trajectory out. Measured on the default study (seed 0), with the same
    features and budget: 0.63 % / 1.26 % pressure / flow error (the lumped model alone 0.70 % /
    1.45 %) against 0.70 % / 1.49 % when the network had to reproduce the lumped step from its
    input feature itself.
    """
    return correction if prior_step is None else correction + prior_step


def state_increment(
    pressure: Tensor,
    flowrate: Tensor,
    pressure_before: Tensor,
    flowrate_before: Tensor,
    norm: Normalizer,
) -> Tensor:
    """The increment of normalized p, q [N] from the step before, in model-output units [N, 2].

    Two node features (`previous_delta_*`). The series are smooth on the time step (on the
    default study's test set, Δ(t) = Δ(t−1) alone explains 97 % of the pressure increments' and
    95 % of the flow increments' variance), so the model predicts the next increment from the
    last one rather than from the state alone, as learned simulators take the previous
    velocities. At the first step (no step before) it is the increment 0: callers pass the state
    itself as `*_before`.
    """
    delta_p = (pressure - pressure_before) * norm.std["pressure"]
    delta_q = (flowrate - flowrate_before) * norm.std["flowrate"]
    return torch.stack(
        [norm.normalize("delta_pressure", delta_p), norm.normalize("delta_flowrate", delta_q)],
        dim=1,
    )  # fmt: skip


def inlet_increment(next_inlet: Tensor, inlet_now: Tensor, norm: Normalizer) -> Tensor:
    """The imposed inlet flow's increment to the next step, in normalized-increment units.

    The 19th node feature. Every node needs it (the whole tree's flow follows the inflow's
    change), but the reference's features carry it only through the inlet node's own state,
    which most nodes are more message-passing hops away from than there are processor blocks.
    Scaled like the model's flow output (std of the flow increment), not like the flow itself.
    """
    return (next_inlet - inlet_now) * (norm.std["flowrate"] / norm.std["delta_flowrate"])


def boundary_mask(node_type: Tensor) -> Tensor:
    """True on inlet and outlet nodes (weighted up in the loss)."""
    return (node_type == INLET) | (node_type == OUTLET)


def branch_mask(node_type: Tensor) -> Tensor:
    """True on branch nodes: the nodes the rollout errors are measured on."""
    return node_type == BRANCH


def true_state_inputs(
    graph: GraphTensors, t: int, norm: Normalizer
) -> tuple[Tensor, Tensor, Tensor]:
    """The model's inputs (node features, edge features, edge index) at step `t` of `graph`'s
    true states, as a rollout at that state builds them (each node with its own sample's inlet,
    so also for several samples merged into one graph; at t = 0 the previous increment is 0):
    the one assembly of teacher-forced inputs that calibration, quantization debugging and the
    benchmarks share."""
    inlet = graph.inlet_of_nodes()
    before = max(t - 1, 0)
    previous = state_increment(
        graph.pressure[t], graph.flowrate[t], graph.pressure[before], graph.flowrate[before], norm
    )
    x, _ = step_inputs(
        norm, graph.static, graph.pressure[t], graph.flowrate[t],
        graph.loading[t] * torch.ones(graph.num_nodes), graph.flowrate[t + 1][inlet],
        graph.flowrate[t][inlet], previous,
        (graph.linear_pressure[t], graph.linear_flowrate[t]),
        (graph.linear_pressure[t + 1], graph.linear_flowrate[t + 1]),
    )  # fmt: skip
    return x, graph.edge_features, graph.edge_index
