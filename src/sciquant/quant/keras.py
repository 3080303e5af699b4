"""Fake-quantized Keras 3 models: `QuantConv2D`, `QuantDense`, post-training calibration, QAT.

    qmodel = quantize_model(model, "litert-cpu", "w8a8", "ptq-minmax")  # a clone, weights copied
    calibrate(qmodel, [x_batch, ...])                    # observers → frozen qparams
    probabilities = qmodel(x)                            # fake-quant forward
    qat_lsq(qmodel, x_train, y_train, epochs=2)          # optional QAT

The Keras counterpart of `sciquant.quant.pytorch`, with the same vocabulary: every ``Conv2D`` and
``Dense`` becomes a `QuantConv2D` / `QuantDense` that fake-quantizes its INPUT (the target's
activation `QuantSpec`, per tensor) and its KERNEL (the target's weight spec; per output channel
= the last axis of a Keras kernel, ``target.weight_spec(bits, channel_axis=-1)``). The bias stays
float (an INT8 runtime adds it as int32 at scale s_x·s_w). The affine math, the observers and the
targets are the shared core (`sciquant.quant.spec`, `.observers`, `.targets`); this module only
expresses them in TensorFlow ops.

Which TensorFlow op computes a fake-quant (`fake_quantize_tf`)
--------------------------------------------------------------
- ``tf.quantization.fake_quant_with_min_max_vars`` (per tensor) and ``..._per_channel`` (per
  channel, last axis only) take a real range (min, max), not (scale, zero_point). `tf_min_max`
  gives the range that reproduces a core spec: ``min = (qmin - zp)·s``, ``max = (qmax - zp)·s``.
  The op has ``2^b - 1 - narrow_range`` steps, which is ``qmax - qmin`` for all four conventions
  of the core (signed/unsigned × narrow or not), so it recovers ``scale = s`` and, in its
  zero-point nudging, ``zero_point_from_min = quant_min + (zp - qmin)``: an integer, nudged onto
  itself. Its grid is the core's grid shifted by a constant number of codes, i.e. the same reals.
  This also covers the cases that look asymmetric to the op: symmetric full-range int8
  (zero_point 0 in [-128, 127]) is the range [-128·s, 127·s], which the op represents exactly
  (passing the symmetric range [-a, a] instead, as some tools do, would be nudged).
- Rounding: the op rounds half up (``floor(v + 0.5)`` after subtracting the nudged min), the core
  half to even (``np.rint``). For float scales a tie needs x/s to be exactly n + 1/2, which float
  data essentially never is, so the two agree to float32 rounding (tested). For power-of-two
  scales x/s is exact and ties are common (x = 0.375 at s = 0.25), so pow2 specs use plain ops
  instead: ``tf.round`` (half to even) and ``tf.clip_by_value`` with a straight-through round,
  the core's formula verbatim (`_fake_quantize_exact`).
- Dense kernels per output channel: the per-channel op quantizes only the last axis, which is
  right for the (in, out) kernel, but the TFLite converter transposes Dense kernels to (out, in)
  and cannot move a per-axis quantization through that transpose ("tfl.transpose op has
  mismatched quantized axes"). `QuantDense` therefore quantizes the transposed kernel (out, in)
  along axis 0 with ``QuantizeAndDequantizeV3`` (symmetric, any axis, round half to even; the
  converter turns it into per-channel int8 FULLY_CONNECTED weights) and multiplies with
  ``transpose_b``. Its registered gradient is a plain identity; a custom gradient makes it the
  clipped straight-through estimator of the fake-quant ops. (``QuantizeAndDequantizeV4``, the
  op behind ``tf.quantization.quantize_and_dequantize_v2``, crashes the converter.)

Layers and the integer runtime
------------------------------
MaxPooling2D, ReLU, Dropout and Flatten need no quantizer: an INT8 runtime keeps them in their
input's scale (max-pool and ReLU commute with rounding, Dropout is the identity at inference,
Flatten a reshape), and the next Conv/Dense quantizes its own input, so every integer GEMM or
convolution of a runtime sees exactly the tensors this simulation rounds. What TFLite does at the
edges (checked by converting these models):

- model input: the int8 input tensor takes the first layer's input quantizer (scale, zero_point);
  a runner quantizes float pixels with exactly those.
- model output: full-integer TFLite also stores the LAST layer's output in int8 (logits with their
  own scale), and an int8 softmax always writes scale 1/256, zero_point -128. Without a quantizer
  on the logits the converter leaves the last FULLY_CONNECTED in float. So for `litert` targets
  (`quantize_outputs`, default: the target's backend is litert) the terminal Conv/Dense layers
  (those whose output reaches a model output through no other Conv/Dense) also quantize their
  output (before a softmax, after any other activation, as TFLite fuses ReLU), and a softmax at
  the model output (`QuantActivation`, or a Dense with activation="softmax") is put on TFLite's
  fixed grid: scale 2^-b, zero_point qmin. Other backends (TensorRT, ONNX Runtime) return float
  outputs from the last layer, so there the outputs stay float, as in `sciquant.quant.pytorch`.

Modes (`set_mode`): ``float`` (the layer is its float self), ``observe`` (float, while observers
see the input and, if quantized, the output; eager calls only), ``quantize`` (fake-quant with the
frozen qparams; gradients are the clipped straight-through estimator: QAT-STE), ``lsq``
(learnable scales, and zero points of asymmetric specs: LSQ, Esser et al. 2020, with the gradient
scale 1 / sqrt(n · qmax), n the elements one scale quantizes, as in `sciquant.quant.pytorch`).
Power-of-two targets refuse LSQ (it would move the scales off their grid). Precision ``fp16``:
inputs, kernels and biases are cast through float16 (a simulation of an FP16 engine with float32
accumulation); nothing to calibrate.

Observers: the method's observer for activations; weights min/max per channel, except ptq-mse,
whose weights also get the MSE-optimal clipping (`METHOD_OBSERVERS`, the same table as torch),
and QAT methods, which start from MSE ranges for both (or min/max: ``qat_init``, `QAT_INITS`).

State: the qparams are non-trainable float32 weights of the layers (``input_scale``,
``input_zero_point``, ``weight_scale``, ``weight_zero_point``, and ``output_*`` where the output
is quantized); the specs, methods and mode are in the layer config. A quantized model saves as
``.keras`` and loads with ``keras.models.load_model`` once this module is imported (the layers
are registered as ``sciquant>QuantConv2D`` etc.). Observers are not saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

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
from sciquant.quant.targets import Target, get_target

__all__ = [
    "METHOD_OBSERVERS",
    "MODES",
    "QuantActivation",
    "QuantConv2D",
    "QuantDense",
    "calibrate",
    "check_method",
    "disable_lsq",
    "enable_lsq",
    "fake_quantize_tf",
    "is_quantized",
    "iterate_batches",
    "layer_summary",
    "lsq_variables",
    "model_info",
    "qat_lsq",
    "qat_ste",
    "quant_layers",
    "quantize_model",
    "set_mode",
    "spec_from_config",
    "spec_to_config",
    "tf_min_max",
]


#: Methods for float precisions (fp16): no ranges, a plain cast.
FLOAT_METHODS = ("none",)

_MIN_SCALE = float(np.finfo(np.float32).tiny)
_PACKAGE = "sciquant"


# -- specs and ranges ------------------------------------------------------------------------


def spec_to_config(spec: QuantSpec) -> dict[str, Any]:
    """A QuantSpec as plain JSON values (for layer configs and quantization.json)."""
    granularity = spec.granularity
    return {
        "bits": spec.bits,
        "symmetric": spec.symmetric,
        "per_channel_axis": granularity.axis if isinstance(granularity, PerChannel) else None,
        "scale_kind": spec.scale_kind,
        "narrow_range": spec.narrow_range,
        "signed": spec.signed,
    }


def spec_from_config(config: dict[str, Any]) -> QuantSpec:
    """The inverse of `spec_to_config`."""
    axis = config.get("per_channel_axis")
    return QuantSpec(
        bits=int(config["bits"]),
        symmetric=bool(config["symmetric"]),
        granularity=PerTensor() if axis is None else PerChannel(int(axis)),
        scale_kind=config.get("scale_kind", "float"),
        narrow_range=bool(config.get("narrow_range", False)),
        signed=config.get("signed"),
    )


def tf_min_max(
    scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """The (min, max) that make TF's fake-quant ops quantize like the core's (scale, zero_point).

    ``min = (qmin - zero_point) · scale``, ``max = (qmax - zero_point) · scale`` (float32, the
    shape of scale); use with ``num_bits=spec.bits, narrow_range=spec.narrow_range``.
    """
    scale = np.asarray(scale, dtype=np.float64)
    zero_point = np.asarray(zero_point, dtype=np.float64)
    lo = (spec.qmin - zero_point) * scale
    hi = (spec.qmax - zero_point) * scale
    return lo.astype(np.float32), hi.astype(np.float32)


def _tf_op_levels_match(spec: QuantSpec) -> bool:
    """Whether TF's fake-quant op has as many steps as the spec (always true for the core)."""
    return spec.qmax - spec.qmin == 2**spec.bits - 1 - int(spec.narrow_range)


# -- fake-quantization in TensorFlow ---------------------------------------------------------


def fake_quantize_tf(
    x: tf.Tensor, scale: tf.Tensor, zero_point: tf.Tensor, spec: QuantSpec
) -> tf.Tensor:
    """Fake-quantize x like `sciquant.quant.spec.fake_quantize`, with TF ops (see module doc).

    x: float32 tensor; scale, zero_point: [] (PerTensor) or [C] (PerChannel(axis), C =
    x.shape[axis]); zero_point may be float (it is rounded and clamped here). Gradient: the
    clipped straight-through estimator (1 inside the range, 0 outside).
    """
    scale = tf.maximum(tf.abs(tf.cast(scale, tf.float32)), _MIN_SCALE)
    zero_point = tf.clip_by_value(tf.round(tf.cast(zero_point, tf.float32)), spec.qmin, spec.qmax)
    axis = _channel_axis(spec, x.shape.rank)
    if spec.scale_kind == "pow2" or not _tf_op_levels_match(spec):
        return _fake_quantize_exact(x, scale, zero_point, spec, axis)
    lo = (spec.qmin - zero_point) * scale
    hi = (spec.qmax - zero_point) * scale
    if axis is None:
        return tf.quantization.fake_quant_with_min_max_vars(
            x, lo, hi, num_bits=spec.bits, narrow_range=spec.narrow_range
        )
    if axis == x.shape.rank - 1:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lo, hi, num_bits=spec.bits, narrow_range=spec.narrow_range
        )
    if spec.symmetric and spec.signed:
        return _qdq_v3_axis(x, lo, hi, spec, axis)
    return _fake_quantize_exact(x, scale, zero_point, spec, axis)


def _channel_axis(spec: QuantSpec, rank: int | None) -> int | None:
    if isinstance(spec.granularity, PerTensor):
        return None
    axis = spec.granularity.axis
    if rank is None:
        raise SciquantError("per-channel fake-quantization needs a tensor of known rank")
    if not -rank <= axis < rank:
        raise SciquantError(f"PerChannel axis {axis} is out of range for a {rank}-d tensor")
    return axis % rank


def _broadcast(values: tf.Tensor, rank: int, axis: int | None) -> tf.Tensor:
    """[] stays []; [C] becomes shape 1 everywhere but `axis`."""
    if axis is None:
        return values
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(values, shape)


def _round_ste(x: tf.Tensor) -> tf.Tensor:
    """Round half to even forward, identity backward."""
    return x + tf.stop_gradient(tf.round(x) - x)


def _scale_gradient(x: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """x forward, gradient multiplied by `factor` backward (LSQ's gradient scale)."""
    scaled = x * factor
    return scaled + tf.stop_gradient(x - scaled)


def _fake_quantize_exact(
    x: tf.Tensor, scale: tf.Tensor, zero_point: tf.Tensor, spec: QuantSpec, axis: int | None
) -> tf.Tensor:
    """The core's formula in TF ops: clamp(round(x / s) + zp) then (q - zp) · s; STE round."""
    rank = x.shape.rank
    scale_b = _broadcast(scale, rank, axis)
    zero_point_b = _broadcast(zero_point, rank, axis)
    x_q = tf.clip_by_value(_round_ste(x / scale_b) + zero_point_b, spec.qmin, spec.qmax)
    return (x_q - zero_point_b) * scale_b


def _qdq_v3_axis(
    x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, spec: QuantSpec, axis: int
) -> tf.Tensor:
    """Symmetric per-channel QDQ along any axis (QuantizeAndDequantizeV3), clipped-STE gradient."""
    rank = x.shape.rank

    @tf.custom_gradient
    def quantize(values: tf.Tensor) -> tuple[tf.Tensor, Any]:
        result = tf.raw_ops.QuantizeAndDequantizeV3(
            input=values,
            input_min=lo,
            input_max=hi,
            num_bits=spec.bits,
            signed_input=True,
            range_given=True,
            narrow_range=spec.narrow_range,
            axis=axis,
        )

        def gradient(upstream: tf.Tensor) -> tf.Tensor:
            inside = tf.logical_and(
                values >= _broadcast(lo, rank, axis), values <= _broadcast(hi, rank, axis)
            )
            return upstream * tf.cast(inside, upstream.dtype)

        return result, gradient

    return quantize(x)


def _fake_quantize_lsq(
    x: tf.Tensor, scale: tf.Tensor, zero_point: tf.Tensor, spec: QuantSpec, learn_zero_point: bool
) -> tf.Tensor:
    """LSQ: learnable scale (|s| clamped), gradient scaled by 1 / sqrt(n · qmax)."""
    axis = _channel_axis(spec, x.shape.rank)
    n = tf.cast(tf.size(x), tf.float32) / float(max(1, int(np.prod(scale.shape))))
    factor = tf.math.rsqrt(tf.maximum(n, 1.0) * float(spec.qmax))
    scale = _scale_gradient(tf.maximum(tf.abs(scale), _MIN_SCALE), factor)
    if learn_zero_point:
        zero_point = tf.clip_by_value(
            _round_ste(_scale_gradient(zero_point, factor)), spec.qmin, spec.qmax
        )
    else:
        zero_point = tf.stop_gradient(tf.clip_by_value(tf.round(zero_point), spec.qmin, spec.qmax))
    return _fake_quantize_exact(x, scale, zero_point, spec, axis)


def _through_float16(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.cast(x, tf.float16), x.dtype)


def _softmax_grid(x: tf.Tensor, spec: QuantSpec) -> tf.Tensor:
    """TFLite's fixed grid of an integer softmax output: scale 2^-bits, zero_point qmin."""
    top = (2**spec.bits - 1) / 2**spec.bits
    return tf.quantization.fake_quant_with_min_max_vars(
        x, 0.0, top, num_bits=spec.bits, narrow_range=False
    )


# -- layers ----------------------------------------------------------------------------------


class _QuantMixin:
    """What QuantConv2D and QuantDense share: qparams, observers, modes, config.

    Listed before the Keras layer class, so its __init__ / build / get_config run first and hand
    on to the layer's.
    """

    def __init__(self, *args: Any, quantization: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_quant(quantization)

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self._build_qparams()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "quantization": self._quant_config()}

    def _init_quant(self, quantization: dict[str, Any] | None) -> None:
        config = dict(quantization or {})
        self.kind = config.get("kind", "int")
        if self.kind not in ("int", "fp16"):
            raise SciquantError(f"quantization kind must be 'int' or 'fp16', got {self.kind!r}")
        self.weight_spec = (
            spec_from_config(config["weight_spec"]) if config.get("weight_spec") else None
        )
        self.activation_spec = (
            spec_from_config(config["activation_spec"]) if config.get("activation_spec") else None
        )
        if self.kind == "int" and (self.weight_spec is None or self.activation_spec is None):
            raise SciquantError("an integer quantized layer needs weight_spec and activation_spec")
        if self.activation_spec is not None and not isinstance(
            self.activation_spec.granularity, PerTensor
        ):
            raise SciquantError(
                f"activations are quantized per tensor; got {self.activation_spec.granularity}"
            )
        self.activation_method = config.get("activation_method", "minmax")
        self.weight_method = config.get("weight_method", "minmax")
        self.quantize_output = bool(config.get("quantize_output", False))
        self.calibrated = bool(config.get("calibrated", self.kind == "fp16"))
        self.provenance = dict(config.get("provenance", {}))
        mode = config.get("mode", "quantize" if self.kind == "fp16" else "float")
        if mode not in MODES:
            raise SciquantError(f"unknown quantized-layer mode {mode!r}; known: {MODES}")
        self._mode = mode
        self._observers: dict[str, Observer] = {}

    def _quant_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "weight_spec": spec_to_config(self.weight_spec) if self.weight_spec else None,
            "activation_spec": (
                spec_to_config(self.activation_spec) if self.activation_spec else None
            ),
            "activation_method": self.activation_method,
            "weight_method": self.weight_method,
            "quantize_output": self.quantize_output,
            "calibrated": self.calibrated,
            "mode": self._mode,
            "provenance": self.provenance,
        }

    def _output_channels(self) -> int:
        raise NotImplementedError

    def _build_qparams(self) -> None:
        if self.kind != "int":
            return
        per_channel = isinstance(self.weight_spec.granularity, PerChannel)
        weight_shape = (self._output_channels(),) if per_channel else ()
        shapes = {"input": (), "weight": weight_shape}
        if self.quantize_output:
            shapes["output"] = ()
        for which, shape in shapes.items():
            setattr(
                self,
                f"{which}_scale",
                self.add_weight(
                    name=f"{which}_scale", shape=shape, initializer="ones", trainable=False
                ),
            )
            setattr(
                self,
                f"{which}_zero_point",
                self.add_weight(
                    name=f"{which}_zero_point", shape=shape, initializer="zeros", trainable=False
                ),
            )

    # saving: Conv2D and Dense save only kernel and bias (their own quantization formats); these
    # layers save every variable in creation order, as `keras.layers.Layer` does.

    def save_own_variables(self, store: Any) -> None:
        if not self.built:
            return
        for index, variable in enumerate(self._trainable_variables + self._non_trainable_variables):
            store[str(index)] = variable

    def load_own_variables(self, store: Any) -> None:
        variables = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) != len(variables):
            raise SciquantError(
                f"quantized layer {self.name!r} holds {len(variables)} variables but the file has "
                f"{len(store.keys())}; the file was written by another sciquant version, rerun the "
                "quantize stage"
            )
        for index, variable in enumerate(variables):
            variable.assign(store[str(index)])

    # modes

    @property
    def mode(self) -> str:
        """One of `MODES`; change it with `set_mode`."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch to `mode`; quantize and lsq need frozen qparams (calibration)."""
        _check_keras_mode(mode)
        if self.kind == "fp16":
            if mode in ("observe", "lsq"):
                raise SciquantError(f"layer {self.name!r} is fp16 (a cast): no {mode} mode")
            self._mode = mode
            return
        if mode in ("quantize", "lsq") and not self.calibrated:
            raise SciquantError(
                f"layer {self.name!r} cannot switch to {mode!r} before calibration: run "
                "calibrate(qmodel, batches) first"
            )
        if mode == "lsq":
            check_lsq_specs(self.weight_spec, self.activation_spec)
        if self._mode == "lsq" and mode != "lsq":
            self._freeze_learned()
        if mode == "observe":
            self._observers = {}
        self._mode = mode

    def _freeze_learned(self) -> None:
        """After LSQ: scales |s| clamped, zero points rounded and clamped (stored as used)."""
        for which in self._quantizers():
            spec = self._spec(which)
            scale = getattr(self, f"{which}_scale")
            zero_point = getattr(self, f"{which}_zero_point")
            scale.assign(np.maximum(np.abs(np.asarray(scale.numpy())), _MIN_SCALE))
            zero_point.assign(np.clip(np.rint(zero_point.numpy()), spec.qmin, spec.qmax))

    def _quantizers(self) -> list[str]:
        if self.kind != "int":
            return []
        return ["input", "weight"] + (["output"] if self.quantize_output else [])

    def _spec(self, which: str) -> QuantSpec:
        return self.weight_spec if which == "weight" else self.activation_spec

    # observing and freezing

    def _observe(self, which: str, tensor: Any) -> None:
        if self._mode != "observe" or not tf.executing_eagerly():
            return
        if isinstance(tensor, keras.KerasTensor) or not hasattr(tensor, "numpy"):
            return
        observer = self._observers.get(which)
        if observer is None:
            observer = make_observer(self.activation_method, self.activation_spec.granularity)
            self._observers[which] = observer
        observer.update(tensor.numpy())

    def freeze(self) -> None:
        """Observed ranges → input/output qparams; the kernel → weight qparams; mode quantize."""
        if self.kind != "int":
            return
        for which in ("input", "output") if self.quantize_output else ("input",):
            observer = self._observers.get(which)
            if observer is None or observer.min_val is None:
                raise SciquantError(
                    f"layer {self.name!r}: its {which} saw no calibration data; the calibration "
                    "batches never reached it"
                )
            self._assign(which, *observer.qparams(self.activation_spec))
        self.observe_weight()
        self._observers = {}
        self.calibrated = True
        self._mode = "quantize"

    def observe_weight(self) -> None:
        """Set the weight qparams from the current kernel with the weight observer."""
        spec = self.weight_spec
        observer = make_observer(self.weight_method, spec.granularity)
        observer.update(np.asarray(self.kernel.numpy(), dtype=np.float32))
        self._assign("weight", *observer.qparams(spec))

    def _assign(self, which: str, scale: np.ndarray, zero_point: np.ndarray) -> None:
        getattr(self, f"{which}_scale").assign(np.asarray(scale, dtype=np.float32))
        getattr(self, f"{which}_zero_point").assign(np.asarray(zero_point, dtype=np.float32))

    def qparams(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32, zero_point int32) in effect for `input`, `weight` or `output`."""
        spec = self._spec(which)
        scale = np.maximum(np.abs(getattr(self, f"{which}_scale").numpy()), _MIN_SCALE)
        zero_point = np.clip(
            np.rint(getattr(self, f"{which}_zero_point").numpy()), spec.qmin, spec.qmax
        )
        return scale.astype(np.float32), zero_point.astype(np.int32)

    # the forward pieces

    def _fake_quantize(self, x: tf.Tensor, which: str, spec: QuantSpec | None = None) -> tf.Tensor:
        spec = spec or self._spec(which)
        scale = getattr(self, f"{which}_scale")
        zero_point = getattr(self, f"{which}_zero_point")
        if self._mode == "lsq":
            return _fake_quantize_lsq(x, scale, zero_point, spec, not spec.symmetric)
        return fake_quantize_tf(x, scale, zero_point, spec)

    def _quantize_input(self, x: tf.Tensor) -> tf.Tensor:
        if self._mode == "observe":
            self._observe("input", x)
        if self._mode in ("float", "observe"):
            return x
        if self.kind == "fp16":
            return _through_float16(x)
        return self._fake_quantize(x, "input")

    def _bias(self) -> tf.Tensor | None:
        if not self.use_bias:
            return None
        if self.kind == "fp16" and self._mode == "quantize":
            return _through_float16(self.bias)
        return self.bias

    def _finish(self, y: tf.Tensor) -> tf.Tensor:
        """Activation, with the output quantizer before a softmax and after anything else."""
        name = keras.activations.serialize(self.activation)
        name = name if isinstance(name, str) else str(name)
        softmax = name == "softmax"
        quantize = self.quantize_output and self.kind == "int"
        if quantize and (softmax or name == "linear"):
            y = self._quantize_output(y)
            y = self.activation(y)
            if softmax and self._mode in ("quantize", "lsq"):
                y = _softmax_grid(y, self.activation_spec)
            return y
        y = self.activation(y)
        return self._quantize_output(y) if quantize else y

    def _quantize_output(self, y: tf.Tensor) -> tf.Tensor:
        if self._mode == "observe":
            self._observe("output", y)
        if self._mode in ("float", "observe"):
            return y
        return self._fake_quantize(y, "output")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv2D(_QuantMixin, keras.layers.Conv2D):
    """A Conv2D whose input and kernel (per output channel: the kernel's last axis) are
    fake-quantized; bias float. Config key ``quantization`` holds specs, methods and mode."""

    def _output_channels(self) -> int:
        return int(self.filters)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        x = self._quantize_input(inputs)
        kernel = self.kernel
        if self._mode in ("quantize", "lsq"):
            kernel = (
                _through_float16(kernel)
                if self.kind == "fp16"
                else self._fake_quantize(kernel, "weight")
            )
        y = self.convolution_op(x, kernel)
        bias = self._bias()
        if bias is not None:
            if self.data_format == "channels_first":
                bias = tf.reshape(bias, (1, -1) + (1,) * (y.shape.rank - 2))
            y = y + bias
        return self._finish(y)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantDense(_QuantMixin, keras.layers.Dense):
    """A Dense whose input and kernel (per output channel) are fake-quantized; bias float.

    The kernel is quantized transposed, (out, in) along axis 0, so that the TFLite converter
    gets per-channel FULLY_CONNECTED weights (see the module docstring).
    """

    def _output_channels(self) -> int:
        return int(self.units)

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        x = self._quantize_input(inputs)
        kernel_t = tf.transpose(self.kernel)  # (out, in)
        if self._mode in ("quantize", "lsq"):
            if self.kind == "fp16":
                kernel_t = _through_float16(kernel_t)
            else:
                spec = self.weight_spec
                if isinstance(spec.granularity, PerChannel):
                    spec = replace(spec, granularity=PerChannel(0))
                kernel_t = self._fake_quantize(kernel_t, "weight", spec)
        if x.shape.rank == 2:
            y = tf.matmul(x, kernel_t, transpose_b=True)
        else:
            y = tf.tensordot(x, kernel_t, axes=[[x.shape.rank - 1], [1]])
        bias = self._bias()
        if bias is not None:
            y = y + bias
        return self._finish(y)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantActivation(keras.layers.Activation):
    """A softmax at the model output, put on TFLite's fixed int8 output grid (2^-bits, qmin)."""

    def __init__(self, activation: Any, *, quantization: dict[str, Any] | None = None, **kwargs):
        super().__init__(activation, **kwargs)
        config = dict(quantization or {})
        self.activation_spec = spec_from_config(config["activation_spec"])
        self._mode = config.get("mode", "float")
        self.kind = "int"
        self.calibrated = True
        self.provenance = dict(config.get("provenance", {}))

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        _check_keras_mode(mode)
        self._mode = mode

    def freeze(self) -> None:
        self._mode = "quantize"

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        y = self.activation(inputs)
        if self._mode in ("quantize", "lsq"):
            y = _softmax_grid(y, self.activation_spec)
        return y

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "quantization": {
                "activation_spec": spec_to_config(self.activation_spec),
                "mode": self._mode,
                "provenance": self.provenance,
            },
        }


_QUANT_TYPES = (QuantConv2D, QuantDense, QuantActivation)


# -- model-level API -------------------------------------------------------------------------


def quant_layers(model: keras.Model) -> dict[str, Any]:
    """Every quantized layer (QuantConv2D, QuantDense, QuantActivation) by name, in order."""
    return {layer.name: layer for layer in model.layers if isinstance(layer, _QUANT_TYPES)}


def is_quantized(model: keras.Model) -> bool:
    """Whether `model` holds quantized layers."""
    return bool(quant_layers(model))


def model_info(model: keras.Model) -> dict[str, Any]:
    """How a quantized model was made: target, precision, method (from its layers' configs)."""
    for layer in quant_layers(model).values():
        if layer.provenance:
            return dict(layer.provenance)
    return {}


def quantize_model(
    model: keras.Model,
    target: Target | str,
    precision: Precision | str,
    method: str = "ptq-minmax",
    *,
    quantize_outputs: bool | None = None,
    qat_init: str | None = None,
) -> keras.Model:
    """A clone of `model` with every Conv2D/Dense fake-quantized under `target`, weights copied.

    precision: wXaY (fake-quant; run `calibrate` next) or fp16 (cast through float16; ready to
    use). method: a `METHOD_OBSERVERS` key (a bare observer name means ``ptq-<name>``; ``none``
    only with fp16). quantize_outputs: quantize the terminal layers' outputs and an output
    softmax as an integer runtime does (default: for litert targets; see the module docstring).
    qat_init: where a QAT method's calibration starts (`QAT_INITS`; None: MSE).
    SciquantError for combinations the target cannot run (`Target.plan`).
    """
    target = get_target(target) if isinstance(target, str) else target
    parsed = parse_precision(precision) if isinstance(precision, str) else precision
    if not isinstance(parsed, Precision):
        raise SciquantError(f"precision must be a Precision or a string, got {precision!r}")
    target.plan(str(parsed), "keras")  # impossible combinations raise here
    if parsed.kind == "float" and parsed.weight_bits == 32:
        raise SciquantError(
            "precision fp32 is the float model itself; quantize_model takes wXaY or fp16"
        )
    method = check_method(method, parsed)
    if parsed.kind == "int":
        check_method_limits(method, target.name, "keras")
    if is_quantized(model):
        raise SciquantError("the model is already quantized; quantize its float original")
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs") or not model.inputs:
        raise SciquantError(
            "quantize_model needs a built functional or Sequential Keras model (subclassed "
            "models cannot be cloned layer by layer)"
        )
    if quantize_outputs is None:
        quantize_outputs = target.backend == "litert"
    terminal, softmax_outputs = _output_layers(model) if quantize_outputs else (set(), set())
    provenance = {"target": target.name, "precision": str(parsed), "method": method}
    if parsed.kind == "float":
        base = {"kind": "fp16", "provenance": provenance}
    else:
        activation_method, weight_method = method_observers(method, qat_init)
        base = {
            "kind": "int",
            "weight_spec": spec_to_config(target.weight_spec(parsed.weight_bits, channel_axis=-1)),
            "activation_spec": spec_to_config(target.activation_spec(parsed.activation_bits)),
            "activation_method": activation_method,
            "weight_method": weight_method,
            "provenance": provenance,
        }

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if type(layer) in (keras.layers.Conv2D, keras.layers.Dense):
            quantization = {**base, "quantize_output": layer.name in terminal}
            cls = QuantConv2D if isinstance(layer, keras.layers.Conv2D) else QuantDense
            return cls.from_config({**config, "quantization": quantization})
        if layer.name in softmax_outputs and parsed.kind == "int":
            config.pop("activation", None)
            return QuantActivation(
                "softmax",
                quantization={"activation_spec": base["activation_spec"], "provenance": provenance},
                **config,
            )
        return layer.__class__.from_config(config)

    try:
        quantized = keras.models.clone_model(model, clone_function=clone)
    except SciquantError:
        raise
    except Exception as error:
        raise SciquantError(
            f"cannot clone the model layer by layer ({type(error).__name__}: {error}); "
            "quantize_model takes functional or Sequential models"
        ) from error
    originals = {layer.name: layer for layer in model.layers}
    for layer in quantized.layers:
        original = originals.get(layer.name)
        if original is None:
            continue
        if isinstance(layer, QuantConv2D | QuantDense):
            layer.kernel.assign(original.kernel)
            if layer.use_bias:
                layer.bias.assign(original.bias)
        elif original.weights:
            layer.set_weights(original.get_weights())
    if not any(isinstance(layer, QuantConv2D | QuantDense) for layer in quantized.layers):
        raise SciquantError("the model has no Conv2D or Dense layer to quantize")
    return quantized


def _output_layers(model: keras.Model) -> tuple[set[str], set[str]]:
    """(terminal Conv2D/Dense names, softmax Activation layers at the outputs) of a model."""
    terminal: set[str] = set()
    softmax: set[str] = set()
    seen: set[int] = set()
    stack = [(tensor, True) for tensor in model.outputs]
    while stack:
        tensor, at_output = stack.pop()
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        layer, node_index = history[0], history[1]
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if type(layer) in (keras.layers.Conv2D, keras.layers.Dense):
            terminal.add(layer.name)
            continue
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if (
            at_output
            and isinstance(layer, keras.layers.Activation)
            and keras.activations.serialize(layer.activation) == "softmax"
        ):
            softmax.add(layer.name)
        node = layer._inbound_nodes[node_index]
        stack.extend((parent, False) for parent in node.input_tensors)
    return terminal, softmax


def set_mode(qmodel: keras.Model, mode: str) -> keras.Model:
    """Put every quantized layer into `mode` (one of `MODES`)."""
    for layer in quant_layers(qmodel).values():
        layer.set_mode(mode)
    _reset_compiled(qmodel)
    return qmodel


def enable_lsq(qmodel: keras.Model) -> keras.Model:
    """LSQ mode: the calibrated scales (and asymmetric zero points) become learnable."""
    for layer in quant_layers(qmodel).values():
        if isinstance(layer, QuantConv2D | QuantDense):
            layer.set_mode("lsq")
    _reset_compiled(qmodel)
    return qmodel


def disable_lsq(qmodel: keras.Model) -> keras.Model:
    """Freeze the learned qparams (|s| clamped, zero points rounded): quantize mode."""
    return set_mode(qmodel, "quantize")


def lsq_variables(qmodel: keras.Model) -> list[Any]:
    """The qparam variables LSQ trains (scales; zero points of asymmetric specs)."""
    variables = []
    for layer in quant_layers(qmodel).values():
        if not isinstance(layer, QuantConv2D | QuantDense) or layer.mode != "lsq":
            continue
        for which in layer._quantizers():
            variables.append(getattr(layer, f"{which}_scale"))
            if not layer._spec(which).symmetric:
                variables.append(getattr(layer, f"{which}_zero_point"))
    return variables


def calibrate(
    qmodel: keras.Model, batches: Iterable[np.ndarray], method: str | None = None
) -> keras.Model:
    """Observe every batch (float forward, eager, inference mode), then freeze the qparams.

    batches: model inputs (N, ...) float32. method: overrides the observers chosen at
    `quantize_model` (same names). Afterwards every quantized layer is in quantize mode.
    """
    layers = quant_layers(qmodel)
    if method is not None:
        activation_method, weight_method = METHOD_OBSERVERS[check_method(method, None)]
        for layer in layers.values():
            if isinstance(layer, QuantConv2D | QuantDense):
                layer.activation_method, layer.weight_method = activation_method, weight_method
    integer = [
        layer
        for layer in layers.values()
        if isinstance(layer, QuantConv2D | QuantDense) and layer.kind == "int"
    ]
    for layer in integer:
        layer.set_mode("observe")
    count = 0
    for batch in batches:
        qmodel(tf.convert_to_tensor(np.asarray(batch, dtype=np.float32)), training=False)
        count += 1
    if count == 0:
        raise SciquantError("calibration got no batches; pass at least one batch of inputs")
    for layer in layers.values():
        try:
            layer.freeze()
        except SciquantError as error:
            raise SciquantError(f"layer {layer.name!r}: {error}") from None
    _reset_compiled(qmodel)
    return qmodel


def qat_ste(
    qmodel: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 2,
    learning_rate: float = 1e-5,
    batch_size: int = 128,
    seed: int = 0,
) -> list[dict[str, float]]:
    """QAT with fixed (calibrated) ranges: the weights learn through the straight-through
    estimator of the fake-quant ops. x: (N, ...) inputs, y: (N,) int labels. Returns the
    per-epoch mean losses."""
    set_mode(qmodel, "quantize")
    return _fine_tune(qmodel, x, y, epochs, learning_rate, batch_size, seed)


def qat_lsq(
    qmodel: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 2,
    learning_rate: float = 1e-5,
    batch_size: int = 128,
    seed: int = 0,
) -> list[dict[str, float]]:
    """QAT with learnable step sizes (LSQ): weights and scales (and asymmetric zero points)
    train together; afterwards the learned qparams are frozen (quantize mode)."""
    enable_lsq(qmodel)
    try:
        return _fine_tune(qmodel, x, y, epochs, learning_rate, batch_size, seed)
    finally:
        disable_lsq(qmodel)


def _fine_tune(
    qmodel: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> list[dict[str, float]]:
    """RMSprop (ICNNMD's optimizer) on sparse categorical cross-entropy; seeded shuffling."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if len(x) == 0 or len(x) != len(y):
        raise SciquantError(f"QAT needs matching inputs and labels, got {len(x)} and {len(y)}")
    if epochs < 0 or batch_size < 1:
        raise SciquantError(
            f"QAT needs epochs >= 0 and batch_size >= 1 (got {epochs}, {batch_size})"
        )
    weights = list(qmodel.trainable_variables)
    qparams = lsq_variables(qmodel)
    variables = weights + qparams
    optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate)
    optimizer.build(variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def step(batch_x: tf.Tensor, batch_y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch([variable.value for variable in qparams])
            loss = loss_fn(batch_y, qmodel(batch_x, training=True))
        gradients = tape.gradient(loss, [variable.value for variable in variables])
        optimizer.apply(gradients, variables)
        return loss

    history = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        losses = []
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            losses.append(float(step(tf.constant(x[index]), tf.constant(y[index]))))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
    _reset_compiled(qmodel)
    return history


def layer_summary(qmodel: keras.Model) -> dict[str, dict[str, Any]]:
    """Per quantized layer: specs, and the scales / zero points in effect (channels summarized)."""
    summary: dict[str, dict[str, Any]] = {}
    for name, layer in quant_layers(qmodel).items():
        if isinstance(layer, QuantActivation):
            spec = layer.activation_spec
            summary[name] = {
                "type": "softmax_output",
                "output": {"scale": 2.0**-spec.bits, "zero_point": spec.qmin},
            }
            continue
        entry: dict[str, Any] = {
            "type": type(layer).__name__,
            "kind": layer.kind,
            "mode": layer.mode,
        }
        if layer.kind == "int":
            entry["weight_spec"] = spec_to_config(layer.weight_spec)
            entry["activation_spec"] = spec_to_config(layer.activation_spec)
            entry["observers"] = {
                "activation": layer.activation_method,
                "weight": layer.weight_method,
            }
            for which in layer._quantizers():
                scale, zero_point = layer.qparams(which)
                if scale.ndim == 0:
                    lo, hi = tf_min_max(scale, zero_point, layer._spec(which))
                    entry[which] = {
                        "scale": float(scale),
                        "zero_point": int(zero_point),
                        "range": [float(lo), float(hi)],
                    }
                else:
                    entry[which] = {
                        "channels": int(scale.size),
                        "scale_min": float(scale.min()),
                        "scale_median": float(np.median(scale)),
                        "scale_max": float(scale.max()),
                        "zero_point_unique": sorted({int(z) for z in zero_point.ravel()})[:8],
                    }
        summary[name] = entry
    return summary


def iterate_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """x in consecutive batches of `batch_size` (the last one may be smaller)."""
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


def _check_keras_mode(mode: str) -> None:
    """SciquantError for modes a Keras quantized layer does not have (`MODES` but tqt)."""
    if mode == "tqt":
        raise SciquantError(
            "mode 'tqt' (method qat-tqt, trained power-of-two thresholds) exists for PyTorch "
            "models only; Keras models on npu-pow2 take ptq-* or qat-ste"
        )
    if mode not in MODES:
        raise SciquantError(f"unknown quantized-layer mode {mode!r}; known: {', '.join(MODES)}")


def check_method(method: str, precision: Precision | None) -> str:
    """The canonical method name for `precision` (``minmax`` → ``ptq-minmax``); SciquantError
    for unknown methods and for ``none`` with an integer precision."""
    if precision is not None and precision.kind == "float":
        if method in FLOAT_METHODS or method in METHOD_OBSERVERS or method in OBSERVERS:
            return method
        raise SciquantError(
            f"unknown quantization method {method!r}; fp16 takes `none` (or any of "
            f"{', '.join(METHOD_OBSERVERS)}, which do nothing for a cast)"
        )
    name = f"ptq-{method}" if method in OBSERVERS else method
    if name in FLOAT_METHODS:
        raise SciquantError(
            f"method {method!r} (no ranges, a plain cast) goes with fp16 only; integer "
            f"precisions take one of {', '.join(METHOD_OBSERVERS)}"
        )
    if name not in METHOD_OBSERVERS:
        raise SciquantError(
            f"unknown quantization method {method!r}; known: {', '.join(METHOD_OBSERVERS)}"
        )
    return name


def _reset_compiled(model: keras.Model) -> None:
    """Drop Keras's traced train/test/predict functions: a mode change must retrace them."""
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
