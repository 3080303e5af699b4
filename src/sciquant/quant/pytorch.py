"""Fake-quantized PyTorch models: `QuantLinear`, post-training calibration, and the hooks of QAT.

    qmodel = quantize_model(model, "cpu-x86", "w8a8", "ptq-minmax")   # a deep copy
    calibrate(qmodel, [(node_features, edge_features, edge_index), ...])
    delta = qmodel(node_features, edge_features, edge_index)          # fake-quant forward

Every quantized ``nn.Linear`` becomes a `QuantLinear` that fake-quantizes its input (the
target's activation `QuantSpec`, per tensor) and its weight (the target's weight spec: per output
channel, axis 0, or per tensor) with torch's own kernels, ``torch.fake_quantize_per_tensor_affine``
and ``torch.fake_quantize_per_channel_affine`` (the affine math is in `sciquant.quant.spec`);
without autograd (rollouts, evaluation) the same arithmetic runs as element-wise ops
(`fake_quantize_affine`: bitwise the kernels' result, several times faster on a CPU). The
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
    tqt       fake-quant with learned power-of-two thresholds, TQT (Jain et al., MLSys 2020),
              for power-of-two targets (npu-pow2); see below

Observers (`sciquant.quant.observers.make_observer`): activations use the method's own observer
(ptq-minmax, ptq-percentile, ptq-mse, ptq-entropy). Weights use per-channel (or per-tensor, as
the spec says) min/max, the standard choice and what TensorRT does for weights, except under
ptq-mse, whose weights also get the MSE-optimal clipping per channel. QAT methods (qat-ste,
qat-lsq, qat-tqt, qat-degree) start from MSE calibration of activations and weights (or min/max:
`quantize_model`'s ``qat_init``, `QAT_INITS`); training moves the weights (STE) or the scales
(LSQ, TQT).

LSQ: the scale gradient is scaled by grad_factor = 1 / sqrt(n · qmax), n the number of elements
one scale quantizes (the whole input per tensor, one weight row per channel), as in LSQ. A scale
is used as |s| clamped to float32's smallest normal, so a step that crosses zero cannot break the
kernel. Power-of-two targets (npu-pow2) keep the powers of two the observer gives; LSQ would move
them off the grid, so `enable_lsq` refuses them: `enable_tqt` trains those instead.

TQT (method ``qat-tqt``; `enable_tqt`): only for symmetric signed per-tensor specs with pow2
scales, the npu-pow2 scheme (`check_tqt_specs`). Each quantizer (the layer's input, its weight)
learns log2 t, t its clipping threshold: a float32 ``nn.Parameter`` [] named
``input_log2_threshold`` / ``weight_log2_threshold`` (None outside tqt mode). For b bits:

    s = 2^ceil(log2 t) / 2^(b-1)                  an exact power of two (t rounded up to one)
    q = clamp(round(x / s), qmin, qmax) · s        exact too, x / s only shifts the exponent
    entering tqt:  log2 t = log2(s_calibrated) + (b - 1), an integer, so that tqt starts from
                   exactly the quantize-mode forward (t = 2^(b-1)·s = (qmax + 1)·s)

Backward (the paper's; round and ceil straight through), r = round(x / s), "inside" meaning
qmin <= r <= qmax (decided on the rounded code, as in the paper, since the clamp acts on r):

    dq/dx        = 1 inside, 0 outside
    dq/d(log2 t) = s·ln2·(r - x/s) inside,  s·ln2·qmin where r < qmin,  s·ln2·qmax where r > qmax

The exponent of s is kept in float32's normal range [-126, 127]. Leaving tqt (any other mode,
e.g. `disable_tqt`) writes the s in effect into the ``input_scale`` / ``weight_scale`` buffers,
exact powers of two, and drops the thresholds, so export runs unchanged; in tqt mode
`QuantLinear.input_qparams` / `QuantLinear.weight_qparams` give the scales in effect (the
buffers keep the values from before tqt until then).

Graph-aware QAT (method ``qat-degree``, `sciquant.quant.degree`): its builder
`sciquant.quant.degree.quantize_degree_model` returns a `DegreeQuantizedModel`, whose node-row
layers (node encoder, node MLPs, decoder) are `QuantLinear` subclasses with a second input scale
for high in-degree (junction) rows and Degree-Quant's random protection of high-degree rows in
training; the model's forward hands them the node degrees of its ``edge_index``. A simulation
(eager / simulated targets).

State: the four qparam buffers (parameters in lsq mode, same names), the two log2 thresholds
in tqt mode and the mode are in the ``state_dict`` (``_extra_state``), so a quantized model
saved and loaded into a fresh `quantize_model` of the same float model runs identically.
Observers are not saved.
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
    check_method_limits,
    make_observer,
    method_observers,
)
from sciquant.quant.spec import PerChannel, PerTensor, Precision, QuantSpec, parse_precision
from sciquant.quant.targets import INTEGER_BIAS_BACKENDS, Target, get_target

__all__ = [
    "MODES",
    "QuantLinear",
    "QuantizedModel",
    "calibrate",
    "check_tqt_specs",
    "disable_lsq",
    "disable_observers",
    "disable_tqt",
    "enable_lsq",
    "enable_tqt",
    "layer_names",
    "lsq_parameters",
    "quantize_layers",
    "quantize_model",
    "set_mode",
    "tqt_fake_quantize",
    "tqt_parameters",
    "tqt_scale",
]


_MIN_SCALE = float(np.finfo(np.float32).tiny)
#: float32's normal exponents: TQT scales 2^e stay in [2^-126, 2^127] (2^-126 = _MIN_SCALE)
_MIN_EXPONENT, _MAX_EXPONENT = -126, 127
_LN2 = math.log(2.0)


def fake_quantize_affine(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, axis: int | None
) -> Tensor:
    """``torch.fake_quantize_per_tensor_affine`` (axis None) or ``..._per_channel_affine``.

    Under autograd: torch's kernels (their straight-through gradient). Without it: the kernels'
    arithmetic as element-wise ops, ``(clamp(round(x · (1/s)) + z, qmin, qmax) - z) · s`` in
    float32 with 1/s in float32 and round half to even, the same bits as the kernels
    (tests/test_quant_torch.py checks it, ties included); torch's fused CPU kernel is 5-10x
    slower on the activations of a rollout step.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, spec.qmin, spec.qmax)
        return torch.fake_quantize_per_channel_affine(
            x, scale, zero_point, axis, spec.qmin, spec.qmax
        )
    scale = scale.to(torch.float32)
    zero = zero_point.to(torch.float32)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    with torch.no_grad():
        q = torch.round(x * torch.reciprocal(scale)).add_(zero).clamp_(spec.qmin, spec.qmax)
        return q.sub_(zero).mul_(scale)


class QuantLinear(nn.Module):
    """A Linear whose input and weight are fake-quantized; bias float. [*, in] -> [*, out].

    Holds the wrapped Linear's ``weight`` [out, in] and ``bias`` [out] (same parameters, same
    state_dict names) and the qparams: ``input_scale`` [] float32, ``input_zero_point`` [] int32,
    ``weight_scale`` / ``weight_zero_point`` [out] (per channel) or [] (per tensor).
    ``integer_bias``: the bias is rounded to the int32 grid of step s_x·s_w, as an integer GEMM
    that adds it in its accumulator does (`sciquant.quant.targets.INTEGER_BIAS_BACKENDS`;
    straight-through in LSQ training). In tqt mode ``input_log2_threshold`` and
    ``weight_log2_threshold`` (float32 [] parameters, None in other modes) hold log2 t.
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
        self.register_parameter("input_log2_threshold", None)  # tqt mode only
        self.register_parameter("weight_log2_threshold", None)
        self.input_observer = self._new_input_observer()
        self.calibrated = False
        self._mode = "observe"

    # -- modes ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """One of `MODES`; change it with `set_mode`."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch to `mode` (see the module docstring); quantize, lsq and tqt need frozen qparams.

        Leaving tqt freezes the learned thresholds into the scale buffers; entering it again
        starts from those buffers.
        """
        self.check_mode(mode)
        self._set_learnable(mode == "lsq")
        self._set_tqt(mode == "tqt")
        self._mode = mode

    def check_mode(self, mode: str) -> None:
        """SciquantError unless `set_mode(mode)` may switch this layer (it changes nothing)."""
        if mode not in MODES:
            raise SciquantError(f"unknown QuantLinear mode {mode!r}; known: {', '.join(MODES)}")
        if mode in ("quantize", "lsq", "tqt") and not self.calibrated:
            raise SciquantError(
                f"cannot switch to {mode!r} before calibration: run calibrate(qmodel, inputs) "
                "(or disable_observers after observing) first"
            )
        if mode == "lsq":
            check_lsq_specs(self.weight_spec, self.activation_spec)
        if mode == "tqt":
            check_tqt_specs(self.weight_spec, self.activation_spec)

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
        if self._mode == "tqt":  # the scales in effect (powers of two, no gradient)
            step = self.input_qparams()[0] * self.weight_qparams()[0]
        else:
            step = self.input_scale * self.weight_scale
        step = step.expand_as(self.bias)
        rounded = torch.round(self.bias / step) * step
        return self.bias + (rounded - self.bias).detach()  # straight through in training

    def fake_quantize_input(self, x: Tensor) -> Tensor:
        """The input on its integer grid (activation spec, per tensor), same shape as x."""
        spec = self.activation_spec
        if self._mode == "lsq":
            return _learnable_fake_quantize(x, self.input_scale, self.input_zero_point, spec, None)
        if self._mode == "tqt":
            return tqt_fake_quantize(x, self.input_log2_threshold, spec)
        return fake_quantize_affine(x, self.input_scale, self.input_zero_point, spec, None)

    def fake_quantize_weight(self) -> Tensor:
        """The weight on its integer grid (weight spec), [out, in]."""
        spec, axis = self.weight_spec, 0 if self.per_channel else None
        if self._mode == "lsq":
            return _learnable_fake_quantize(
                self.weight, self.weight_scale, self.weight_zero_point, spec, axis
            )
        if self._mode == "tqt":
            return tqt_fake_quantize(self.weight, self.weight_log2_threshold, spec)
        return fake_quantize_affine(
            self.weight, self.weight_scale, self.weight_zero_point, spec, axis
        )

    def input_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32 [], zero_point int32 []) in effect, also in lsq and tqt mode; detached."""
        if self._mode == "tqt":
            return _tqt_qparams(
                self.input_log2_threshold, self.input_zero_point, self.activation_spec
            )
        return _effective_qparams(self.input_scale, self.input_zero_point, self.activation_spec)

    def weight_qparams(self) -> tuple[Tensor, Tensor]:
        """(scale float32 [out] or [], zero_point int32 likewise) in effect; detached."""
        if self._mode == "tqt":
            return _tqt_qparams(
                self.weight_log2_threshold, self.weight_zero_point, self.weight_spec
            )
        return _effective_qparams(self.weight_scale, self.weight_zero_point, self.weight_spec)

    # -- state ---------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"mode": self._mode, "calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state["calibrated"])
        self._set_learnable(state["mode"] == "lsq")
        self._set_tqt(state["mode"] == "tqt")
        self._mode = state["mode"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Make qparams buffers or parameters, as in the saved model, before the values are
        # copied: a float LSQ zero point copied into an int32 buffer would be truncated, and the
        # TQT thresholds exist only in tqt mode.
        state = state_dict.get(prefix + "_extra_state")
        if isinstance(state, dict) and "mode" in state:
            self._set_learnable(state["mode"] == "lsq")
            self._set_tqt(state["mode"] == "tqt")
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

    def _set_tqt(self, enabled: bool) -> None:
        """Create the log2 thresholds from the scale buffers, or freeze them back into those."""
        for which, spec in (("input", self.activation_spec), ("weight", self.weight_spec)):
            name = f"{which}_log2_threshold"
            threshold = getattr(self, name)
            scale = getattr(self, f"{which}_scale")
            if enabled and threshold is None:
                setattr(self, name, nn.Parameter(_log2_threshold_of(scale, spec)))
            elif not enabled and threshold is not None:
                with torch.no_grad():
                    scale.copy_(tqt_scale(threshold, spec).to(scale.dtype))
                setattr(self, name, None)


def check_tqt_specs(*specs: QuantSpec) -> None:
    """TQT trains power-of-two thresholds: SciquantError unless every spec is symmetric signed,
    per tensor, with pow2 scales (the npu-pow2 target's scheme)."""
    for spec in specs:
        if spec.scale_kind != "pow2" or not spec.symmetric or not spec.signed:
            kind = "symmetric" if spec.symmetric else "asymmetric"
            sign = "signed" if spec.signed else "unsigned"
            raise SciquantError(
                "TQT (method qat-tqt) trains power-of-two thresholds of symmetric signed "
                f"quantizers, the scheme of target npu-pow2; got a {kind} {sign} spec with "
                f"{spec.scale_kind} scales: use qat-lsq or qat-ste on this target"
            )
        if not isinstance(spec.granularity, PerTensor):
            raise SciquantError(
                "TQT (method qat-tqt) learns one threshold per tensor, as target npu-pow2 "
                f"quantizes; a {spec.granularity} spec is not supported"
            )


def tqt_scale(log2_threshold: Tensor, spec: QuantSpec) -> Tensor:
    """s = 2^ceil(log2 t) / 2^(b-1), float32 of log2_threshold's shape; detached.

    Built from its exponent bits, so s is an exact power of two on every device; the exponent
    is clamped to float32's normal range [-126, 127].
    """
    return _pow2_scale(log2_threshold, spec.bits)


def _pow2_scale(log2_threshold: Tensor, bits: int) -> Tensor:
    exponent = torch.ceil(log2_threshold.detach().double()) - (bits - 1)
    exponent = exponent.clamp(_MIN_EXPONENT, _MAX_EXPONENT).to(torch.int32)
    return torch.bitwise_left_shift(exponent + 127, 23).view(torch.float32)


def tqt_fake_quantize(x: Tensor, log2_threshold: Tensor, spec: QuantSpec) -> Tensor:
    """TQT fake-quant of x (any shape) with one learned threshold log2 t ([] or [1]).

    clamp(round(x / s), qmin, qmax) · s with s = `tqt_scale`; gradients for x and log2 t as in
    the module docstring. Computed in float32, returned in x's dtype.
    """
    return _TQTFakeQuantize.apply(x, log2_threshold, spec.bits, spec.qmin, spec.qmax)


class _TQTFakeQuantize(torch.autograd.Function):
    """Forward and the paper's backward of TQT fake-quant, one threshold for the whole x."""

    @staticmethod
    def forward(ctx, x: Tensor, log2_threshold: Tensor, bits: int, qmin: int, qmax: int) -> Tensor:  # noqa: ANN001
        scale = _pow2_scale(log2_threshold, bits).to(x.device)
        ctx.save_for_backward(x, scale)
        ctx.qmin, ctx.qmax = qmin, qmax
        ctx.threshold_shape, ctx.threshold_dtype = log2_threshold.shape, log2_threshold.dtype
        codes = torch.round(x.float() / scale).clamp(qmin, qmax)
        return (codes * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: ANN001, ANN205
        x, scale = ctx.saved_tensors
        ratio = x.float() / scale  # exact: s is a power of two
        codes = torch.round(ratio)
        below, above = codes < ctx.qmin, codes > ctx.qmax
        inside = ~(below | above)
        grad = grad_output.float()
        grad_x = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            outside = torch.where(below, float(ctx.qmin), float(ctx.qmax))
            local = torch.where(inside, codes - ratio, outside)
            grad_threshold = (grad * local).sum() * (scale * _LN2)
            grad_threshold = grad_threshold.reshape(ctx.threshold_shape).to(ctx.threshold_dtype)
        return grad_x, grad_threshold, None, None, None


def _log2_threshold_of(scale: Tensor, spec: QuantSpec) -> Tensor:
    """log2 t = log2(s) + (b - 1) for the scale s in effect, float32, exact for powers of two.

    log2 s comes from frexp (s = m·2^e, m in [0.5, 1)): e - 1 + log2(2m), exactly an integer
    when s is a power of two, so `tqt_scale` gives s back.
    """
    scale = scale.detach().double().abs().clamp_min(_MIN_SCALE)
    mantissa, exponent = torch.frexp(scale)
    log2_scale = (exponent - 1).double() + torch.log2(2.0 * mantissa)
    return (log2_scale + (spec.bits - 1)).float().clone()


def _tqt_qparams(
    log2_threshold: Tensor, zero_point: Tensor, spec: QuantSpec
) -> tuple[Tensor, Tensor]:
    """The qparams of tqt mode: the power-of-two scale in effect and zero point 0."""
    return tqt_scale(log2_threshold, spec), torch.zeros_like(zero_point, dtype=torch.int32)


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


#: Methods whose quantized model another module builds (on `quantize_layers`): the function
#: to call instead of `quantize_model`.
BUILT_ELSEWHERE = {"qat-degree": "sciquant.quant.degree.quantize_degree_model"}


def quantize_model(
    model: nn.Module,
    target: Target | str,
    precision: Precision | str,
    method: str = "ptq-minmax",
    layers: Iterable[str] | None = None,
    precisions: Mapping[str, Precision | str] | None = None,
    qat_init: str | None = None,
) -> QuantizedModel:
    """A deep copy of `model` with its Linear layers fake-quantized under `target`, uncalibrated.

    layers: names (see `layer_names`) of the layers to quantize, default all; the others stay
    float. precisions: per-layer overrides of `precision` (integer precisions, e.g. a
    mixed-precision assignment), only for quantized layers. method: `METHOD_OBSERVERS` key (a
    bare observer name such as ``minmax`` means ``ptq-minmax``); the methods of
    `BUILT_ELSEWHERE` are refused with the function that builds their models. qat_init: where a
    QAT method's calibration starts (`QAT_INITS`; None: MSE). Run `calibrate` next.
    """
    name = _method_name(method)
    if name in BUILT_ELSEWHERE:
        raise SciquantError(
            f"method {name} builds its own kind of quantized model: use {BUILT_ELSEWHERE[name]}"
        )
    return quantize_layers(model, target, precision, name, layers, precisions, qat_init)


def quantize_layers(
    model: nn.Module,
    target: Target | str,
    precision: Precision | str,
    method: str = "ptq-minmax",
    layers: Iterable[str] | None = None,
    precisions: Mapping[str, Precision | str] | None = None,
    qat_init: str | None = None,
) -> QuantizedModel:
    """`quantize_model` for every method: every Linear a plain `QuantLinear` (the base that
    method-specific model builders, such as `BUILT_ELSEWHERE`'s, start from)."""
    if isinstance(model, QuantizedModel):
        raise SciquantError("the model is already quantized; quantize its float original")
    target = get_target(target) if isinstance(target, str) else target
    default = _integer_precision(precision)
    target.plan(str(default), "torch")  # refuses targets that do not take torch models
    method = _method_name(method)
    check_method_limits(method, target.name, "torch")
    activation_method, weight_method = method_observers(method, qat_init)
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
    """Put every quantized layer into `mode` (one of `MODES`); all of them or, on a
    SciquantError naming the layer, none."""
    layers = qmodel.quant_linears()
    for name, layer in layers.items():
        try:
            layer.check_mode(mode)
        except SciquantError as error:
            raise SciquantError(f"layer {name!r}: {error}") from None
    for layer in layers.values():
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


def enable_tqt(qmodel: QuantizedModel) -> QuantizedModel:
    """Learn power-of-two thresholds (TQT mode for QAT), starting from the calibrated scales.

    Build the optimizer after this call (the thresholds are new ``nn.Parameter`` objects, see
    `tqt_parameters`). SciquantError before calibration or for targets other than pow2 ones
    (npu-pow2), see `check_tqt_specs`.
    """
    return set_mode(qmodel, "tqt")


def disable_tqt(qmodel: QuantizedModel) -> QuantizedModel:
    """Freeze the learned thresholds into the scale buffers as powers of two (quantize mode)."""
    return set_mode(qmodel, "quantize")


def tqt_parameters(qmodel: QuantizedModel) -> list[nn.Parameter]:
    """The learned log2 thresholds (empty unless in tqt mode), e.g. for their own optimizer."""
    return [
        threshold
        for layer in qmodel.quant_linears().values()
        for threshold in (layer.input_log2_threshold, layer.weight_log2_threshold)
        if threshold is not None
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
