"""Timing of :class:`sciquant.models.meshgraphnet.MeshGraphNet` on random tree graphs.

Forward (under ``torch.inference_mode``) and one training step (forward, MSE loss on random
targets, backward, Adam step), with the bloodflow hyper-parameters, side by side with PhysicsNeMo
2.2.2's MeshGraphNet (PyG backend) as measured by peers on the same machine kind (2 CPU cores),
not in this run. Because that reference comes from another run (and possibly another host of the
same kind), the same-run baseline ``concat_trick=False`` (the textbook concat-then-Linear data
flow that PhysicsNeMo's default also uses) is timed too, interleaved with ours.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig, random_tree_graph

# PhysicsNeMo 2.2.2 MeshGraphNet (PyG backend), bloodflow hyper-parameters, random tree graphs;
# measured on this machine kind (2 cores; noisy ±15 %), not in this run. (low, high) in ms.
REFERENCE_MS: dict[int, dict[str, tuple[float, float]]] = {
    1000: {"forward": (6.4, 7.0), "train_step": (26.0, 30.0)},
    20000: {"forward": (157.0, 172.0), "train_step": (482.0, 488.0)},
}

MODES = ("forward", "train_step")


def _time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall-clock ms per call; the functions take turns, so slow drifts hit all of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times_ms: list[float], prefix: str = "") -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return {
        f"{prefix}median_ms": median,
        f"{prefix}q1_ms": q1,
        f"{prefix}q3_ms": q3,
        f"{prefix}iqr_ms": q3 - q1,
    }


def _callables(model: MeshGraphNet, x, e, edge_index, target) -> dict[str, Callable[[], object]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def forward():
        model.eval()
        with torch.inference_mode():
            return model(x, e, edge_index)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, e, edge_index), target)
        loss.backward()
        optimizer.step()
        return loss

    return {"forward": forward, "train_step": train_step}


def run(
    sizes: Sequence[int] = (1000, 20000),
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    seed: int = 0,
    baseline: bool = True,
) -> list[dict]:
    """Times forward and training step for each graph size; one row per (size, mode).

    Each row: ``num_nodes``, ``num_edges``, ``mode``, ``median_ms``, ``q1_ms``, ``q3_ms``,
    ``iqr_ms``, ``repeats``, ``warmup``, ``threads``, ``loadavg_1min`` (before, after); with
    ``baseline`` also ``baseline_median_ms`` ... for the same model with ``concat_trick=False``,
    timed interleaved with ours. ``threads`` (if given) is set with ``torch.set_num_threads``
    for the run and restored afterwards; otherwise torch's current setting is used.
    """
    if repeats < 4:
        raise ValueError(f"repeats must be >= 4 for an IQR, got {repeats}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = []
        config = MeshGraphNetConfig()
        for n in sizes:
            x, e, edge_index = random_tree_graph(
                n, seed, config.node_features, config.edge_features
            )
            target = torch.randn(n, config.outputs, generator=torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)
            ours = MeshGraphNet(config)
            impls = {"ours": ours}
            if baseline:
                naive = MeshGraphNet(config, concat_trick=False)
                naive.load_state_dict(ours.state_dict())
                impls["baseline"] = naive
            fns = {name: _callables(m, x, e, edge_index, target) for name, m in impls.items()}
            for mode in MODES:
                load_before = os.getloadavg()[0]
                times = _time_interleaved(
                    {name: fn[mode] for name, fn in fns.items()}, repeats, warmup
                )
                row = {
                    "num_nodes": n,
                    "num_edges": int(edge_index.shape[1]),
                    "mode": mode,
                    **_summary(times["ours"]),
                    "repeats": repeats,
                    "warmup": warmup,
                    "threads": torch.get_num_threads(),
                    "loadavg_1min": (load_before, os.getloadavg()[0]),
                }
                if baseline:
                    row.update(_summary(times["baseline"], prefix="baseline_"))
                rows.append(row)
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def format_table(rows: Sequence[dict]) -> str:
    """Side by side: ours (median, IQR), PhysicsNeMo reference midpoint and reference / ours;
    with a same-run baseline also its median and baseline / ours."""
    with_baseline = any("baseline_median_ms" in r for r in rows)
    header = (
        f"{'nodes':>6} {'edges':>6} {'mode':<10} {'ours median':>12} {'IQR':>8} "
        f"{'PhysicsNeMo*':>13} {'ref/ours':>8}"
    )
    if with_baseline:
        header += f" {'naive (this run)':>17} {'naive/ours':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ref = REFERENCE_MS.get(r["num_nodes"], {}).get(r["mode"])
        if ref is None:
            ref_text, ratio_text = "n/a", "n/a"
        else:
            mid = (ref[0] + ref[1]) / 2
            ref_text = f"{mid:.1f} ms"
            ratio_text = f"{mid / r['median_ms']:.2f}x"
        line = (
            f"{r['num_nodes']:>6} {r['num_edges']:>6} {r['mode']:<10} "
            f"{r['median_ms']:>9.2f} ms {r['iqr_ms']:>5.2f} ms {ref_text:>13} {ratio_text:>8}"
        )
        if with_baseline:
            if "baseline_median_ms" in r:
                base = r["baseline_median_ms"]
                line += f" {base:>14.2f} ms {base / r['median_ms']:>9.2f}x"
            else:
                line += f" {'n/a':>17} {'n/a':>10}"
        lines.append(line)
    threads = sorted({r["threads"] for r in rows})
    loads = [v for r in rows for v in r.get("loadavg_1min", ())]
    ranges = "; ".join(
        f"{n} nodes: " + ", ".join(f"{mode} {lo:g}-{hi:g} ms" for mode, (lo, hi) in modes.items())
        for n, modes in REFERENCE_MS.items()
    )
    lines += [
        "",
        "* PhysicsNeMo 2.2.2 MeshGraphNet (PyG backend), bloodflow hyper-parameters, random tree",
        "  graphs: midpoint of the range; reference measured on this machine kind, not in this run",
        "  (noisy ±15 %).",
        f"  Reference ranges: {ranges}.",
        f"  Ours: median and IQR (q3 - q1) of wall time over {rows[0]['repeats'] if rows else 0}"
        f" repeats after {rows[0]['warmup'] if rows else 0} warm-up calls;"
        f" torch threads = {', '.join(map(str, threads))}.",
    ]
    if with_baseline:
        lines.append(
            "  naive (this run): the same model with concat_trick=False (concat, then Linear),"
            " timed interleaved with ours."
        )
    if loads:
        lines.append(
            f"  1-min load average during the run: {min(loads):.2f}-{max(loads):.2f}"
            f" (on {os.cpu_count()} CPUs; a load above the core count means contended timings)."
        )
    return "\n".join(lines)
