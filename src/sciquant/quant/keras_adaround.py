"""AdaRound and empirical bias correction for fake-quantized Keras models (TensorFlow).

The Keras counterpart of `sciquant.quant.adaround` (read its docstring for the method): after
`sciquant.quant.keras.calibrate`, layer by layer in the model's order, each `QuantConv2D` /
`QuantDense` is fitted on the inputs it sees in the model quantized so far (x̂, through its own
input fake-quantizer) against the untouched float model's layer on the float model's inputs:

    qmodel = quantize_model(model, "litert-cpu", "w8a8", "ptq-adaround")
    batches = list(iterate_batches(x_calibration, 128))
    calibrate(qmodel, batches)
    adaround_keras(qmodel, model, batches, AdaRoundSettings())   # or correct_bias_keras(...)

Rows: a Dense layer's rows are its input vectors; a Conv2D's are its output pixels, each the
patch of input under the kernel (im2col with ``tf.image.extract_patches``, the layer's strides,
dilation and padding; the patch's (row, column, channel) order is the kernel's reshaped to
[kh·kw·in, out]), so both layers reconstruct ``rows @ W + b`` with W [in, out] and the kernel's
per-output-channel scale on the last axis, as in Keras. A layer's inputs are captured with a
``keras.Model(model.inputs, layer.input)`` sub-model of each model (functional or Sequential).

AdaRound writes the hard rounding into the kernel as the dequantized grid value s·(q − z); the
layer's fake-quant then returns that value (it is on its own grid), so ``simulation.keras``, the
``.keras`` artifact and the TFLite conversion (which quantizes the kernel with the layer's
calibrated per-channel scales) all carry the chosen integers. Bias correction adds to each bias
the mean over rows of (float output − quantized output). Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sciquant.errors import SciquantError
from sciquant.quant.keras import QuantConv2D, QuantDense, quant_layers
from sciquant.quant.rounding import (
    GAMMA,
    ZETA,
    AdaRoundSettings,
    keeps_nearest,
    layer_report,
    layer_summary,
)
from sciquant.quant.spec import PerChannel

__all__ = ["AdaRoundSettings", "adaround_keras", "correct_bias_keras", "rectified_sigmoid"]


def rectified_sigmoid(v: tf.Tensor) -> tf.Tensor:
    """h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)."""
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = rest (rest in [0, 1))."""
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)


# -- layers, rows and grids ------------------------------------------------------------------


def _layers(qmodel: keras.Model, float_model: keras.Model, what: str) -> dict[str, Any]:
    """The integer QuantConv2D / QuantDense layers in order, checked against the float model."""
    layers = {
        name: layer
        for name, layer in quant_layers(qmodel).items()
        if isinstance(layer, QuantConv2D | QuantDense) and layer.kind == "int"
    }
    if not layers:
        raise SciquantError(f"{what}: the model has no integer-quantized Conv2D or Dense layer")
    originals = {layer.name: layer for layer in float_model.layers}
    for name, layer in layers.items():
        if layer.mode != "quantize":
            raise SciquantError(
                f"{what}: layer {name!r} is in mode {layer.mode!r}; calibrate the model first "
                "(every quantized layer in quantize mode)"
            )
        original = originals.get(name)
        if original is None:
            raise SciquantError(
                f"{what}: the float model has no layer {name!r}; pass the float model the "
                "quantized one was made from"
            )
        if (
            not isinstance(original, keras.layers.Conv2D | keras.layers.Dense)
            or isinstance(original, QuantConv2D | QuantDense)
            or tuple(original.kernel.shape) != tuple(layer.kernel.shape)
        ):
            raise SciquantError(f"{what}: layer {name!r} differs in the float model")
        if isinstance(layer, QuantConv2D) and layer.data_format != "channels_last":
            raise SciquantError(f"{what}: layer {name!r} is channels_first; only channels_last")
    return layers


def _capture(model: keras.Model, name: str) -> keras.Model:
    """A sub-model from the model's inputs to what layer `name` receives."""
    try:
        return keras.Model(model.inputs, model.get_layer(name).input)
    except Exception as error:  # a layer called more than once has no single input
        raise SciquantError(
            f"cannot capture the input of layer {name!r} ({type(error).__name__}: {error}); "
            "layer-wise reconstruction needs a functional or Sequential model calling each "
            "quantized layer once"
        ) from error


def _rows(layer: Any, x: tf.Tensor) -> tf.Tensor:
    """The layer's input as rows [n, in] of its GEMM (Conv2D: im2col patches)."""
    if isinstance(layer, QuantConv2D):
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        patches = tf.image.extract_patches(
            x,
            sizes=[1, kh, kw, 1],
            strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1],
            padding=layer.padding.upper(),
        )
        return tf.reshape(patches, (-1, patches.shape[-1]))
    return tf.reshape(x, (-1, x.shape[-1]))


def _matrix(layer: Any, kernel: Any) -> tf.Tensor:
    """A kernel as the GEMM matrix [in, out] (Conv2D: [kh·kw·in, out])."""
    kernel = tf.convert_to_tensor(kernel)
    return tf.reshape(kernel, (-1, kernel.shape[-1]))


def _pairs(
    layer: Any, qmodel: keras.Model, float_model: keras.Model, batches: Sequence[Any],
    max_rows: int, seed: int,
) -> tuple[tf.Tensor, tf.Tensor]:  # fmt: skip
    """(x_fp rows, q(x̂) rows): the layer's input rows in the float model and, through the
    layer's input fake-quantizer, in the quantized model; the same rows of both (at most
    max_rows in all, an even share of each batch, drawn with `seed`)."""
    float_input = _capture(float_model, layer.name)
    quant_input = _capture(qmodel, layer.name)
    per_batch = max(1, math.ceil(max_rows / len(batches)))
    x_float, x_quant = [], []
    for index, batch in enumerate(batches):
        batch = tf.convert_to_tensor(np.asarray(batch, dtype=np.float32))
        rows_f = _rows(layer, float_input(batch, training=False))
        captured = quant_input(batch, training=False)
        # the input fake-quantizer is per tensor and elementwise, and 0 (conv padding) is on its
        # grid, so quantizing before taking patches is the layer's own order
        rows_q = _rows(layer, layer._fake_quantize(captured, "input"))
        count = int(rows_f.shape[0])
        rng = np.random.default_rng([seed, index])
        chosen = rng.permutation(count)[: min(count, per_batch)]
        x_float.append(tf.gather(rows_f, chosen))
        x_quant.append(tf.gather(rows_q, chosen))
    return tf.concat(x_float, 0), tf.concat(x_quant, 0)


def _grid(layer: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(scale, zero point) broadcasting over the kernel's last axis, qmin, qmax."""
    scale, zero_point = layer.qparams("weight")
    spec = layer.weight_spec
    return scale.astype(np.float32), zero_point.astype(np.float32), spec.qmin, spec.qmax


def _rounded(kernel: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int,
             qmax: int, h: np.ndarray) -> np.ndarray:  # fmt: skip
    """s · (clamp(⌊W/s⌋ + h + z, qmin, qmax) − z): the kernel rounded by h ∈ [0, 1]."""
    floor = np.floor(kernel / scale)
    return (scale * (np.clip(floor + h + zero_point, qmin, qmax) - zero_point)).astype(np.float32)


def _quantized_kernel(layer: Any) -> tf.Tensor:
    """The kernel as the layer's forward fake-quantizes it (QuantDense: transposed, axis 0)."""
    if isinstance(layer, QuantDense):
        spec = layer.weight_spec
        if isinstance(spec.granularity, PerChannel):
            spec = replace(spec, granularity=PerChannel(0))
        return tf.transpose(layer._fake_quantize(tf.transpose(layer.kernel), "weight", spec))
    return layer._fake_quantize(tf.convert_to_tensor(layer.kernel), "weight")


def _bias(layer: Any) -> tf.Tensor | float:
    return tf.convert_to_tensor(layer.bias) if layer.use_bias else 0.0


# -- AdaRound --------------------------------------------------------------------------------


def adaround_keras(
    qmodel: keras.Model,
    float_model: keras.Model,
    batches: Sequence[Any],
    settings: Any = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, dict[str, float]]:
    """Round every integer Conv2D/Dense kernel of the calibrated `qmodel` adaptively, in place.

    batches: model inputs (N, ...) float32, e.g. the calibration batches. settings: an
    `sciquant.quant.rounding.AdaRoundSettings`. Returns per layer, as the
    torch version: ``mse_nearest``, ``mse_adaround`` (reconstruction MSE on the rows it
    optimised), ``flipped`` (share of weights rounded the other way than nearest) and
    ``kept_nearest`` (1.0 where AdaRound ended worse and the layer keeps nearest rounding).
    """
    settings = settings or AdaRoundSettings()
    batches = list(batches)
    if not batches:
        raise SciquantError("adaround got no calibration batches")
    layers = _layers(qmodel, float_model, "adaround")
    originals = {layer.name: layer for layer in float_model.layers}
    summary: dict[str, dict[str, float]] = {}
    for index, (name, layer) in enumerate(layers.items()):
        x_float, x_quant = _pairs(
            layer, qmodel, float_model, batches, settings.max_rows, settings.seed + index
        )
        summary[name] = _round_layer(layer, originals[name], x_float, x_quant, settings)
        if progress is not None:
            progress(layer_report(index, len(layers), name, summary[name]))
    _reset_compiled(qmodel)
    return summary


def _round_layer(
    layer: Any, original: Any, x_float: tf.Tensor, x_quant: tf.Tensor, settings: Any
) -> dict[str, float]:
    kernel = np.asarray(layer.kernel.numpy(), dtype=np.float32)
    scale, zero_point, qmin, qmax = _grid(layer)
    target = tf.matmul(x_float, _matrix(original, original.kernel)) + _bias(original)
    bias = _bias(layer)
    floor = np.floor(kernel / scale)
    rest = kernel / scale - floor
    nearest = (rest >= 0.5).astype(np.float32)
    out_channels = kernel.shape[-1]
    shifted = tf.constant(np.reshape(floor + zero_point, (-1, out_channels)), tf.float32)
    scale_t = tf.constant(np.broadcast_to(scale, (out_channels,)), tf.float32)
    zero_t = tf.constant(np.broadcast_to(zero_point, (out_channels,)), tf.float32)
    v = tf.Variable(np.reshape(_initial_v(rest), (-1, out_channels)))
    m = tf.Variable(tf.zeros_like(v))
    second = tf.Variable(tf.zeros_like(v))
    lr = settings.learning_rate
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults

    @tf.function
    def step(chosen: tf.Tensor, reg: tf.Tensor, beta: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            h = rectified_sigmoid(v)
            w_soft = scale_t * (tf.clip_by_value(shifted + h, qmin, qmax) - zero_t)
            out = tf.matmul(tf.gather(x_quant, chosen), w_soft) + bias
            loss = tf.reduce_mean(
                tf.reduce_sum(tf.square(out - tf.gather(target, chosen)), axis=-1)
            )
            loss = loss + reg * tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))
        gradient = tape.gradient(loss, v)
        m.assign(beta1 * m + (1 - beta1) * gradient)
        second.assign(beta2 * second + (1 - beta2) * tf.square(gradient))
        m_hat = m / (1 - tf.pow(beta1, t))
        v_hat = second / (1 - tf.pow(beta2, t))
        v.assign_sub(lr * m_hat / (tf.sqrt(v_hat) + eps))
        return loss

    rng = np.random.default_rng(settings.seed)
    rows = int(x_quant.shape[0])
    warm = int(settings.warmup * settings.iterations)
    for iteration in range(settings.iterations):
        chosen = rng.integers(rows, size=min(settings.batch_rows, rows))
        reg, beta = 0.0, 1.0
        if iteration >= warm:
            progress = (iteration - warm) / max(1, settings.iterations - warm)
            beta = settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (
                1 + math.cos(math.pi * progress)
            )
            reg = settings.reg_lambda
        step(
            tf.constant(chosen, tf.int32),
            tf.constant(reg, tf.float32),
            tf.constant(beta, tf.float32),
            tf.constant(iteration + 1, tf.float32),
        )
    hard = np.reshape((v.numpy() >= 0).astype(np.float32), kernel.shape)
    rounded = _rounded(kernel, scale, zero_point, qmin, qmax, hard)
    before = _rounded(kernel, scale, zero_point, qmin, qmax, nearest)

    def mse(weights: np.ndarray) -> float:
        out = tf.matmul(x_quant, _matrix(layer, weights)) + bias
        return float(tf.reduce_mean(tf.square(out - target)))

    mse_nearest, mse_adaround = mse(before), mse(rounded)
    kept_nearest = keeps_nearest(mse_nearest, mse_adaround)
    if kept_nearest:
        hard, rounded, mse_adaround = nearest, before, mse_nearest
    layer.kernel.assign(rounded)
    return layer_summary(mse_nearest, mse_adaround, float(np.mean(hard != nearest)), kept_nearest)


# -- bias correction -------------------------------------------------------------------------


def correct_bias_keras(
    qmodel: keras.Model,
    float_model: keras.Model,
    batches: Sequence[Any],
    max_rows: int = 65536,
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """Empirical bias correction of every integer Conv2D/Dense with a bias, in place, in order:
    bias += mean over rows of (x_fp W + b_fp) − (q(x̂) W_q + b). Returns per layer the RMS of
    the correction."""
    batches = list(batches)
    if not batches:
        raise SciquantError("bias correction got no calibration batches")
    layers = _layers(qmodel, float_model, "bias correction")
    originals = {layer.name: layer for layer in float_model.layers}
    summary: dict[str, float] = {}
    for index, (name, layer) in enumerate(layers.items()):
        if not layer.use_bias:
            continue
        original = originals[name]
        x_float, x_quant = _pairs(layer, qmodel, float_model, batches, max_rows, seed + index)
        expected = tf.matmul(x_float, _matrix(original, original.kernel)) + _bias(original)
        got = tf.matmul(x_quant, _matrix(layer, _quantized_kernel(layer))) + _bias(layer)
        shift = tf.reduce_mean(expected - got, axis=0)
        layer.bias.assign(layer.bias + shift)
        summary[name] = float(tf.sqrt(tf.reduce_mean(tf.square(shift))))
        if progress is not None:
            progress(
                f"bias correction {index + 1}/{len(layers)} {name}: RMS shift {summary[name]:.3g}"
            )
    _reset_compiled(qmodel)
    return summary


def _reset_compiled(model: keras.Model) -> None:
    """Drop Keras's traced functions: the kernels and biases changed."""
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
