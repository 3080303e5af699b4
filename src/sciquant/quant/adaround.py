"""Layer-wise PTQ that changes the weights: AdaRound and empirical bias correction (PyTorch).

Both run after `calibrate` on a `QuantizedModel`, layer by layer in the order the forward pass
calls the layers (`execution_order`: every layer's input comes from layers before it), each on
the inputs its layer sees in the model quantized so far (so later layers compensate what earlier
ones lost), against the outputs of the untouched float model on the same calibration inputs:

    qmodel = quantize_model(model, "reference", "w4a8", "ptq-adaround")
    batches = list(calibration_inputs)                       # tuples of model inputs
    calibrate(qmodel, batches)
    adaround(qmodel, model, batches, AdaRoundSettings())     # or correct_bias(...) alike

**AdaRound** (Nagel et al., "Up or down? Adaptive rounding for post-training quantization",
ICML 2020) chooses, for every weight, whether it rounds down or up on the grid the weight
observer fixed, by minimising the layer's output reconstruction error

    mean_rows ‖ W x_fp + b − (W̃ q(x̂) + b) ‖²  +  λ · Σ (1 − |2 h(V) − 1|^β)

with W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) − z), h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)
the rectified sigmoid (ζ = 1.1, γ = −0.1), x_fp the layer's input in the float model, x̂ its
input in the quantized model and q the layer's activation fake-quantization. V starts where
h(V) equals the weight's rest W/s − ⌊W/s⌋ (so the soft weight starts at the float weight); β
anneals from `beta_start` to `beta_end` after a warm-up with no rounding term, which drives every
h to 0 or 1. The hard choice h = [V ≥ 0] is written into the layer's float weight as the
dequantized grid value, so the fake-quant forward, the saved model and every export round
exactly to the chosen integers with no new state.

**Bias correction** (Nagel et al., "Data-free quantization through weight equalization and bias
correction", ICCV 2019, its empirical form): each layer's bias gains the mean over calibration
rows of (W x_fp + b) − (W_q q(x̂) + b), the systematic shift quantization puts into its output.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sciquant.errors import SciquantError
from sciquant.quant.pytorch import QuantizedModel, QuantLinear
from sciquant.quant.rounding import (
    GAMMA,
    ZETA,
    AdaRoundSettings,
    keeps_nearest,
    layer_report,
    layer_summary,
)

__all__ = [
    "AdaRoundSettings",
    "adaround",
    "correct_bias",
    "execution_order",
    "layer_inputs",
    "reconstruction_blocks",
    "rectified_sigmoid",
    "soft_weight",
]


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(rest: Tensor) -> Tensor:
    """V with h(V) = rest (rest in [0, 1))."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _grid(layer: QuantLinear) -> tuple[Tensor, Tensor, int, int]:
    """(scale, zero point) shaped to broadcast over the weight [out, in], qmin, qmax."""
    scale, zero_point = layer.weight_qparams()
    if scale.ndim == 1:
        scale, zero_point = scale[:, None], zero_point[:, None]
    spec = layer.weight_spec
    return scale, zero_point.float(), spec.qmin, spec.qmax


def soft_weight(weight: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                h: Tensor) -> Tensor:  # fmt: skip
    """W̃ = s · (clamp(⌊W/s⌋ + h + z, qmin, qmax) − z): the weight rounded by h ∈ [0, 1]."""
    floor = torch.floor(weight / scale)
    return scale * (torch.clamp(floor + h + zero_point, qmin, qmax) - zero_point)


class _Captured(Exception):
    """Raised by the capturing hook to end a forward pass once the layer's input is taken."""


def layer_inputs(
    model: nn.Module,
    name: str,
    batches: Sequence[tuple[Tensor, ...]],
    select: Callable[[int, int], Tensor] | None = None,
    flatten: bool = True,
) -> Tensor:
    """What layer `name` of `model` receives for every batch, as rows [n, in], stacked.

    `flatten=False`: the input must already be rows (a tensor [n, in]); anything else is a
    SciquantError (block reconstruction samples rows of a block's input).

    select(batch index, row count) → the row indices to keep of that batch (default all). The
    forward pass stops at the layer's first call (what follows it cannot change its input), so
    a layer is captured at the cost of the model up to it.
    """
    module = model.get_submodule(name)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        if not flatten and not (isinstance(x, Tensor) and x.dim() == 2):
            raise SciquantError(f"{name!r} does not take a tensor of rows [n, features]")
        x = x.detach()
        captured.append(x.reshape(-1, x.shape[-1]))
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    taken = []
    try:
        with _every_layer_called(model), torch.no_grad():
            for index, batch in enumerate(batches):
                captured.clear()
                try:
                    model(*batch)
                except _Captured:
                    pass
                if not captured:
                    raise SciquantError(
                        f"layer {name!r} did not run in the model's forward pass; layer-wise "
                        "reconstruction needs every quantized layer to run"
                    )
                rows = captured[0]
                taken.append(rows if select is None else rows[select(index, rows.shape[0])])
    finally:
        handle.remove()
    return torch.cat(taken)


@contextmanager
def _every_layer_called(model: nn.Module) -> Iterator[None]:
    """Models that read a Linear's weight instead of calling it (MeshGraphNet's concat trick)
    call every Linear as a module inside."""
    tricks = [m for m in model.modules() if getattr(m, "concat_trick", None) is True]
    for m in tricks:
        m.concat_trick = False
    try:
        yield
    finally:
        for m in tricks:
            m.concat_trick = True


def execution_order(
    model: nn.Module, layers: dict[str, nn.Module], batch: tuple[Tensor, ...]
) -> list[str]:
    """The names of `layers` (submodules of `model`) in the order `model(*batch)` first calls
    them; layers it never calls come last, in the order given.

    Module order is not data-flow order: MeshGraphNet registers its five edge MLPs before its
    five node MLPs, and calls them alternately.
    """
    order: list[str] = []

    def recorder(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, _args: tuple[Tensor, ...]) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers.items()]
    try:
        with _every_layer_called(model), torch.no_grad():
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in layers if name not in order]


def _pairs(
    qmodel: QuantizedModel, float_model: nn.Module, name: str,
    batches: Sequence[tuple[Tensor, ...]], max_rows: int, seed: int, flatten: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(x_fp, x̂): the layer's input in the float model and in the quantized model, same rows
    (at most max_rows in all, an even share of each batch, drawn with `seed`)."""
    per_batch = max(1, math.ceil(max_rows / len(batches)))

    def select(index: int, count: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.randperm(count, generator=generator)[: min(count, per_batch)]

    x_float = layer_inputs(float_model, name, batches, select, flatten)
    x_quant = layer_inputs(qmodel.model, name, batches, select, flatten)
    if x_float.shape != x_quant.shape:
        raise SciquantError(
            f"layer {name!r} sees inputs of shape {tuple(x_float.shape)} in the float model and "
            f"{tuple(x_quant.shape)} in the quantized one"
        )
    return x_float, x_quant


@contextmanager
def _layer_by_layer(
    qmodel: QuantizedModel, float_model: nn.Module, batches: Sequence[tuple[Tensor, ...]],
    what: str,
) -> Iterator[dict[str, QuantLinear]]:  # fmt: skip
    """The quantized layers in the order the forward pass calls them (`execution_order`), with
    both models in eval mode (qmodel's mode restored)."""
    layers = _check(qmodel, float_model, what)
    if not batches:
        raise SciquantError(f"{what} got no calibration batches")
    was_training = qmodel.training
    qmodel.eval()
    float_model.eval()
    try:
        order = execution_order(qmodel.model, layers, batches[0])
        yield {name: layers[name] for name in order}
    finally:
        qmodel.train(was_training)


def _check(qmodel: QuantizedModel, float_model: nn.Module, what: str) -> dict[str, QuantLinear]:
    layers = qmodel.quant_linears()
    for name, layer in layers.items():
        if layer.mode != "quantize":
            raise SciquantError(
                f"{what}: layer {name!r} is in mode {layer.mode!r}; calibrate the model first "
                "(every quantized layer in quantize mode)"
            )
        try:
            original = float_model.get_submodule(name)
        except AttributeError:
            raise SciquantError(
                f"{what}: the float model has no layer {name!r}; pass the float model the "
                "quantized one was made from"
            ) from None
        if not isinstance(original, nn.Linear) or original.weight.shape != layer.weight.shape:
            raise SciquantError(f"{what}: layer {name!r} differs in the float model")
    return layers


def adaround(
    qmodel: QuantizedModel,
    float_model: nn.Module,
    batches: Sequence[tuple[Tensor, ...]],
    settings: AdaRoundSettings | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, dict[str, float]]:
    """Round every quantized layer's weight adaptively (see the module docstring), in place.

    Returns per layer: the reconstruction MSE with nearest rounding and with AdaRound's, on the
    rows it optimised, the share of weights rounded the other way than nearest, and
    `kept_nearest` (1.0 where AdaRound's hard rounding came out worse than nearest on those
    rows, as an optimisation cut short can, and the layer keeps nearest rounding).
    """
    settings = settings or AdaRoundSettings()
    summary: dict[str, dict[str, float]] = {}
    with _layer_by_layer(qmodel, float_model, batches, "adaround") as layers:
        if settings.reconstruction == "block":
            return _adaround_blocks(qmodel, float_model, batches, layers, settings, progress)
        for index, (name, layer) in enumerate(layers.items()):
            original = float_model.get_submodule(name)
            x_float, x_quant = _pairs(
                qmodel, float_model, name, batches, settings.max_rows, settings.seed + index
            )
            summary[name] = _round_layer(layer, original, x_float, x_quant, settings)
            if progress is not None:
                progress(layer_report(index, len(layers), name, summary[name]))
    return summary


def reconstruction_blocks(model: nn.Module, order: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The layers `order` (in forward order) grouped into blocks: (block name, its layers).

    A layer's block is the module that holds it (through module lists and dicts) where that
    module is not the model itself, its forward takes one argument, and every Linear layer in
    it is its own (none inside a module of its own): MeshGraphNet's MLPs (Linear, ReLU, Linear,
    ReLU, Linear, LayerNorm), a flat Sequential inside a model. Consecutive layers of one block
    form one entry; a layer with no such holder (a layer the model holds directly, or inside
    nested blocks; every layer of a Keras model) is a block of its own, named after itself.
    `adaround` also rounds a block's layers one by one where the block turns out not to take
    rows [n, features] or not to treat them independently.
    """
    groups: list[tuple[str, list[str]]] = []
    for name in order:
        holder = _holder(model, name)
        block = name if holder is None else holder
        if groups and groups[-1][0] == block and holder is not None:
            groups[-1][1].append(name)
        else:
            groups.append((block, [name]))
    return groups


def _holder(model: nn.Module, name: str) -> str | None:
    path = name.split(".")[:-1]
    while path and isinstance(model.get_submodule(".".join(path)), _LISTS):
        path = path[:-1]
    if not path:
        return None
    holder = ".".join(path)
    module = model.get_submodule(holder)
    parameters = inspect.signature(module.forward).parameters.values()
    required = [p for p in parameters if p.default is p.empty and p.kind in _POSITIONAL]
    if not (len(required) == 1 and len(list(parameters)) == 1):
        return None
    # every layer of the block its own (through lists), none inside a block of its own
    for sub, child in module.named_modules():
        if isinstance(child, nn.Linear | QuantLinear):
            parents = sub.split(".")[:-1]
            inner = [".".join(parents[:k]) for k in range(1, len(parents) + 1)]
            if not all(isinstance(module.get_submodule(i), _LISTS) for i in inner):
                return None
    return holder


_LISTS = (nn.ModuleList, nn.ModuleDict)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _SoftRounding:
    """One layer's rounding variables V in a block: its weight is `scale·(clamp(⌊W/s⌋ + z + h,
    qmin, qmax) − z)` with h = h(V) (soft), [V ≥ 0] (hard) or nearest rounding."""

    def __init__(self, layer: QuantLinear) -> None:
        self.layer = layer
        self.weight = layer.weight.detach().clone()
        self.scale, self.zero_point, self.qmin, self.qmax = _grid(layer)
        floor = torch.floor(self.weight / self.scale)
        rest = self.weight / self.scale - floor
        self.shifted = floor + self.zero_point
        self.nearest = (rest >= 0.5).float()
        self.v = nn.Parameter(_initial_v(rest))
        self.h: Tensor | None = None  # None: soft, from V; else this fixed rounding

    def rounding(self) -> Tensor:
        return rectified_sigmoid(self.v) if self.h is None else self.h

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        w = self.scale * (torch.clamp(self.shifted + self.rounding(), self.qmin, self.qmax)
                          - self.zero_point)  # fmt: skip
        bias = layer.used_bias()
        return F.linear(layer.fake_quantize_input(x), w, None if bias is None else bias.detach())


@contextmanager
def _soft_forwards(members: Sequence[_SoftRounding]) -> Iterator[None]:
    for member in members:
        member.layer.forward = member.forward
    try:
        yield
    finally:
        for member in members:
            del member.layer.forward


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters without gradients inside (only the rounding variables learn)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _adaround_blocks(
    qmodel: QuantizedModel, float_model: nn.Module, batches: Sequence[tuple[Tensor, ...]],
    layers: dict[str, QuantLinear], settings: AdaRoundSettings,
    progress: Callable[[str], None] | None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Block reconstruction (BRECQ's, Li et al., ICLR 2021): the rounding variables of all of a
    block's layers optimised together against the float block's output, with the activations
    between them fake-quantized (straight-through) as in the quantized model."""
    summary: dict[str, dict[str, float]] = {}
    order = list(layers)
    blocks = reconstruction_blocks(qmodel.model, order)
    for index, (block, names) in enumerate(blocks):
        try:
            x_float, x_quant = _pairs(
                qmodel, float_model, block, batches, settings.max_rows, settings.seed + index,
                flatten=False,
            )  # fmt: skip
            _check_rows(float_model.get_submodule(block), x_float, block)
        except SciquantError as error:
            if progress is not None:
                progress(f"adaround block {index + 1}/{len(blocks)} {block}: {error}; its "
                         f"{len(names)} layers rounded one by one")  # fmt: skip
            for name in names:  # as `reconstruction: layer` rounds them, the same rows
                x_float, x_quant = _pairs(
                    qmodel, float_model, name, batches, settings.max_rows,
                    settings.seed + order.index(name),
                )  # fmt: skip
                original = float_model.get_submodule(name)
                summary[name] = _round_layer(layers[name], original, x_float, x_quant, settings)
            continue
        members = [_SoftRounding(layers[name]) for name in names]
        with _soft_forwards(members), _frozen(qmodel):
            result = _round_block(
                qmodel.model.get_submodule(block), float_model.get_submodule(block), members,
                x_float, x_quant, settings,
            )  # fmt: skip
        for name, member in zip(names, members, strict=True):
            flipped = float((member.h != member.nearest).float().mean())
            summary[name] = {**result, "flipped": flipped}
        if progress is not None:
            progress(
                f"adaround block {index + 1}/{len(blocks)} {block} ({len(names)} layers): "
                f"reconstruction MSE {result['mse_nearest']:.3g} (nearest) -> "
                f"{result['mse_adaround']:.3g}"
                + (" (worse than nearest: kept nearest)" if result["kept_nearest"] else "")
            )
    return summary


def _beta(step: int, warm: int, settings: AdaRoundSettings) -> float:
    """β of the rounding regulariser at `step` (≥ warm): cosine from beta_start to beta_end."""
    progress = (step - warm) / max(1, settings.iterations - warm)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (
        1 + math.cos(math.pi * progress)
    )


def _rounding_penalty(h: Tensor, beta: float, settings: AdaRoundSettings) -> Tensor:
    """λ · Σ (1 − |2h − 1|^β): drives every soft rounding h to 0 or 1."""
    return settings.reg_lambda * (1 - (2 * h - 1).abs().pow(beta)).sum()


def _check_rows(block: nn.Module, rows: Tensor, name: str) -> None:
    """SciquantError unless the float `block` maps each row of `rows` on its own (the first half
    of the rows alone gives the same outputs as with the rest): rows are sampled at random."""
    half = max(1, rows.shape[0] // 2)
    with torch.no_grad():
        whole = block(rows)[:half]
        alone = block(rows[:half])
    scale = float(whole.abs().max()) if whole.numel() else 0.0
    if whole.shape != alone.shape or not torch.allclose(whole, alone, rtol=1e-4,
                                                        atol=1e-5 * scale + 1e-12):  # fmt: skip
        raise SciquantError(f"{name!r} does not map its input rows independently")


def _round_block(
    block: nn.Module, original: nn.Module, members: list[_SoftRounding], x_float: Tensor,
    x_quant: Tensor, settings: AdaRoundSettings,
) -> dict[str, float]:  # fmt: skip
    """Optimise the members' V on the block's rows, write the hard rounding into their
    weights; the block's MSEs with nearest and with the kept rounding."""
    with torch.no_grad():
        target = original(x_float)
    optimizer = torch.optim.Adam([m.v for m in members], lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    rows = x_quant.shape[0]
    warm = int(settings.warmup * settings.iterations)
    for step in range(settings.iterations):
        chosen = torch.randint(rows, (min(settings.batch_rows, rows),), generator=generator)
        loss = (block(x_quant[chosen]) - target[chosen]).pow(2).sum(-1).mean()
        if step >= warm:
            beta = _beta(step, warm, settings)
            for m in members:
                loss = loss + _rounding_penalty(rectified_sigmoid(m.v), beta, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        errors = {}
        for choice in ("nearest", "adaround"):
            for m in members:
                m.h = m.nearest if choice == "nearest" else (m.v >= 0).float()
            errors[choice] = (block(x_quant) - target).pow(2).mean().item()
        kept_nearest = keeps_nearest(errors["nearest"], errors["adaround"])
        for m in members:
            if kept_nearest:
                m.h = m.nearest
            m.layer.weight.copy_(soft_weight(m.weight, m.scale, m.zero_point, m.qmin, m.qmax, m.h))
    return {
        "mse_nearest": errors["nearest"],
        "mse_adaround": errors["nearest"] if kept_nearest else errors["adaround"],
        "kept_nearest": float(kept_nearest),
    }


def _round_layer(
    layer: QuantLinear, original: nn.Linear, x_float: Tensor, x_quant: Tensor,
    settings: AdaRoundSettings,
) -> dict[str, float]:  # fmt: skip
    weight = layer.weight.detach().clone()
    scale, zero_point, qmin, qmax = _grid(layer)
    with torch.no_grad():
        target = F.linear(x_float, original.weight, original.bias)
        x_in = layer.fake_quantize_input(x_quant)
        bias = layer.used_bias()
        bias = None if bias is None else bias.detach()
    floor = torch.floor(weight / scale)
    rest = weight / scale - floor
    shifted = floor + zero_point  # the grid index of rounding down, before the clamp
    nearest = (rest >= 0.5).float()
    v = nn.Parameter(_initial_v(rest))
    optimizer = torch.optim.Adam([v], lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    rows = x_in.shape[0]
    warm = int(settings.warmup * settings.iterations)
    for step in range(settings.iterations):
        chosen = torch.randint(rows, (min(settings.batch_rows, rows),), generator=generator)
        h = rectified_sigmoid(v)
        w_soft = scale * (torch.clamp(shifted + h, qmin, qmax) - zero_point)  # `soft_weight`
        out = F.linear(x_in[chosen], w_soft, bias)
        loss = (out - target[chosen]).pow(2).sum(-1).mean()
        if step >= warm:
            loss = loss + _rounding_penalty(h, _beta(step, warm, settings), settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = (v >= 0).float()
        rounded = soft_weight(weight, scale, zero_point, qmin, qmax, hard)
        before = soft_weight(weight, scale, zero_point, qmin, qmax, nearest)
        mse_nearest = (F.linear(x_in, before, bias) - target).pow(2).mean().item()
        mse_adaround = (F.linear(x_in, rounded, bias) - target).pow(2).mean().item()
        kept_nearest = keeps_nearest(mse_nearest, mse_adaround)
        if kept_nearest:
            hard, rounded, mse_adaround = nearest, before, mse_nearest
        layer.weight.copy_(rounded)
    flipped = float((hard != nearest).float().mean())
    return layer_summary(mse_nearest, mse_adaround, flipped, kept_nearest)


def correct_bias(
    qmodel: QuantizedModel,
    float_model: nn.Module,
    batches: Sequence[tuple[Tensor, ...]],
    max_rows: int = 65536,
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """Empirical bias correction of every quantized layer with a bias, in place, in order.

    Returns per layer the RMS of the correction added to its bias.
    """
    summary: dict[str, float] = {}
    with _layer_by_layer(qmodel, float_model, batches, "bias correction") as layers:
        for index, (name, layer) in enumerate(layers.items()):
            if layer.bias is None:
                continue
            original = float_model.get_submodule(name)
            x_float, x_quant = _pairs(qmodel, float_model, name, batches, max_rows, seed + index)
            with torch.no_grad():
                expected = F.linear(x_float, original.weight, original.bias)
                got = F.linear(
                    layer.fake_quantize_input(x_quant), layer.fake_quantize_weight(), layer.bias
                )
                shift = (expected - got).mean(0)
                layer.bias.add_(shift)
            summary[name] = float(shift.pow(2).mean().sqrt())
            if progress is not None:
                progress(
                    f"bias correction {index + 1}/{len(layers)} {name}: RMS shift "
                    f"{summary[name]:.3g}"
                )
    return summary


def float_layers(qmodel: QuantizedModel, float_model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """{layer: {"weight", "bias"}} of the FP32 model's quantized layers, copied: what AdaRound
    and bias correction move, kept so that the per-layer SQNR is measured against the FP32
    model (`sciquant.quant.debug.torch_layer_sqnr`'s `float_layers`)."""
    return {
        name: {
            key: getattr(float_model.get_submodule(name), key).detach().clone()
            for key in ("weight", "bias")
            if getattr(float_model.get_submodule(name), key) is not None
        }
        for name in qmodel.quantized_layers()
    }
