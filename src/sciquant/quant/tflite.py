"""Keras model → TFLite flatbuffer: FP32, FP16, or full-integer INT8 (w8a8).

    convert(model, Path("model.tflite"), "w8a8", representative=x_calibration)

Path: the Keras 3 model is exported as a SavedModel (``model.export(..., format=
"tf_saved_model")``, a serving function with a dynamic batch dimension) and converted with
``tf.lite.TFLiteConverter.from_saved_model``. (``from_keras_model`` does the same export
internally in TF 2.21, printing every endpoint; ``from_concrete_functions`` does not see the
FakeQuant ops of a Keras 3 model as "quantization-aware trained" and leaves them as unsupported
TF ops.)

- fp32: no optimization.
- fp16: ``optimizations=[DEFAULT]``, ``target_spec.supported_types=[tf.float16]``: float16
  weights, dequantized to float32 by the runtime on CPUs without FP16 arithmetic.
- dynamic: ``optimizations=[DEFAULT]`` alone (TFLite's dynamic-range quantization): int8
  weights per channel, activations float at the model's boundary and quantized on the fly per
  inference inside the kernels. Not a study precision (its activation ranges are nobody's
  choice, so it has no simulation); `sciquant bench cnn` times it beside full-integer INT8.
- w8a8: full integer, ``supported_ops=[TFLITE_BUILTINS_INT8]``, int8 input and int8 output (the
  runner quantizes pixels with the input tensor's (scale, zero_point) and dequantizes the output;
  this keeps the graph free of float ops and puts quantize/dequantize in the h2d/d2h parts of
  the timing, as for a GPU engine). Two cases:
    * a fake-quantized model (`sciquant.quant.keras`, calibrated, quantize mode, 8-bit, with the
      output quantizers of a litert target): the converter treats its FakeQuantWithMinMaxVars /
      QuantizeAndDequantizeV3 ops as quantization-aware training and ADOPTS THEIR RANGES: every
      int8 tensor carries our calibrated (scale, zero_point) and every kernel our per-channel
      scales (checked: `tensor_quantization` reads them back). The converter still insists on
      a representative dataset for INT8-only conversion; its values do not change any scale
      (checked with data 10× out of range), so any inputs of the right shape do.
    * a float model: post-training quantization; TFLite calibrates every activation itself
      with min/max over the representative dataset (asymmetric int8), weights symmetric per
      channel. Its scales can be read back with `tensor_quantization`.
Files are written atomically (a `.part` file renamed into place).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sciquant.errors import SciquantError

__all__ = ["PRECISIONS", "convert", "tensor_quantization", "uses_fake_quant_ranges"]

PRECISIONS = ("fp32", "fp16", "w8a8", "dynamic")
_REPRESENTATIVE_FRAMES = 64


def convert(
    model: keras.Model,
    out: Path,
    precision: str,
    representative: np.ndarray | None = None,
) -> Path:
    """Convert `model` to a `.tflite` file at `out` (atomically); returns `out`.

    representative: model inputs (N, ...) float32; required for w8a8 of a float model (TFLite
    calibrates on them), optional for a fake-quantized one (its ranges are used; see above).
    """
    from sciquant.quant import keras as quant_keras

    out = Path(out)
    if precision not in PRECISIONS:
        raise SciquantError(
            f"TFLite precision {precision!r} is not supported; choose one of "
            f"{', '.join(PRECISIONS)}"
        )
    quantized = quant_keras.is_quantized(model)
    if quantized:
        _check_fake_quant_model(model, precision)
    if precision == "w8a8" and not quantized and representative is None:
        raise SciquantError(
            "INT8 conversion of a float model needs representative inputs (calibration frames)"
        )
    if representative is None and precision == "w8a8":
        representative = _inputs_in_range(model)
    with tempfile.TemporaryDirectory(prefix="sciquant-savedmodel-") as saved_model:
        try:
            model.export(saved_model, format="tf_saved_model", verbose=False)
        except Exception as error:
            raise SciquantError(
                f"cannot export the Keras model as a SavedModel for TFLite "
                f"({type(error).__name__}: {str(error)[:300]})"
            ) from error
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        if precision == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif precision == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif precision == "w8a8":
            frames = np.asarray(representative, dtype=np.float32)
            if frames.ndim != len(model.inputs[0].shape) or len(frames) == 0:
                raise SciquantError(
                    f"representative inputs have shape {frames.shape}; the model takes "
                    f"{tuple(model.inputs[0].shape)}"
                )
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: _one_by_one(frames)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        try:
            flatbuffer = converter.convert()
        except Exception as error:
            first = str(error).strip().splitlines()[-1][:400] if str(error).strip() else ""
            raise SciquantError(
                f"TFLite conversion to {precision} failed ({type(error).__name__}: {first})"
            ) from error
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_bytes(flatbuffer)
    os.replace(part, out)
    if precision == "w8a8":
        _check_integer_io(out)
    return out


def _one_by_one(frames: np.ndarray) -> Iterator[list[np.ndarray]]:
    for frame in frames:
        yield [frame[None]]


def _inputs_in_range(model: keras.Model) -> np.ndarray:
    """Inputs spread over the first quantized layer's input range (only to satisfy the
    converter: a fake-quantized model's scales come from its own ranges)."""
    from sciquant.quant import keras as quant_keras

    lo, hi = 0.0, 1.0
    for layer in quant_keras.quant_layers(model).values():
        if isinstance(layer, quant_keras.QuantConv2D | quant_keras.QuantDense):
            scale, zero_point = layer.qparams("input")
            lo, hi = (
                float(v) for v in quant_keras.tf_min_max(scale, zero_point, layer.activation_spec)
            )
            break
    shape = (_REPRESENTATIVE_FRAMES, *tuple(model.inputs[0].shape[1:]))
    return np.random.default_rng(0).uniform(lo, hi, size=shape).astype(np.float32)


def _check_fake_quant_model(model: keras.Model, precision: str) -> None:
    from sciquant.quant import keras as quant_keras

    layers = [
        layer
        for layer in quant_keras.quant_layers(model).values()
        if isinstance(layer, quant_keras.QuantConv2D | quant_keras.QuantDense)
    ]
    if precision != "w8a8":
        raise SciquantError(
            f"a fake-quantized model converts to w8a8 only, not {precision}; convert the float "
            "model for fp32 / fp16"
        )
    for layer in layers:
        if layer.kind != "int" or layer.mode != "quantize":
            raise SciquantError(
                f"layer {layer.name!r} is in mode {layer.mode!r} ({layer.kind}); calibrate the "
                "model (and end QAT) so that every layer is in quantize mode before conversion"
            )
        bits = (layer.weight_spec.bits, layer.activation_spec.bits)
        if bits != (8, 8):
            raise SciquantError(
                f"layer {layer.name!r} is w{bits[0]}a{bits[1]}; TFLite full-integer kernels "
                "are int8 (w8a8) only, lower bit-widths run as Keras simulation"
            )
        if layer.weight_spec.scale_kind == "pow2" or layer.activation_spec.scale_kind == "pow2":
            raise SciquantError(
                f"layer {layer.name!r} has power-of-two scales; not a TFLite target"
            )
    if not any(layer.quantize_output for layer in layers):
        raise SciquantError(
            "the fake-quantized model has no output quantizer, so TFLite cannot make its last "
            "layer integer; quantize it for a litert target (quantize_outputs=True)"
        )


def _check_integer_io(path: Path) -> None:
    details = tensor_quantization(path)
    float_tensors = [t["name"] for t in details["tensors"] if t["dtype"] in ("float32", "float16")]
    if float_tensors:
        raise SciquantError(
            f"{path}: INT8 conversion left float tensors ({', '.join(float_tensors[:5])}); "
            "the model has layers TFLite cannot run in int8"
        )


def tensor_quantization(path: Path) -> dict[str, Any]:
    """Read a .tflite file's tensors back: name, dtype, shape, scales and zero points.

    Returns {"inputs": [...], "outputs": [...], "tensors": [...]} where each tensor entry has
    "name", "dtype", "shape", "scale" and "zero_point" (per tensor) or "scales" summary
    (per channel, "channels", "axis").
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    entries = [_tensor_entry(detail) for detail in interpreter.get_tensor_details()]
    return {
        "inputs": [_tensor_entry(d) for d in interpreter.get_input_details()],
        "outputs": [_tensor_entry(d) for d in interpreter.get_output_details()],
        "tensors": entries,
    }


def _tensor_entry(detail: dict[str, Any]) -> dict[str, Any]:
    params = detail.get("quantization_parameters", {})
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    zero_points = np.asarray(params.get("zero_points", []), dtype=np.int64)
    entry: dict[str, Any] = {
        "name": detail["name"],
        "dtype": np.dtype(detail["dtype"]).name,
        "shape": [int(v) for v in detail["shape"]],
    }
    if scales.size == 1:
        entry["scale"] = float(scales[0])
        entry["zero_point"] = int(zero_points[0])
    elif scales.size > 1:
        entry["channels"] = int(scales.size)
        entry["axis"] = int(params.get("quantized_dimension", 0))
        entry["scales"] = scales.tolist()
    return entry


def uses_fake_quant_ranges(model: keras.Model, path: Path, rtol: float = 1e-6) -> bool:
    """Whether the .tflite file carries the fake-quantized model's activation quantization.

    True when the int8 input tensor has the first layer's input (scale, zero_point) and every
    input / output scale of the model's quantized layers is the scale of some int8 activation
    tensor of the file; with `convert` on a fake-quantized model this holds (TFLite adopts our
    ranges).
    """
    from sciquant.quant import keras as quant_keras

    details = tensor_quantization(path)
    layers = [
        layer
        for layer in quant_keras.quant_layers(model).values()
        if isinstance(layer, quant_keras.QuantConv2D | quant_keras.QuantDense)
        and layer.kind == "int"
    ]
    if not layers:
        return False
    first = details["inputs"][0]
    scale, zero_point = layers[0].qparams("input")
    # TFLite stores int8; an unsigned (uint8) spec's codes are 128 higher.
    offset = 0 if layers[0].activation_spec.signed else 128
    if "scale" not in first or first.get("zero_point") != int(zero_point) - offset:
        return False
    if abs(first["scale"] - float(scale)) > rtol * float(scale):
        return False
    theirs = np.array(
        [t["scale"] for t in details["tensors"] if "scale" in t and t["dtype"] == "int8"]
    )
    ours = [
        float(layer.qparams(which)[0])
        for layer in layers
        for which in ("input", "output")
        if which == "input" or layer.quantize_output
    ]
    return all(np.any(np.abs(theirs - value) <= rtol * value) for value in ours)
