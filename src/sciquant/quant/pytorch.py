"""Fake-quantized PyTorch models: `QuantLinear`, post-training calibration, and the hooks of QAT.

    qmodel = quantize_model(model, "cpu-x86", "w8a8", "ptq-minmax")   # a deep copy
    calibrate(qmodel, [(node_features, edge_features, edge_index), ...])
    delta = qmodel(node_features, edge_features, edge_index)          # fake-quant forward

Every quantized ``nn.Linear`` becomes a `QuantLinear` that fake-quantizes its input (the
target's activation `QuantSpec`, per tensor) and its weight (the target's weight spec: per output
channel, axis 0, or per tensor) with torch's own kernels, ``torch.fake_quantize_per_tensor_affine``
and ``torch.fake_quantize_per_channel_affine`` (the affine math is in `sciquant.quant.spec`). The
bias stays float: INT8 runtimes add it as int32 (scale s_x·s_w) or float after the integer GEMM.
The output of a Linear is not quantized here; the next Linear quantizes its own input, so every
integer GEMM of a runtime sees exactly the tensors this simulation rounds.

Modes of a `QuantLinear` (`set_mode`):

    float     F.linear in float: the layer is switched off
    observe   F.linear in float while the input observer sees every input (calibration)
    quantize  fake-quant with the frozen buffers input_scale, input_zero_point, weight_scale,
              weight_zero_point; gradients are the kernels' straight-through estimator (QAT-STE)
    lsq       fake-quant with learnable scales (and zero points of asymmetric specs), LSQ
              (Esser et al., ICLR 2020) through ``torch._fake_quantize_learnable_*``

Observers (`sciquant.quant.observers.make_observer`): activations use the method's own observer
(ptq-minmax, ptq-percentile, ptq-mse, ptq-entropy). Weights use per-channel (or per-tensor, as
the spec says) min/max, the standard choice and what TensorRT does for weights, except under
ptq-mse, whose weights also get the MSE-optimal clipping per channel. QAT methods (qat-ste,
qat-lsq) start from min/max calibration; training moves the weights (STE) or the scales (LSQ).

LSQ: the scale gradient is scaled by grad_factor = 1 / sqrt(n · qmax), n the number of elements
one scale quantizes (the whole input per tensor, one weight row per channel), as in LSQ. A scale
is used as |s| clamped to float32's smallest normal, so a step that crosses zero cannot break the
kernel. Power-of-two targets (npu-pow2) keep the powers of two the observer gives; LSQ would move
them off the grid, so `enable_lsq` refuses them (TQT-style log2-scale training would be the
method for those).

State: the four qparam buffers (parameters in lsq mode, same names) and the mode are in the
``state_dict`` (``_extra_state``), so a quantized model saved and loaded into a fresh
`quantize_model` of the same float model runs identically. Observers are not saved.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sciquant.errors import SciquantError
from sciquant.quant.observers import (
    METHOD_OBSERVERS,
    MODES,
    OBSERVERS,
    Observer,
    check_lsq_specs,
    make_observer,
)
from sciquant.quant.spec import PerChannel, PerTensor, Precision, QuantSpec, parse_precision
from sciquant.quant.targets import INTEGER_BIAS_BACKENDS, Target, get_target

__all__ = [
    "MODES",
    "QuantLinear",
    "QuantizedModel",
    "calibrate",
    "disable_lsq",
    "disable_observers",
    "enable_lsq",
    "layer_names",
    "lsq_parameters",
    "quantize_model",
    "set_mode",
]


_MIN_SCALE = float(np.finfo(np.float32).tiny)


class QuantLinear(nn.Module):
    """A Linear whose input and weight are fake-quantized; bias float. [*, in] -> [*, out].

    Holds the wrapped Linear's ``weight`` [out, in] and ``bias`` [out] (same parameters, same
    state_dict names) and the qparams: ``input_scale`` [] float32, ``input_zero_point`` [] int32,
    ``weight_scale`` / ``weight_zero_point`` [out] (per channel) or [] (per tensor).
    ``integer_bias``: the bias is rounded to the int32 grid of step s_x·s_w, as an integer GEMM
    that adds it in its accumulator does (`sciquant.quant.targets.INTEGER_BIAS_BACKENDS`;
    straight-through in LSQ training).
    """

    def __init__(
        self,
        linear: nn.Linear,
        weight_spec: QuantSpec,
        activation_spec: QuantSpec,
        activation_method: str = "minmax",
        weight_method: str = "minmax",
        integer_bias: bool = False,
    ) -> None:
        super().__init__()
        self.integer_bias = integer_bias
        if not isinstance(activation_spec.granularity, PerTensor):
            raise SciquantError(
                f"activations are quantized per tensor; got {activation_spec.granularity}"
            )
        weight_per_channel = isinstance(weight_spec.granularity, PerChannel)
        if weight_per_channel and weight_spec.granularity.axis not in (0, -2):
            raise SciquantError(
                "Linear weights [out, in] are quantized per output channel (axis 0), got "
                f"{weight_spec.granularity}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_spec, self.activation_spec = weight_spec, activation_spec
        self.activation_method, self.weight_method = activation_method, weight_method
        self.per_channel = weight_per_channel
        device = linear.weight.device
        weight_shape = (self.out_features,) if weight_per_channel else ()
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(weight_shape, device=device))
        self.register_buffer(
            "weight_zero_point", torch.zeros(weight_shape, dtype=torch.int32, device=device)
        )
        self.input_observer = self._new_input_observer()
        self.calibrated = False
        self._mode = "observe"

    # -- modes ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """One of `MODES`; change it with `set_mode`."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch to `mode` (see the module docstring); quantize and lsq need frozen qparams."""
        if mode not in MODES:
            raise SciquantError(f"unknown QuantLinear mode {mode!r}; known: {', '.join(MODES)}")
        if mode in ("quantize", "lsq") and not self.calibrated:
            raise SciquantError(
                f"cannot switch to {mode!r} before calibration: run calibrate(qmodel, inputs) "
                "(or disable_observers after observing) first"
            )
        if mode == "lsq":
            check_lsq_specs(self.weight_spec, self.activation_spec)
        self._set_learnable(mode == "lsq")
        self._mode = mode

    def reset_observer(self) -> None:
        """Forget every input observed so far."""
        self.input_observer = self._new_input_observer()

    def freeze(self) -> None:
        """Turn what the observer saw into input qparams, observe the weight, switch to quantize."""
        if self.input_observer.min_val is None:
            raise SciquantError(
                "a quantized layer saw no calibration input; the calibration data never reached "
                "it (check the inputs and the layer selection)"
            )
        scale, zero_point = self.input_observer.qparams(self.activation_spec)
        self._copy_qparams("input", scale, zero_point)
        self.observe_weight()
        self.calibrated = True
        self.set_mode("quantize")

    def observe_weight(self) -> None:
        """Set the weight qparams from the current weight with the weight observer."""
        observer = make_observer(self.weight_method, self.weight_spec.granularity)
        observer.update(self.weight.detach().float().cpu().numpy())
        scale, zero_point = observer.qparams(self.weight_spec)
        self._copy_qparams("weight", scale, zero_point)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self._mode == "float":
            return F.linear(x, self.weight, self.bias)
        if self._mode == "observe":
            self.input_observer.update(x.detach().float().cpu().numpy())
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.fake_quantize_input(x), self.fake_quantize_weight(), self.used_bias())

    def used_bias(self) -> Tensor | None:
        """The bias the quantized layer adds: float, or on the int32 grid s_x·s_w."""
        if self.bias is None or not self.integer_bias:
            return self.bias
        step = (self.input_scale * self.weight_scale).expand_as(self.bias)
        rounded = torch.round(self.bias / step) * step
        return self.bias + (rounded - self.bias).detach()  # straight through in training

    def fake_quantize_input(self, x: Tensor) -> Tensor:
        """The input on its integer grid (activation spec, per tensor), same shape as x."""
        spec = self.activation_spec
        if self._mode == "lsq":
            return _learnable_fake_quantize(x, self.input_scale, self.input_zero_point, spec, None)
        return torch.fake_quantize_per_tensor_affine(
            x, self.input_scale, self.input_zero_point, spec.qmin, spec.qmax
        )

    def fake_quantize_weight(self) -> Tensor:
        """The weight on its integer grid (weight spec), [out, in]."""
        spec, axis = self.weight_spec, 0 if self.per_channel else None
        if self._mode == "lsq":
            return _learnable_fake_quantize(
                self.weight, self.weight_scale, self.weight_zero_point, spec, axis
            )
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(
                self.weight, self.weight_scale, self.weight_zero_point, spec.qmin, spec.qmax
            )
        return torch.fake_quantize_per_channel_affine(
            self.weight, self.weight_scale, self.weight_zero_point, axis, spec.qmin, spec.qmax
        )

    def input_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32 [], zero_point int32 []) in effect, also in lsq mode; detached."""
        return _effective_qparams(self.input_scale, self.input_zero_point, self.activation_spec)

    def weight_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32 [out] or [], zero_point int32 likewise) in effect; detached."""
        return _effective_qparams(self.weight_scale, self.weight_zero_point, self.weight_spec)

    # -- state ---------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"mode": self._mode, "calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state["calibrated"])
        self._set_learnable(state["mode"] == "lsq")
        self._mode = state["mode"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Make qparams buffers or parameters, as in the saved model, before the values are
        # copied: a float LSQ zero point copied into an int32 buffer would be truncated.
        state = state_dict.get(prefix + "_extra_state")
        if isinstance(state, dict) and "mode" in state:
            self._set_learnable(state["mode"] == "lsq")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self._mode}, "
            f"weight_bits={self.weight_spec.bits}, activation_bits={self.activation_spec.bits}"
        )

    # -- internals -----------------------------------------------------------------------------

    def _new_input_observer(self) -> Observer:
        return make_observer(self.activation_method, self.activation_spec.granularity)

    def _copy_qparams(self, which: str, scale: np.ndarray, zero_point: np.ndarray) -> None:
        with torch.no_grad():
            getattr(self, f"{which}_scale").copy_(torch.from_numpy(np.asarray(scale)))
            getattr(self, f"{which}_zero_point").copy_(torch.from_numpy(np.asarray(zero_point)))

    def _learnable_names(self) -> list[str]:
        names = ["input_scale", "weight_scale"]
        if not self.activation_spec.symmetric:
            names.append("input_zero_point")
        if not self.weight_spec.symmetric:
            names.append("weight_zero_point")
        return names

    def _set_learnable(self, learnable: bool) -> None:
        """Turn the LSQ-trained qparams into float parameters, or back into buffers."""
        for name in self._learnable_names():
            value = getattr(self, name)
            if learnable == isinstance(value, nn.Parameter):
                continue
            if learnable:
                del self._buffers[name]
                setattr(self, name, nn.Parameter(value.detach().float().clone()))
            else:
                spec = self.activation_spec if name.startswith("input") else self.weight_spec
                value = value.detach()
                if name.endswith("scale"):
                    frozen = value.abs().clamp_min(_MIN_SCALE)
                else:
                    frozen = value.round().clamp(spec.qmin, spec.qmax).to(torch.int32)
                del self._parameters[name]
                self.register_buffer(name, frozen.clone())


def _learnable_fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, axis: int | None
) -> Tensor:
    """LSQ fake-quant of x with learnable scale (and zero_point when it is a parameter)."""
    scale = scale.abs().clamp_min(_MIN_SCALE)  # a step may cross zero; the kernel needs s > 0
    zero_point = zero_point.float()
    per_scale = max(1, x.numel() // max(1, scale.numel()))
    grad_factor = 1.0 / math.sqrt(per_scale * spec.qmax)
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1), spec.qmin, spec.qmax, grad_factor
        )
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zero_point, axis, spec.qmin, spec.qmax, grad_factor
    )


def _effective_qparams(scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The qparams the kernels actually use: |s| clamped, zero point rounded and clamped."""
    scale = scale.detach().float().abs().clamp_min(_MIN_SCALE)
    zero_point = zero_point.detach().float().round().clamp(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


class QuantizedModel(nn.Module):
    """A fake-quantized copy of a float model; call it like the float model.

    ``model``: the copy, with the quantized ``nn.Linear`` layers replaced by `QuantLinear`.
    ``target``, ``precision`` (the default), ``method``, ``layer_precisions`` (name → Precision
    of every quantized layer) say how it was made.
    """

    def __init__(
        self,
        model: nn.Module,
        target: Target,
        precision: Precision,
        method: str,
        layer_precisions: Mapping[str, Precision],
    ) -> None:
        super().__init__()
        self.model = model
        self.target = target
        self.precision = precision
        self.method = method
        self.layer_precisions = dict(layer_precisions)

    def forward(self, *inputs: Tensor, **kwargs: Tensor) -> Tensor:
        return self.model(*inputs, **kwargs)

    def quant_linears(self) -> dict[str, QuantLinear]:
        """Every QuantLinear by its name in the float model (e.g. ``decoder.layers.2``)."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, QuantLinear)
        }

    def quantized_layers(self) -> list[str]:
        """Names of the quantized layers, in module order."""
        return list(self.quant_linears())


def layer_names(model: nn.Module) -> list[str]:
    """Names of every Linear layer (float or quantized) of a float or quantized model, in order."""
    inner = model.model if isinstance(model, QuantizedModel) else model
    return [
        name
        for name, module in inner.named_modules()
        if isinstance(module, nn.Linear | QuantLinear)
    ]


def quantize_model(
    model: nn.Module,
    target: Target | str,
    precision: Precision | str,
    method: str = "ptq-minmax",
    layers: Iterable[str] | None = None,
    precisions: Mapping[str, Precision | str] | None = None,
) -> QuantizedModel:
    """A deep copy of `model` with its Linear layers fake-quantized under `target`, uncalibrated.

    layers: names (see `layer_names`) of the layers to quantize, default all; the others stay
    float. precisions: per-layer overrides of `precision` (integer precisions, e.g. a
    mixed-precision assignment), only for quantized layers. method: `METHOD_OBSERVERS` key (a
    bare observer name such as ``minmax`` means ``ptq-minmax``). Run `calibrate` next.
    """
    if isinstance(model, QuantizedModel):
        raise SciquantError("the model is already quantized; quantize its float original")
    target = get_target(target) if isinstance(target, str) else target
    default = _integer_precision(precision)
    target.plan(str(default), "torch")  # refuses targets that do not take torch models
    method = _method_name(method)
    activation_method, weight_method = METHOD_OBSERVERS[method]
    names = layer_names(model)
    chosen = _chosen_layers(names, layers)
    layer_precisions = {name: default for name in chosen}
    for name, override in (precisions or {}).items():
        if name not in layer_precisions:
            raise SciquantError(
                f"precision override for {name!r}, which is not a quantized layer; quantized "
                f"layers: {', '.join(chosen) or 'none'}"
            )
        layer_precisions[name] = _integer_precision(override)
        target.plan(str(layer_precisions[name]), "torch")
    quantized = copy.deepcopy(model)
    for name, layer_precision in layer_precisions.items():
        linear = quantized.get_submodule(name)
        replacement = QuantLinear(
            linear,
            target.weight_spec(layer_precision.weight_bits, channel_axis=0),
            target.activation_spec(layer_precision.activation_bits),
            activation_method=activation_method,
            weight_method=weight_method,
            integer_bias=target.backend in INTEGER_BIAS_BACKENDS,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(quantized.get_submodule(parent_name), child, replacement)
    return QuantizedModel(quantized, target, default, method, layer_precisions)


def calibrate(
    qmodel: QuantizedModel, inputs: Iterable[tuple[Tensor, Tensor, Tensor]]
) -> QuantizedModel:
    """Observe every input tuple (float forward, no grad, eval mode), then freeze the qparams.

    inputs: tuples of the model's positional arguments, e.g. (node_features [N, F],
    edge_features [E, 9], edge_index [2, E]). Observers start empty; afterwards every quantized
    layer is in quantize mode. Returns qmodel.
    """
    for layer in qmodel.quant_linears().values():
        layer.set_mode("observe")
        layer.reset_observer()
    was_training = qmodel.training
    qmodel.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in inputs:
                qmodel(*batch)
                batches += 1
    finally:
        qmodel.train(was_training)
    if batches == 0:
        raise SciquantError("calibration got no input tuples; pass at least one graph")
    return disable_observers(qmodel)


def disable_observers(qmodel: QuantizedModel) -> QuantizedModel:
    """Freeze every observing layer's qparams from what it saw; it fake-quantizes from now on."""
    for name, layer in qmodel.quant_linears().items():
        if layer.mode != "observe":
            continue
        try:
            layer.freeze()
        except SciquantError as error:
            raise SciquantError(f"layer {name!r}: {error}") from None
    return qmodel


def set_mode(qmodel: QuantizedModel, mode: str) -> QuantizedModel:
    """Put every quantized layer into `mode` (one of `MODES`)."""
    for layer in qmodel.quant_linears().values():
        layer.set_mode(mode)
    return qmodel


def enable_lsq(qmodel: QuantizedModel) -> QuantizedModel:
    """Make the calibrated scales (and asymmetric zero points) learnable: LSQ mode for QAT.

    Build the optimizer after this call (the qparams become new ``nn.Parameter`` objects, see
    `lsq_parameters`). SciquantError before calibration or for power-of-two targets.
    """
    return set_mode(qmodel, "lsq")


def disable_lsq(qmodel: QuantizedModel) -> QuantizedModel:
    """Freeze the learned qparams back into buffers (quantize mode), e.g. before export."""
    return set_mode(qmodel, "quantize")


def lsq_parameters(qmodel: QuantizedModel) -> list[nn.Parameter]:
    """The learnable qparams (empty unless in LSQ mode), e.g. for their own learning rate."""
    return [
        getattr(layer, name)
        for layer in qmodel.quant_linears().values()
        for name in layer._learnable_names()
        if isinstance(getattr(layer, name), nn.Parameter)
    ]


def _integer_precision(precision: Precision | str) -> Precision:
    parsed = parse_precision(precision) if isinstance(precision, str) else precision
    if not isinstance(parsed, Precision):
        raise SciquantError(f"precision must be a Precision or a string, got {precision!r}")
    if parsed.kind != "int":
        raise SciquantError(
            f"precision {parsed} is a float format, not a fake-quant precision: fp32 is the float "
            "model itself and fp16 runs in TensorRT (trt-v100, trt-rtx3090); quantize_model "
            "takes integer precisions wXaY"
        )
    return parsed


def _method_name(method: str) -> str:
    name = f"ptq-{method}" if method in OBSERVERS else method
    if name not in METHOD_OBSERVERS:
        raise SciquantError(
            f"unknown quantization method {method!r}; known: {', '.join(METHOD_OBSERVERS)}"
        )
    return name


def _chosen_layers(names: list[str], layers: Iterable[str] | None) -> list[str]:
    if layers is None:
        return names
    if isinstance(layers, str):
        raise SciquantError(
            f"layers must be a collection of layer names, got the string {layers!r}"
        )
    wanted = set(layers)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise SciquantError(
            f"unknown layer(s) {', '.join(unknown)}; the model's Linear layers are "
            f"{', '.join(names)}"
        )
    return [name for name in names if name in wanted]
