"""Prepared blood-flow samples → normalized tensors, and the 18 node features of one time step.

Normalization is z-score with the training split's statistics (`index.json`):
`x_n = (x - mean) / std`. The model predicts normalized increments `Δp_n, Δq_n` with
`Δp = Δp_n · std(Δp) + mean(Δp)`; the state is advanced in physical units then re-normalized.
Node features, in order (`sciquant.data.bloodflow.NODE_FEATURES`): p, q, area, tangent (3),
node type one-hot (4), period, diastolic, systolic, R1, C, R2 (outlets only, else 0), loading
flag, next-step inlet flow.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sciquant.data.bloodflow import BRANCH, INLET, OUTLET

STATIC_FEATURES = 14  # area, tangent 3, one-hot 4, period, diastolic, systolic, R1, C, R2


@dataclass
class Normalizer:
    """Means and stds of the prepared dataset's quantities (float32 tensors)."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def from_statistics(cls, statistics: dict[str, dict[str, float]]) -> Normalizer:
        return cls(
            mean={k: float(v["mean"]) for k, v in statistics.items()},
            std={k: float(v["std"]) for k, v in statistics.items()},
        )

    def normalize(self, key: str, values: Any) -> Any:
        return (values - self.mean[key]) / self.std[key]

    def denormalize(self, key: str, values: Any) -> Any:
        return values * self.std[key] + self.mean[key]


@dataclass
class GraphTensors:
    """One sample as tensors: static node features, edges, normalized time series.

    Shapes: `static` [N, 14], `edge_features` [E, 9], `edge_index` [2, E], `pressure` and
    `flowrate` [S, N] (normalized), `loading` [S], `node_type` and `branch_id` [N].
    """

    name: str
    static: Tensor
    edge_features: Tensor
    edge_index: Tensor
    pressure: Tensor
    flowrate: Tensor
    loading: Tensor
    node_type: Tensor
    branch_id: Tensor
    loading_steps: int
    inlet_index: Tensor | None = None  # [N] each node's inlet node, when graphs are merged

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
    """Normalize one prepared sample (see `sciquant.data.bloodflow` for its arrays)."""
    n = len(sample["area"])
    node_type = sample["node_type"].astype(np.int64)
    outlet = (node_type == OUTLET).astype(np.float32)
    one_hot = np.eye(4, dtype=np.float32)[node_type]

    def scalar(key: str) -> np.ndarray:
        return np.full((n, 1), norm.normalize(key, float(sample[key])), dtype=np.float32)

    def outlet_value(key: str) -> np.ndarray:
        return (norm.normalize(key, sample[key]) * outlet)[:, None].astype(np.float32)

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
        pressure=torch.from_numpy(
            norm.normalize("pressure", sample["pressure"]).astype(np.float32)
        ),
        flowrate=torch.from_numpy(
            norm.normalize("flowrate", sample["flowrate"]).astype(np.float32)
        ),
        loading=torch.from_numpy(loading.astype(np.float32)),
        node_type=torch.from_numpy(node_type),
        branch_id=torch.from_numpy(sample["branch_id"].astype(np.int64)),
        loading_steps=int(loading.sum()),
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
        loading=torch.cat([loading, loading.new_zeros(steps - loading.shape[0])]),
        node_type=torch.cat([g.node_type for g in graphs]),
        branch_id=torch.cat(branch_id),
        loading_steps=graphs[0].loading_steps,
        inlet_index=torch.cat(inlet_index),
    )
    return merged, parts


def node_features(
    static: Tensor, pressure: Tensor, flowrate: Tensor, loading: Tensor, next_inlet: Tensor
) -> Tensor:
    """The 18 node features of one step: [N, 18] from state p, q [N], flags/inlet flow [N]."""
    return torch.cat(
        [pressure[:, None], flowrate[:, None], static, loading[:, None], next_inlet[:, None]], dim=1
    )


def boundary_mask(node_type: Tensor) -> Tensor:
    """True on inlet and outlet nodes (weighted up in the loss)."""
    return (node_type == INLET) | (node_type == OUTLET)


def branch_mask(node_type: Tensor) -> Tensor:
    """True on branch nodes: the nodes the rollout errors are measured on."""
    return node_type == BRANCH
