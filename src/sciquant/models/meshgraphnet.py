"""MeshGraphNet for the 1-D blood-flow surrogate, in plain torch ops (no DGL, no PyG).

Architecture (as PhysicsNeMo's ``examples/healthcare/bloodflow_1d_mgn``; Pegolotti et al.,
arXiv 2303.07310): node and edge encoder MLPs, ``processor_size`` message-passing blocks, and a
decoder MLP to the per-node increments (Δp, Δq). Every MLP is ``Linear(in, h), ReLU,
[Linear(h, h), ReLU] * (mlp_hidden_layers - 1), Linear(h, out)`` followed by ``LayerNorm(out)``,
except the decoder's, which has no LayerNorm. One processor block is

    e' = MLP_e([e, h_src, h_dst]);  e <- e + e'          (edge update, per edge)
    agg_i = sum over edges with dst = i of e             (the *updated* edge features)
    h <- h + MLP_n([h, agg])                             (node update, per node)

``edge_index`` rows are (source, destination). A batch of disjoint graphs is one big graph whose
``edge_index`` is offset per graph, so no batch vector is needed.

The concat trick (the only place where a Linear is not called through its module)
--------------------------------------------------------------------------------
The first Linear of the edge MLP has weight ``W = [W_e | W_s | W_d]`` (column blocks of widths
F_e, F_n, F_n) and bias ``b``. For an edge k = (s, d),

    W @ [e_k, h_s, h_d] + b = W_e @ e_k + (W_s @ h_s + b) + W_d @ h_d
                            = W_e @ e_k + P_src[s] + P_dst[d],
    with P_src = h @ W_s^T + b and P_dst = h @ W_d^T  (N rows, computed once per block).

So the nodes are projected first (N rows instead of E) and the projections are gathered; the
[E, F_e + 2 F_n] concatenation (and its gradient) is never built, and the E-row matmul has
K = F_e instead of F_e + 2 F_n. The first Linear of the node MLP is split likewise on [h, agg]:
``W @ [h, agg] + b = (h @ W_h^T + b) + agg @ W_a^T``. This is mathematically identical (equal up
to float rounding); the parameters remain one standard ``nn.Linear`` per layer (the blocks are
column slices of its weight, taken in ``forward``), so checkpoints keep the usual layout.
With the defaults and E ≈ 2 N (trees), a processor block costs 49 152 N multiply-adds instead
of 57 344 N; the larger saving is memory traffic. Other cheap wins on the same path: the bias
is added on the N-row projection, the gathered sum is the GEMM's in-place accumulator
(``addmm_``), ReLUs run in place where autograd allows, and the sum aggregation is one
``index_add_``. Under autocast (the bf16 simulation) the accumulation is the out-of-place
``addmm``: autocast casts an op's inputs, never an in-place op's destination.

A quantizer that fake-quantizes the input of every Linear cannot see the concatenated input on
the fast path (``MeshGraphNet._edge_update`` and ``_node_update`` are the only two places that
read a Linear's weight instead of calling it). Two ways to get the plain ``linear(cat(...))``
path: set ``model.concat_trick = False``, or replace the first Linear of an MLP by any module
that is not exactly ``nn.Linear`` (e.g. a fake-quant wrapper): the split is only taken when
``type(layer) is nn.Linear``. All other Linear layers are always called through their module.

The one exception is a first layer that splits itself (`SplitLinear`: the QDQ export's layer,
``sciquant.quant.export``): per-tensor quantization commutes with concatenation and with a
gather, so quantizing the node state once (with the concatenated input's scale) and
projecting it per column block is the same integer arithmetic as quantizing the gathered
[E, F_e + 2 F_n] concatenation; the INT8 graph then keeps the concat trick too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "MeshGraphNet",
    "MeshGraphNetConfig",
    "SplitLinear",
    "export_onnx",
    "random_tree_graph",
]


@dataclass(frozen=True)
class MeshGraphNetConfig:
    """Hyper-parameters; the defaults are the bloodflow example's (≈215 k parameters)."""

    node_features: int = 53  # the reference's 18 + 35 (data.features; the prepared index says)
    edge_features: int = 9
    outputs: int = 2
    processor_size: int = 5
    hidden: int = 64
    mlp_hidden_layers: int = 2


class MLP(nn.Module):
    """``Linear, ReLU, (Linear, ReLU) * (hidden_layers - 1), Linear`` [+ ``LayerNorm(out)``]."""

    def __init__(
        self, in_features: int, hidden: int, out_features: int, hidden_layers: int, norm: bool
    ) -> None:
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"mlp_hidden_layers must be >= 1, got {hidden_layers}")
        widths = [in_features] + [hidden] * hidden_layers + [out_features]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.norm = nn.LayerNorm(out_features) if norm else None

    def tail(self, z: Tensor, fresh: bool = False) -> Tensor:
        """The MLP after its first Linear, given that layer's output ``z`` (pre-activation).

        ``fresh=True`` means that ``z`` is a tensor the caller owns and no autograd node saved,
        so the first ReLU may run in place. Later ReLUs run in place on the output of plain
        ``nn.Linear`` layers (whose backward does not need their output) and out of place on
        the output of anything else (e.g. a quantizer's wrapper).
        """
        for layer in self.layers[1:]:
            z = layer(torch.relu_(z) if fresh else torch.relu(z))
            fresh = _is_plain_linear(layer)
        if self.norm is not None:
            z = self.norm(z)
        return z

    def forward(self, x: Tensor) -> Tensor:
        first = self.layers[0]
        return self.tail(first(x), fresh=_is_plain_linear(first))


def _is_plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear


def _accumulate(z: Tensor, x: Tensor, w_t: Tensor) -> Tensor:
    """``z + x @ w_t``: the GEMM accumulates into `z` in place, except under autocast. There
    `z` may already be bf16 while `x` and `w_t` are FP32; the out-of-place ``addmm`` has all three
    cast alike, an in-place op's destination is never cast."""
    if torch.is_autocast_enabled(z.device.type):
        return torch.addmm(z, x, w_t)
    return z.addmm_(x, w_t)


class SplitLinear(nn.Module):
    """A Linear that evaluates itself on column blocks of its input (the concat trick):
    ``columns(prepare(x_part), start, stop, bias)`` = the layer's weight columns
    ``start:stop`` applied to that part of the input, plus the bias if asked. ``prepare`` is
    what the layer does to its input first (e.g. quantize it, once per part)."""

    def prepare(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def columns(self, x: Tensor, start: int, stop: int, bias: bool) -> Tensor:
        raise NotImplementedError


class MeshGraphNet(nn.Module):
    """Encode–process–decode graph network; see the module docstring for the algebra.

    ``concat_trick=False`` selects the textbook ``linear(cat(...))`` evaluation of the first
    Linear of every processor MLP (the same numbers up to float rounding, slower).
    """

    def __init__(self, config: MeshGraphNetConfig | None = None, concat_trick: bool = True):
        super().__init__()
        self.config = c = config or MeshGraphNetConfig()
        self.concat_trick = concat_trick
        h, k = c.hidden, c.mlp_hidden_layers
        self.node_encoder = MLP(c.node_features, h, h, k, norm=True)
        self.edge_encoder = MLP(c.edge_features, h, h, k, norm=True)
        self.edge_mlps = nn.ModuleList(
            MLP(3 * h, h, h, k, norm=True) for _ in range(c.processor_size)
        )
        self.node_mlps = nn.ModuleList(
            MLP(2 * h, h, h, k, norm=True) for _ in range(c.processor_size)
        )
        self.decoder = MLP(h, h, c.outputs, k, norm=False)

    # -- processor pieces --------------------------------------------------------------------

    def _edge_update(self, mlp: MLP, e: Tensor, h: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        """Returns ``MLP_e([e, h[src], h[dst]])``."""
        first = mlp.layers[0]
        fe, fn = e.shape[1], h.shape[1]
        if self.concat_trick and isinstance(first, SplitLinear):
            e_in, h_in = first.prepare(e), first.prepare(h)  # h once, before the gathers
            p_src = first.columns(h_in, fe, fe + fn, bias=True)
            p_dst = first.columns(h_in, fe + fn, fe + 2 * fn, bias=False)
            z = p_src.index_select(0, src) + p_dst.index_select(0, dst)
            return mlp.tail(z + first.columns(e_in, 0, fe, bias=False))
        if not (self.concat_trick and _is_plain_linear(first)):
            return mlp(torch.cat([e, h.index_select(0, src), h.index_select(0, dst)], dim=1))
        # The concat trick (module docstring): W [e, h_s, h_d] + b = W_e e + P_src[s] + P_dst[d].
        w = first.weight
        p_src = F.linear(h, w[:, fe : fe + fn], first.bias)  # [N, H], bias folded in (N rows)
        p_dst = F.linear(h, w[:, fe + fn :])  # [N, H]
        z = p_src.index_select(0, src).add_(p_dst.index_select(0, dst))  # [E, H]
        z = _accumulate(z, e, w[:, :fe].t())  # += e @ W_e^T
        return mlp.tail(z, fresh=True)

    def _node_update(self, mlp: MLP, h: Tensor, agg: Tensor) -> Tensor:
        """Returns ``MLP_n([h, agg])``."""
        first = mlp.layers[0]
        fn = h.shape[1]
        if self.concat_trick and isinstance(first, SplitLinear):
            z = first.columns(first.prepare(h), 0, fn, bias=True)
            return mlp.tail(z + first.columns(first.prepare(agg), fn, 2 * fn, bias=False))
        if not (self.concat_trick and _is_plain_linear(first)):
            return mlp(torch.cat([h, agg], dim=1))
        # W [h, agg] + b = (W_h h + b) + W_a agg
        w = first.weight
        z = _accumulate(F.linear(h, w[:, :fn], first.bias), agg, w[:, fn:].t())
        return mlp.tail(z, fresh=True)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, node_features: Tensor, edge_features: Tensor, edge_index: Tensor) -> Tensor:
        """``[N, F_n], [E, F_e], [2, E] (source, destination) -> [N, outputs]``."""
        src, dst = edge_index[0], edge_index[1]
        h = self.node_encoder(node_features)
        e = self.edge_encoder(edge_features)
        for edge_mlp, node_mlp in zip(self.edge_mlps, self.node_mlps, strict=True):
            e = e + self._edge_update(edge_mlp, e, h, src, dst)
            agg = torch.zeros_like(h).index_add_(0, dst, e)  # sum over incoming edges
            h = h + self._node_update(node_mlp, h, agg)
        return self.decoder(h)


# -- helpers -----------------------------------------------------------------------------------


def random_tree_graph(
    num_nodes: int, seed: int, node_features: int = 53, edge_features: int = 9
) -> tuple[Tensor, Tensor, Tensor]:
    """A random tree: node i >= 1 hangs off a uniformly random earlier node; edges both ways.

    Returns ``(x [N, node_features], e [2(N-1), edge_features], edge_index [2, 2(N-1)])`` with
    standard-normal features, reproducible from ``seed``.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    g = torch.Generator().manual_seed(seed)
    child = torch.arange(1, num_nodes)
    parent = (torch.rand(num_nodes - 1, generator=g, dtype=torch.float64) * child).long()
    edge_index = torch.stack([torch.cat([parent, child]), torch.cat([child, parent])])
    x = torch.randn(num_nodes, node_features, generator=g)
    e = torch.randn(edge_index.shape[1], edge_features, generator=g)
    return x, e, edge_index


def export_onnx(
    model: MeshGraphNet,
    path: str | Path,
    num_nodes_example: int = 64,
    opset: int = 18,
    seed: int = 0,
    concat_trick: bool | None = None,
) -> Path:
    """Exports ``model`` to ONNX with dynamic node and edge counts and checks the file.

    Inputs ``node_features [N, F_n]`` (float32), ``edge_features [E, F_e]`` (float32) and
    ``edge_index [2, E]`` (int64, rows source/destination); output ``delta [N, outputs]``. The
    example graph is :func:`random_tree_graph` ``(num_nodes_example, seed)``; N and E are
    exported as symbolic dimensions (``num_nodes``, ``num_edges``), so any graph size works.
    ``concat_trick`` overrides ``model.concat_trick`` during the export (``False`` gives the
    textbook ``Gemm(Concat(...))`` graph, e.g. for ONNX-side quantizers); ``None`` keeps it.

    Uses the torch.export-based exporter (``dynamo=True``). The legacy TorchScript exporter
    (``dynamo=False``) is not used on purpose: it lowers ``index_add_`` to ``ScatterElements``
    without ``reduction="add"``, which silently drops all but one message per node.
    """
    import onnx

    if num_nodes_example < 3:
        raise ValueError(f"num_nodes_example must be >= 3, got {num_nodes_example}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = model.config
    args = random_tree_graph(num_nodes_example, seed, c.node_features, c.edge_features)
    was_training, previous_trick = model.training, model.concat_trick
    model.eval()
    if concat_trick is not None:
        model.concat_trick = concat_trick
    try:
        nodes = torch.export.Dim("num_nodes", min=2)
        edges = torch.export.Dim("num_edges", min=2)
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=["node_features", "edge_features", "edge_index"],
            output_names=["delta"],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: nodes}, {0: edges}, {1: edges}),
            verbose=False,
        )
    finally:
        model.train(was_training)
        model.concat_trick = previous_trick
    onnx.checker.check_model(str(path), full_check=True)
    return path
