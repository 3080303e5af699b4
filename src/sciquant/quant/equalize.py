"""Cross-layer equalization (Nagel et al., "Data-free quantization through weight equalization
and bias correction", ICCV 2019) of MeshGraphNet's MLPs, before quantization.

Two Linear layers with a ReLU between them, y = W2 · relu(W1 x + b1) + b2, compute the same
function after channel i of the first is divided by s_i > 0 and column i of the second
multiplied by it, because relu(z / s) = relu(z) / s for s > 0:

    W1[i, :] ← W1[i, :] / s_i,   b1[i] ← b1[i] / s_i,   W2[:, i] ← W2[:, i] · s_i

With r1_i the range (max |·|) of row i of W1 and r2_i that of column i of W2, s_i =
sqrt(r1_i / r2_i) makes both sqrt(r1_i · r2_i): the channels of a weight tensor come closer in
range, which is what a per-tensor weight scale (npu-pow2; TensorRT's and ONNX Runtime's
per-tensor schemes) needs. Per-channel weight scales gain less: only the second layer's columns
move. Every MLP of the model (``Linear, ReLU, …, Linear`` [+ LayerNorm]) is equalized pair by
pair, `sweeps` times over (each pass moves the ranges closer; three converge in practice). The
last Linear before a LayerNorm only has its columns scaled: LayerNorm is not equivariant to a
per-channel scale of its input, so its outputs stay. Data free: no calibration inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sciquant.errors import SciquantError

__all__ = ["equalize", "equalize_pair", "relu_chains"]

#: Scales are clamped to this factor either way: a dead channel (a zero row) must not explode
#: its partner column.
MAX_SCALE = 1e4


def relu_chains(model: nn.Module) -> list[list[nn.Linear]]:
    """Every chain of Linear layers joined by ReLUs in `model` (MeshGraphNet's MLPs)."""
    from sciquant.models.meshgraphnet import MLP

    chains = [list(m.layers) for m in model.modules() if isinstance(m, MLP)]
    for chain in chains:
        if not all(type(layer) is nn.Linear for layer in chain):
            raise SciquantError(
                "cross-layer equalization runs on the float model, before quantize_model"
            )
    return chains


def equalize_pair(first: nn.Linear, second: nn.Linear) -> torch.Tensor:
    """Equalize `first` (rows) and `second` (columns) across a ReLU, in place; returns s."""
    if first.out_features != second.in_features:
        raise SciquantError(
            f"cannot equalize a Linear with {first.out_features} outputs and one with "
            f"{second.in_features} inputs"
        )
    with torch.no_grad():
        r1 = first.weight.abs().amax(dim=1)
        r2 = second.weight.abs().amax(dim=0)
        scale = torch.where(
            (r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1)
        ).clamp(1 / MAX_SCALE, MAX_SCALE)
        first.weight.div_(scale[:, None])
        if first.bias is not None:
            first.bias.div_(scale)
        second.weight.mul_(scale[None, :])
    return scale


def equalize(model: nn.Module, sweeps: int = 3) -> nn.Module:
    """A deep copy of float `model` with every ReLU-joined Linear pair equalized."""
    if sweeps < 1:
        raise SciquantError(f"equalization sweeps must be ≥ 1, got {sweeps}")
    equalized = copy.deepcopy(model)
    chains = relu_chains(equalized)
    if not chains:
        raise SciquantError(
            "cross-layer equalization found no Linear–ReLU–Linear chain in the model "
            "(it knows MeshGraphNet's MLPs)"
        )
    for _ in range(sweeps):
        for chain in chains:
            for first, second in zip(chain[:-1], chain[1:], strict=True):
                equalize_pair(first, second)
    return equalized
