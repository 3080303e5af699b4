"""Physics checks of a blood-flow rollout, and the no-network baselines, on prepared samples.

A surrogate can keep its L2 error small while breaking a conservation law; these checks show it
before the errors do. Both are measured on the prepared graph's nodes, over the cycle's steps
(after the loading ramp), for the data itself (the floor the graph's coarse sampling leaves) and
for every rollout:

- **junction mass residual** — at every junction node J, the flow entering it minus the flows
  entering its daughters' first kept nodes, |q_J − Σ q_d|, over the cycle-mean inflow, in %
  (mean and max over junctions and steps). The daughters' first nodes lie a piece of vessel
  downstream, whose wall takes up C·dp/dt, so the data's own residual is small but not zero.
- **outlet resistance residual** — at every outlet, the cycle-mean pressure against the
  cycle-mean flow through its Windkessel, |p̄ − q̄·(R1 + R2)| / p̄, in % (mean and max over
  outlets): in a periodic state the capacitor's mean current is zero, so p̄ = q̄·(R1 + R2).

Baselines (`baseline_errors`): the errors of the stored physics priors alone
(`sciquant.workloads.bloodflow.data`: `lumped_*`, `calibrated_*`, `expansion_*`), measured like a
rollout's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sciquant.workloads.bloodflow.data import BRANCH, INLET, JUNCTION, OUTLET
from sciquant.workloads.bloodflow.rollout import relative_error

#: The no-network baselines: name in metrics.json → the sample's series prefix.
BASELINES = {
    "lumped_model": "lumped",
    "calibrated_model": "calibrated",
    "expansion_calibrated_model": "expansion",
}
#: The baseline the retained gain is measured against (metrics.json's `gain_baseline`).
GAIN_BASELINE = "calibrated_model"
_TREE_EDGE_TYPES = (0, 1, 2)  # branch-branch, branch-junction, junction-junction


def series_errors(
    sample: dict[str, Any], pressure: np.ndarray, flowrate: np.ndarray
) -> dict[str, float]:
    """Pressure and flow errors in % of physical series [S, N] against the sample's own."""
    cycle = np.asarray(sample["loading"]) == 0
    mask = (np.asarray(sample["node_type"]) == BRANCH)[None, :].astype(np.float64)
    exact_p = np.asarray(sample["pressure"], dtype=np.float64)[cycle]
    exact_q = np.asarray(sample["flowrate"], dtype=np.float64)[cycle]
    return {
        "pressure_error_pct": 100 * relative_error(np.asarray(pressure)[cycle], exact_p, mask),
        "flowrate_error_pct": 100 * relative_error(np.asarray(flowrate)[cycle], exact_q, mask),
    }


def baseline_errors(sample: dict[str, Any], name: str) -> dict[str, float]:
    """The errors of the prior `name` (a key of `BASELINES`) alone on one sample."""
    prefix = BASELINES[name]
    return series_errors(sample, sample[f"{prefix}_pressure"], sample[f"{prefix}_flowrate"])


def daughters(sample: dict[str, Any]) -> dict[int, list[int]]:
    """Each junction node's downstream tree neighbours (its daughters' first kept nodes)."""
    edge_index = np.asarray(sample["edge_index"])
    edge_type = np.argmax(np.asarray(sample["edge_features"])[:, 4:9], axis=1)
    order = np.asarray(sample["source_points"])  # raw point ids: upstream before downstream
    node_type = np.asarray(sample["node_type"])
    found: dict[int, list[int]] = {int(j): [] for j in np.flatnonzero(node_type == JUNCTION)}
    for (a, b), kind in zip(edge_index.T, edge_type, strict=True):
        if kind in _TREE_EDGE_TYPES and a in found and order[b] > order[a]:
            found[int(a)].append(int(b))
    return found


def physics_checks(
    sample: dict[str, Any], pressure: np.ndarray, flowrate: np.ndarray
) -> dict[str, float]:
    """Junction mass and outlet resistance residuals (%) of physical series [S, N]."""
    cycle = np.asarray(sample["loading"]) == 0
    node_type = np.asarray(sample["node_type"])
    p = np.asarray(pressure, dtype=np.float64)[cycle]
    q = np.asarray(flowrate, dtype=np.float64)[cycle]
    inflow = float(np.abs(q[:, node_type == INLET].mean()))
    checks: dict[str, float] = {}
    residuals = [
        np.abs(q[:, junction] - q[:, children].sum(axis=1))
        for junction, children in daughters(sample).items()
        if children
    ]
    if residuals and inflow > 0:
        stacked = 100 * np.stack(residuals) / inflow
        checks["junction_mass_residual_pct"] = float(stacked.mean())
        checks["junction_mass_residual_pct_max"] = float(stacked.max())
    outlets = np.flatnonzero(node_type == OUTLET)
    resistance = np.asarray(sample["R1"], dtype=np.float64) + np.asarray(
        sample["R2"], dtype=np.float64
    )
    mean_p, mean_q = p[:, outlets].mean(axis=0), q[:, outlets].mean(axis=0)
    usable = (resistance[outlets] > 0) & (np.abs(mean_p) > 0)
    if usable.any():
        relative = np.abs(mean_p - mean_q * resistance[outlets]) / np.abs(mean_p)
        checks["outlet_resistance_residual_pct"] = float(100 * relative[usable].mean())
        checks["outlet_resistance_residual_pct_max"] = float(100 * relative[usable].max())
    return checks


def mean_checks(per_simulation: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each check over simulations (the `_max` ones: the max)."""
    names = sorted({name for checks in per_simulation for name in checks})
    reduce = {True: np.max, False: np.mean}
    return {
        name: float(reduce[name.endswith("_max")]([c[name] for c in per_simulation if name in c]))
        for name in names
    }
