"""Timing of :class:`sciquant.models.meshgraphnet.MeshGraphNet` on random tree graphs.

Forward (under ``torch.inference_mode``) and one training step (forward, MSE loss on random
targets, backward, Adam step), with the bloodflow hyper-parameters, side by side with PhysicsNeMo
2.2.2's MeshGraphNet (PyG backend) as measured by peers on the same machine kind (2 CPU cores),
not in this run. Because that reference comes from another run (and possibly another host of the
same kind), the same-run baseline ``concat_trick=False`` (the textbook concat-then-Linear data
flow that PhysicsNeMo's default also uses) is timed too, interleaved with ours.

When PhysicsNeMo's MeshGraphNet (with torch_geometric and torch_scatter) is importable, it is
timed in this run as well, interleaved with ours, built as the bloodflow_1d_mgn example builds it
(PyG backend) and loaded with our weights, after a check that it then computes what ours does.
If it cannot be imported, the table says so (and why) and is otherwise unchanged. A torchvision
whose C++ ops do not load (a build for another torch, e.g. PyPI's CUDA build beside CPU torch) is
imported without them, since PhysicsNeMo's MeshGraphNet does not use them; the table then gives
the pip command that installs the matching build.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sciquant.models.meshgraphnet import MLP, MeshGraphNet, MeshGraphNetConfig, random_tree_graph

# PhysicsNeMo 2.2.2 MeshGraphNet (PyG backend), bloodflow hyper-parameters, random tree graphs;
# measured on this machine kind (2 cores; noisy ±15 %), not in this run. (low, high) in ms.
REFERENCE_MS: dict[int, dict[str, tuple[float, float]]] = {
    1000: {"forward": (6.4, 7.0), "train_step": (26.0, 30.0)},
    20000: {"forward": (157.0, 172.0), "train_step": (482.0, 488.0)},
}

MODES = ("forward", "train_step")

# Same-computation check before PhysicsNeMo is timed: one small tree, and a relative tolerance
# (max |diff| / max |output|) well above float32 rounding through the 5 blocks (~1e-6) and far
# below what a wrong weight or wiring gives (order 1).
CHECK_NODES = 300
CHECK_RTOL = 1e-5


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


def _callables(model: torch.nn.Module, x, e, graph, target) -> dict[str, Callable[[], object]]:
    """``graph``: ``edge_index`` for ours, a PyG ``Data`` for PhysicsNeMo's model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def forward():
        model.eval()
        with torch.inference_mode():
            return model(x, e, graph)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, e, graph), target)
        loss.backward()
        optimizer.step()
        return loss

    return {"forward": forward, "train_step": train_step}


# -- PhysicsNeMo in the same run (optional) ----------------------------------------------------


@dataclass(frozen=True)
class _PhysicsNeMo:
    """PhysicsNeMo's MeshGraphNet class, PyG's ``Data`` class, PhysicsNeMo's version and a note
    on how torchvision was imported (None: as usual)."""

    model_cls: type
    data_cls: type
    version: str
    torchvision_note: str | None = None

    def graph(self, edge_index: torch.Tensor, num_nodes: int):
        return self.data_cls(edge_index=edge_index, num_nodes=num_nodes)

    @torch.no_grad()
    def build(self, ours: MeshGraphNet) -> torch.nn.Module:
        """As examples/healthcare/bloodflow_1d_mgn/train.py builds it (MLP depth and "sum"
        aggregation at that script's defaults, do_concat_trick=False), with ours' weights."""
        c, h, k = ours.config, ours.config.hidden, ours.config.mlp_hidden_layers
        theirs = self.model_cls(
            input_dim_nodes=c.node_features,
            input_dim_edges=c.edge_features,
            output_dim=c.outputs,
            processor_size=c.processor_size,
            mlp_activation_fn="relu",
            num_layers_node_processor=k,
            num_layers_edge_processor=k,
            hidden_dim_processor=h,
            hidden_dim_node_encoder=h,
            num_layers_node_encoder=k,
            hidden_dim_edge_encoder=h,
            num_layers_edge_encoder=k,
            hidden_dim_node_decoder=h,
            num_layers_node_decoder=k,
            aggregation="sum",
            do_concat_trick=False,
            num_processor_checkpoint_segments=0,
            norm_type="LayerNorm",
        )
        _copy_mlp(ours.node_encoder, theirs.node_encoder.model)
        _copy_mlp(ours.edge_encoder, theirs.edge_encoder.model)
        _copy_mlp(ours.decoder, theirs.node_decoder.model)
        blocks = theirs.processor.processor_layers  # [edge 0, node 0, edge 1, node 1, ...]
        for i, (edge_mlp, node_mlp) in enumerate(zip(ours.edge_mlps, ours.node_mlps, strict=True)):
            _copy_mlp(edge_mlp, blocks[2 * i].edge_mlp.model)  # input [e, h_src, h_dst] in both
            # node MLP input: ours [h, agg], PhysicsNeMo's [agg, h]: swap the column blocks
            w = node_mlp.layers[0].weight
            swapped = torch.cat([w[:, h:], w[:, :h]], dim=1)
            _copy_mlp(node_mlp, blocks[2 * i + 1].node_mlp.model, swapped)
        return theirs


def _copy_mlp(src: MLP, dst: torch.nn.Sequential, first_weight: torch.Tensor | None = None) -> None:
    """Our MLP into a PhysicsNeMo MeshGraphMLP's ``model`` (Linear, ReLU, ..., [LayerNorm])."""
    linears = [m for m in dst if isinstance(m, torch.nn.Linear)]
    norms = [m for m in dst if isinstance(m, torch.nn.LayerNorm)]
    if len(linears) != len(src.layers) or len(norms) != (src.norm is not None):
        raise ValueError(f"PhysicsNeMo MLP layout differs from ours: {dst}")
    for ours, theirs in zip(src.layers, linears, strict=True):
        theirs.weight.copy_(ours.weight)  # a shape mismatch raises RuntimeError
        theirs.bias.copy_(ours.bias)
    if first_weight is not None:
        linears[0].weight.copy_(first_weight)
    if src.norm is not None:
        norms[0].weight.copy_(src.norm.weight)
        norms[0].bias.copy_(src.norm.bias)


def _import_physicsnemo() -> _PhysicsNeMo:
    """Raises whatever the imports raise (a torchvision without its C++ ops aside, see
    :func:`_import_torchvision`)."""
    # The bench runs on CPU; Transformer Engine's LayerNorm (chosen where CUDA and TE exist) is
    # CUDA-only. setdefault: an explicit choice by the user wins.
    os.environ.setdefault("PHYSICSNEMO_FORCE_TE", "False")
    torchvision_note = _import_torchvision()
    import physicsnemo
    import torch_scatter  # noqa: F401  (needed by PhysicsNeMo's PyG path: fail here, not mid-run)
    from physicsnemo.models.meshgraphnet import MeshGraphNet as PhysicsNeMoMeshGraphNet
    from torch_geometric.data import Data

    return _PhysicsNeMo(PhysicsNeMoMeshGraphNet, Data, physicsnemo.__version__, torchvision_note)


# What torchvision raises at import when its C++ ops did not load: it registers fake kernels for
# nms and qnms without checking that the ops exist (its other registrations do check).
_MISSING_TORCHVISION_OP = re.compile(r"operator torchvision::\w+ does not exist")


def _import_torchvision() -> str | None:
    """Imports torchvision where installed: PhysicsNeMo imports it through timm, which uses only
    its Python modules. If its C++ ops did not load, imports it without registering fake kernels
    for the missing ops and returns a note with the fix (two lines); otherwise returns None."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return None  # PhysicsNeMo's own import says what is missing
    except RuntimeError as err:
        if not _MISSING_TORCHVISION_OP.search(str(err)):
            raise
        mismatch = (
            f"torchvision {_installed_version('torchvision')} does not match torch"
            f" {torch.__version__}: its C++ ops did not load ({_one_line(err)})"
        )
        try:
            with _skip_fakes_for_missing_torchvision_ops():
                import torchvision  # noqa: F401, F811
        except Exception as retry:
            raise RuntimeError(f"{mismatch}; without them: {_one_line(retry)}") from retry
        return (
            f"{mismatch}; PhysicsNeMo's MeshGraphNet does not use them, so torchvision was"
            f" imported without them. To fix:\n  {_torchvision_fix()}"
        )
    return None


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


@contextlib.contextmanager
def _skip_fakes_for_missing_torchvision_ops():
    """Within: ``torch.library.register_fake`` skips torchvision ops that do not exist."""
    register_fake = torch.library.register_fake

    def register_fake_if_defined(op, func=None, /, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            name = op.removeprefix("torchvision::").split(".")[0]
            if not hasattr(torch.ops.torchvision, name):
                return func if func is not None else (lambda fn: fn)
        return register_fake(op, func, **kwargs)

    torch.library.register_fake = register_fake_if_defined
    try:
        yield
    finally:
        torch.library.register_fake = register_fake


def _torchvision_fix(torch_version: str | None = None) -> str:
    """The pip command that installs the torchvision build made for the installed torch."""
    torch_version = torch_version or torch.__version__
    public, _, local = torch_version.partition("+")
    match = re.match(r"2\.(\d+)\.(\d+)", public)
    if match is None:
        return f"install the torchvision release made for torch {torch_version}"
    minor, patch = int(match[1]), int(match[2])
    # torch 2.m.p pairs with torchvision 0.(m+15).p; only torch 2.0.p had 0.15.(p+1)
    version = f"0.{minor + 15}.{patch + 1 if minor == 0 else patch}"
    if local:  # a build from PyTorch's own index (cpu, cu130, rocm6.4, ...)
        return (
            f"pip install torchvision=={version}+{local}"
            f" --index-url https://download.pytorch.org/whl/{local}"
        )
    # PyPI's default build: same version string as the mismatched one, hence the reinstall
    return f"pip install --force-reinstall --no-deps torchvision=={version}"


def _check_same_computation(pnm: _PhysicsNeMo, config: MeshGraphNetConfig) -> tuple[bool, str]:
    """Ours vs PhysicsNeMo's model with our weights on a small tree: (same?, one-line note)."""
    x, e, edge_index = random_tree_graph(CHECK_NODES, 1, config.node_features, config.edge_features)
    torch.manual_seed(1)
    ours = MeshGraphNet(config).eval()
    try:
        theirs = pnm.build(ours).eval()
        with torch.inference_mode():
            a, b = ours(x, e, edge_index), theirs(x, e, pnm.graph(edge_index, CHECK_NODES))
        diff = (a - b).abs().max().item()  # a shape mismatch raises RuntimeError
    except (ValueError, RuntimeError) as err:  # e.g. a layout changed in another version
        return False, f"cannot load our weights into it or run it ({_one_line(err)})"
    rel = diff / max(a.abs().max().item(), torch.finfo(a.dtype).tiny)
    same = rel <= CHECK_RTOL
    verdict = "same outputs" if same else "outputs DIFFER from ours"
    return same, (
        f"with our weights, {verdict} on a {CHECK_NODES}-node tree: max |diff| = {diff:.2e}"
        f" ({rel:.1e} of max |output|; tolerance {CHECK_RTOL:g})"
    )


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + " ".join(str(err).split())


def _physicsnemo(config: MeshGraphNetConfig) -> tuple[_PhysicsNeMo | None, str]:
    """(PhysicsNeMo to time, or None; a note saying what was checked, or why not: one line, more
    where torchvision's C++ ops did not load)."""
    # Not only ImportError: a broken extension wheel (e.g. torchvision's, which PhysicsNeMo
    # imports via timm) raises RuntimeError or OSError at import.
    try:
        pnm = _import_physicsnemo()
    except Exception as err:
        note = f"PhysicsNeMo not timed in this run: it cannot be imported ({_one_line(err)})."
        if _MISSING_TORCHVISION_OP.search(str(err)):
            note += f" To fix torchvision:\n  {_torchvision_fix()}"
        return None, note
    same, note = _check_same_computation(pnm, config)
    note = f"PhysicsNeMo {pnm.version} {'check' if same else 'NOT timed in this run'}: {note}."
    if pnm.torchvision_note is not None:
        note += "\n" + pnm.torchvision_note
    return (pnm if same else None), note


def run(
    sizes: Sequence[int] = (1000, 20000),
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    seed: int = 0,
    baseline: bool = True,
    physicsnemo: bool = True,
) -> list[dict]:
    """Times forward and training step for each graph size; one row per (size, mode).

    Each row: ``num_nodes``, ``num_edges``, ``mode``, ``median_ms``, ``q1_ms``, ``q3_ms``,
    ``iqr_ms``, ``repeats``, ``warmup``, ``threads``, ``loadavg_1min`` (before, after); with
    ``baseline`` also ``baseline_median_ms`` ... for the same model with ``concat_trick=False``,
    timed interleaved with ours. With ``physicsnemo``, every row has ``physicsnemo_note`` (the
    same-computation check's result, or why PhysicsNeMo cannot be imported; further lines where
    torchvision's C++ ops did not load: that, and the pip command to fix it) and, if it imported
    and passed the check, ``physicsnemo_median_ms`` ... for PhysicsNeMo's MeshGraphNet, timed
    interleaved with ours. ``threads`` (if given) is set with ``torch.set_num_threads`` for the
    run and restored afterwards; otherwise torch's current setting is used.
    """
    if repeats < 4:
        raise ValueError(f"repeats must be >= 4 for an IQR, got {repeats}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = []
        config = MeshGraphNetConfig()
        pnm, pnm_note = _physicsnemo(config) if physicsnemo else (None, None)
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
            if pnm is not None:
                graph = pnm.graph(edge_index, n)
                fns["physicsnemo"] = _callables(pnm.build(ours), x, e, graph, target)
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
                if pnm is not None:
                    row.update(_summary(times["physicsnemo"], prefix="physicsnemo_"))
                if pnm_note is not None:
                    row["physicsnemo_note"] = pnm_note
                rows.append(row)
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def format_table(rows: Sequence[dict]) -> str:
    """Side by side: ours (median, IQR), PhysicsNeMo reference midpoint and reference / ours;
    with a same-run baseline also its median and baseline / ours; with PhysicsNeMo timed in this
    run also its median and PhysicsNeMo / ours."""
    with_baseline = any("baseline_median_ms" in r for r in rows)
    with_pnm = any("physicsnemo_median_ms" in r for r in rows)
    header = (
        f"{'nodes':>6} {'edges':>6} {'mode':<10} {'ours median':>12} {'IQR':>8} "
        f"{'PhysicsNeMo*':>13} {'ref/ours':>8}"
    )
    if with_baseline:
        header += f" {'naive (this run)':>17} {'naive/ours':>10}"
    if with_pnm:
        header += f" {'PhysicsNeMo (this run)':>22} {'PNM/ours':>8}"
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
        if with_pnm:
            if "physicsnemo_median_ms" in r:
                pnm = r["physicsnemo_median_ms"]
                line += f" {pnm:>19.2f} ms {pnm / r['median_ms']:>7.2f}x"
            else:
                line += f" {'n/a':>22} {'n/a':>8}"
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
    if with_pnm:
        lines.append(
            "  PhysicsNeMo (this run): its MeshGraphNet built as in * (do_concat_trick=False),"
            " loaded with our weights, timed interleaved with ours."
        )
    # the same-computation check's result, or why PhysicsNeMo was not timed in this run (one
    # line), and how torchvision was imported where not as usual (with the fix on its own line)
    notes = dict.fromkeys(r.get("physicsnemo_note") for r in rows)  # unique, in order
    lines += ["  " + line for note in notes if note for line in note.splitlines()]
    if loads:
        lines.append(
            f"  1-min load average during the run: {min(loads):.2f}-{max(loads):.2f}"
            f" (on {os.cpu_count()} CPUs; a load above the core count means contended timings)."
        )
    return "\n".join(lines)
