"""Per-run quantization debugging: per-layer output SQNR, and simulation vs deployed runtime.

    sqnr = torch_layer_sqnr(qmodel, inputs)            # {"encoder.node.0": 38.2, ...} [dB]
    sqnr = keras_layer_sqnr(qmodel, batches)           # the same for a fake-quant Keras model
    metrics.update(sqnr_metrics(sqnr, len(inputs)))    # layer_sqnr_db, ..._worst, ...
    metrics.update(output_agreement(simulated, deployed, step=None))   # sim_vs_deployed_*

Per-layer output SQNR (as AIMET's QuantAnalyzer reports it)
-----------------------------------------------------------
For every quantized layer ℓ (a torch `QuantLinear`; a Keras `QuantConv2D`, `QuantDense` or
the output `QuantActivation`), the same inputs x_1..x_n are run through the model twice: with
every quantizer off (mode ``float``: the float model) and as the run quantizes it (its own modes,
``quantize``). ℓ's outputs y_fp32 and y_q (the layer's output tensor: the Linear's result in
torch; in Keras after the layer's activation and, where the layer quantizes it, its output
quantizer) give, summed over every element of every input in float64,

    SQNR_dB(ℓ) = 10 · log10( Σ y_fp32² / Σ (y_q − y_fp32)² )

Each pass runs the whole model, so y_q carries the errors of every quantized layer before ℓ: the
SQNR of a layer is what the network has lost up to and including it, and the first layer where it
drops is where to look. A layer whose quantized output equals the float one exactly (no noise)
has SQNR +∞ (`math.inf`); a silent layer (Σ y_fp32² = 0) with noise has −∞.

The float reference is the run's own network with its quantizers off. For post-training methods
those are the FP32 checkpoint's weights (the quantized model is a copy of them), so this is the
SQNR against the FP32 model. For QAT (qat-ste moves the weights, qat-lsq also the scales) it is
the fine-tuned weights in float: the SQNR then measures what the quantizers cost that network,
not how far fine-tuning moved it from the FP32 one (the rollout errors show that).

Simulation vs deployed runtime
------------------------------
A run that a real low-precision runtime executes (ONNX Runtime, OpenVINO, TensorRT, LiteRT) is
deployed from its fake-quant simulation's scales; `output_agreement` compares the two models'
outputs on the same inputs, elementwise over every output value d = |y_sim − y_deployed|:

- ``sim_vs_deployed_max_abs``, ``sim_vs_deployed_median_abs``: max and median of d, in the
  model output's own units;
- where the deployed output is quantized (LiteRT's full-integer int8 output, `step` = that
  tensor's scale): ``sim_vs_deployed_max_steps``, ``sim_vs_deployed_median_steps`` = d / step,
  in output quantization steps (the two agree when these are 0; one step is one code apart);
- where it is float (ONNX Runtime, OpenVINO, TensorRT): ``sim_vs_deployed_max_rel_rms``,
  ``sim_vs_deployed_median_rel_rms`` = d / RMS(y_sim), relative to the simulated output's root
  mean square over the same values;
- ``sim_vs_deployed_unit``: ``output_step`` or ``output_rms`` (which of the two pairs exists),
  ``sim_vs_deployed_unit_value`` its value (the step or the RMS, output units),
  ``sim_vs_deployed_outputs``: how many output values were compared.

Runs without a deployed runtime (simulations, the FP32 reference) have none of these keys.

JSON: metrics.json cannot hold ±∞. `sciquant.provenance.write_json` writes such a value as
``null`` and lists its JSON Pointer under the file's top-level ``non_finite`` with ``"inf"``
(e.g. ``"/metrics/layer_sqnr_db/decoder.layers.2": "inf"``), so an exact layer reads back as
+∞ (`sciquant.report.cube` does so) and never as "not measured".

TensorFlow is imported only inside the Keras functions: torch-only use never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sciquant.errors import SciquantError

__all__ = [
    "DEBUG_INPUTS",
    "SQNR_PREFIX",
    "AGREEMENT_PREFIX",
    "describe",
    "keras_layer_sqnr",
    "OVERFLOW_RISK",
    "output_agreement",
    "overflow_metrics",
    "rebuild_keras_simulation",
    "sqnr_db",
    "sqnr_metrics",
    "torch_layer_sqnr",
    "torch_outputs",
]

#: Calibration inputs the evaluate stages use for the per-layer SQNR by default (the config's
#: `evaluate.debug_inputs`): blood flow, the first calibration sample at this many evenly
#: spaced time steps; md, the first this many calibration frames.
DEBUG_INPUTS = 4
#: The metrics.json keys of this module start with these.
SQNR_PREFIX = "layer_sqnr_"
AGREEMENT_PREFIX = "sim_vs_deployed_"


#: 1 where the runtime's int8 GEMM may saturate on this CPU (OpenVINO INT8 with weights beyond
#: 7 bits on a CPU without VNNI, `sciquant.runtime.openvino.overflow_risk`): why its outputs
#: differ from the simulation's.
OVERFLOW_RISK = f"{AGREEMENT_PREFIX}overflow_risk"


def overflow_metrics(step: Any) -> dict[str, float]:
    """`OVERFLOW_RISK`: 1.0 for a runtime step that names an overflow risk, 0.0 for one that
    names none; nothing for a step that does not tell (another runtime, a simulation)."""
    if not hasattr(step, "overflow_risk"):
        return {}
    return {OVERFLOW_RISK: 1.0 if step.overflow_risk else 0.0}


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise) [dB]: +∞ for no noise, −∞ for noise on a zero signal."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _Energies:
    """Σ y_fp32² and Σ (y_q − y_fp32)² per layer, in float64."""

    def __init__(self, names: Iterable[str]) -> None:
        self.signal = dict.fromkeys(names, 0.0)
        self.noise = dict.fromkeys(self.signal, 0.0)

    def add(self, name: str, reference: np.ndarray, quantized: np.ndarray) -> None:
        reference = np.asarray(reference, dtype=np.float64)
        quantized = np.asarray(quantized, dtype=np.float64)
        if reference.shape != quantized.shape:
            raise SciquantError(
                f"layer {name!r}: float output {reference.shape} and quantized output "
                f"{quantized.shape} differ in shape"
            )
        self.signal[name] += float(np.sum(reference * reference))
        self.noise[name] += float(np.sum((quantized - reference) ** 2))

    def sqnr(self) -> dict[str, float]:
        return {name: sqnr_db(self.signal[name], self.noise[name]) for name in self.signal}


def sqnr_metrics(layer_sqnr: Mapping[str, float], inputs: int) -> dict[str, Any]:
    """The metrics.json keys of a per-layer SQNR table (layer → dB, in layer order):

    ``layer_sqnr_db`` (the table), ``layer_sqnr_db_worst`` (its lowest value),
    ``layer_sqnr_worst_layer`` (the first layer with that value), ``layer_sqnr_inputs`` (how
    many calibration inputs it was measured on). Empty for a model without quantized layers.
    """
    if not layer_sqnr:
        return {}
    table = {str(name): float(value) for name, value in layer_sqnr.items()}
    worst = min(table, key=lambda name: table[name])
    return {
        "layer_sqnr_db": table,
        "layer_sqnr_db_worst": table[worst],
        "layer_sqnr_worst_layer": worst,
        "layer_sqnr_inputs": int(inputs),
    }


def output_agreement(
    simulated: Any, deployed: Any, step: float | None = None, inputs: int | None = None
) -> dict[str, Any]:
    """The ``sim_vs_deployed_*`` keys for outputs of the simulation and of the deployed runtime
    on the same inputs (same shape; see the module docstring for the definitions).

    step: the deployed output's quantization step (its scale) where that output is quantized;
    None for a float output (differences relative to the simulated output's RMS). inputs: how
    many model inputs produced them (stored as ``sim_vs_deployed_inputs``).
    """
    sim = np.asarray(simulated, dtype=np.float64)
    dep = np.asarray(deployed, dtype=np.float64)
    if sim.shape != dep.shape:
        raise SciquantError(
            f"simulated outputs {sim.shape} and deployed outputs {dep.shape} differ in shape"
        )
    if sim.size == 0:
        raise SciquantError("no outputs to compare between the simulation and the runtime")
    difference = np.abs(sim - dep).ravel()
    largest, middle = float(difference.max()), float(np.median(difference))
    metrics: dict[str, Any] = {
        "sim_vs_deployed_max_abs": largest,
        "sim_vs_deployed_median_abs": middle,
    }
    if step is not None:
        if not step > 0:
            raise SciquantError(f"the output quantization step must be positive, got {step}")
        unit, value, suffix = "output_step", float(step), "steps"
    else:
        unit, value, suffix = "output_rms", float(np.sqrt(np.mean(sim * sim))), "rel_rms"
    metrics[f"sim_vs_deployed_max_{suffix}"] = _ratio(largest, value)
    metrics[f"sim_vs_deployed_median_{suffix}"] = _ratio(middle, value)
    metrics["sim_vs_deployed_unit"] = unit
    metrics["sim_vs_deployed_unit_value"] = value
    metrics["sim_vs_deployed_outputs"] = int(difference.size)
    if inputs is not None:
        metrics["sim_vs_deployed_inputs"] = int(inputs)
    return metrics


def describe(metrics: Mapping[str, Any]) -> str:
    """One line for a log: the worst layer's SQNR and the simulation's agreement, where given."""
    parts = []
    if "layer_sqnr_db_worst" in metrics:
        parts.append(
            f"worst layer {metrics['layer_sqnr_worst_layer']} at "
            f"{metrics['layer_sqnr_db_worst']:.1f} dB output SQNR "
            f"({metrics['layer_sqnr_inputs']} calibration inputs)"
        )
    for suffix, unit in (("steps", "output steps"), ("rel_rms", "x output RMS")):
        if f"sim_vs_deployed_max_{suffix}" in metrics:
            parts.append(
                f"simulation vs runtime: max {metrics[f'sim_vs_deployed_max_{suffix}']:.3g}, "
                f"median {metrics[f'sim_vs_deployed_median_{suffix}']:.3g} {unit}"
            )
    return "; ".join(parts)


def _ratio(value: float, unit: float) -> float:
    if unit > 0:
        return value / unit
    return 0.0 if value == 0 else math.inf


# -- PyTorch ----------------------------------------------------------------------------------


def torch_layer_sqnr(
    qmodel: Any,
    inputs: Iterable[Sequence[Any]],
    float_layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Per-layer output SQNR [dB] of a `sciquant.quant.pytorch.QuantizedModel` on `inputs`.

    inputs: tuples of the model's positional arguments (e.g. `sciquant.workloads.bloodflow.quantize.
    calibration_inputs`). Every input runs twice, all quantizers off and then in the layers' own
    modes; forward hooks on every `QuantLinear` take its output (each call, where a layer runs
    more than once per forward). The layers' modes and the model's train/eval state are
    restored afterwards. float_layers: {layer name: {"weight", "bias"}} of the FP32 model, for
    post-training methods that move weights (AdaRound, bias correction): the float pass then
    runs those, so the SQNR is against the FP32 model, not against the moved weights in float.
    Returns {layer name: SQNR} in module order; SciquantError for no inputs.
    """
    import torch

    layers = qmodel.quant_linears()
    swapped = {}
    for name, tensors in (float_layers or {}).items():
        if name not in layers:
            raise SciquantError(f"float weights for {name!r}, which is not a quantized layer")
        swapped[name] = {
            key: getattr(layers[name], key).detach().clone()
            for key in tensors
            if getattr(layers[name], key) is not None
        }
    modes = {name: layer.mode for name, layer in layers.items()}
    energies = _Energies(layers)
    captured: dict[str, list[Any]] = {}

    def hook(name: str) -> Callable[..., None]:
        def keep(module: Any, args: Any, output: Any) -> None:
            captured.setdefault(name, []).append(output.detach().float().cpu())

        return keep

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = qmodel.training
    qmodel.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in inputs:
                for layer in layers.values():
                    layer.set_mode("float")
                _load_tensors(layers, float_layers or {})
                captured.clear()
                qmodel(*batch)
                reference = dict(captured)
                _load_tensors(layers, swapped)
                for name, layer in layers.items():
                    layer.set_mode(modes[name])
                captured.clear()
                qmodel(*batch)
                for name in layers:
                    ours, theirs = reference.get(name, []), captured.get(name, [])
                    if len(ours) != len(theirs):
                        raise SciquantError(
                            f"layer {name!r} ran {len(ours)} times in float and {len(theirs)} "
                            "quantized on the same input"
                        )
                    for float_out, quant_out in zip(ours, theirs, strict=True):
                        energies.add(name, float_out.numpy(), quant_out.numpy())
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        _load_tensors(layers, swapped)
        for name, layer in layers.items():
            if layer.mode != modes[name]:
                layer.set_mode(modes[name])
        qmodel.train(was_training)
    if count == 0:
        raise SciquantError("the per-layer SQNR got no inputs; pass at least one input tuple")
    return energies.sqnr()


def _load_tensors(layers: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]]) -> None:
    """Copy {layer: {"weight": …, "bias": …}} into the layers' parameters, in place."""
    import torch

    with torch.no_grad():
        for name, values in tensors.items():
            for key, value in values.items():
                target = getattr(layers[name], key)
                if target is not None:
                    target.copy_(torch.as_tensor(value, dtype=target.dtype))


def torch_outputs(
    step: Callable[..., Any], inputs: Iterable[Sequence[Any]], device: str | None = None
) -> np.ndarray:
    """The outputs of a model or runtime step on every input tuple, stacked, float64 on the host.

    device: where the step takes its tensors (e.g. ``cuda`` for a TensorRT step that keeps its
    outputs on the GPU); the inputs are moved there and the outputs back.
    """
    import torch

    outputs = []
    with torch.no_grad():
        for batch in inputs:
            if device is not None:
                batch = tuple(tensor.to(device) for tensor in batch)
            output = step(*batch)
            outputs.append(np.asarray(output.detach().cpu().numpy(), dtype=np.float64))
    if not outputs:
        raise SciquantError("no inputs to run")
    return np.stack(outputs)


# -- Keras ------------------------------------------------------------------------------------


def keras_layer_sqnr(qmodel: Any, batches: Iterable[np.ndarray]) -> dict[str, float]:
    """Per-layer output SQNR [dB] of a fake-quantized Keras model (`sciquant.quant.keras`).

    batches: model inputs (N, ...) float32. A probe model returns every quantized layer's
    output; each batch runs through it eagerly with every quantizer off, then in the layers'
    own modes (restored afterwards). Layers must be used once in the graph (their ``output``).
    """
    import keras
    import tensorflow as tf

    from sciquant.quant import keras as quant_keras

    layers = quant_keras.quant_layers(qmodel)
    if not layers:
        return {}
    probe = keras.Model(qmodel.inputs, [layer.output for layer in layers.values()])
    modes = {name: layer.mode for name, layer in layers.items()}
    energies = _Energies(layers)
    count = 0
    try:
        for batch in batches:
            x = tf.convert_to_tensor(np.asarray(batch, dtype=np.float32))
            for layer in layers.values():
                layer.set_mode("float")
            reference = [_numpy(y) for y in _as_list(probe(x, training=False))]
            for name, layer in layers.items():
                layer.set_mode(modes[name])
            quantized = [_numpy(y) for y in _as_list(probe(x, training=False))]
            for name, ours, theirs in zip(layers, reference, quantized, strict=True):
                energies.add(name, ours, theirs)
            count += 1
    finally:
        for name, layer in layers.items():
            if layer.mode != modes[name]:
                layer.set_mode(modes[name])
    if count == 0:
        raise SciquantError("the per-layer SQNR got no inputs; pass at least one batch")
    return energies.sqnr()


def _as_list(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, list | tuple) else [outputs]


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)


def rebuild_keras_simulation(fp32_model: Any, summary: Mapping[str, Any]) -> Any:
    """The fake-quant Keras model a LiteRT INT8 file was converted from, rebuilt.

    The md quantize stage keeps only ``model.tflite`` for LiteRT runs, with its
    ``quantization.json`` (`summary`: target, precision, method and per layer the input/output
    scale and zero point in effect). The simulation is `sciquant.quant.keras.quantize_model` of
    the FP32 model with those activation qparams and the weight qparams its observer gives for
    the FP32 kernels, which is what calibration did for post-training methods. A QAT method
    (qat-ste moves the kernels, qat-lsq also the scales, and neither is kept beside the .tflite)
    is a SciquantError saying so: its recorded weight scales alone would not show it (under
    the clipped straight-through gradient the largest weight of a channel, which sets its scale,
    need not move while the others do). The weight scales the observer gives are checked against
    the recorded ones (min, median, max per layer) all the same.
    """
    from sciquant.quant import keras as quant_keras

    try:
        target, precision = summary["target"], summary["precision"]
        method, recorded = summary["method"], summary["layers"]
    except (KeyError, TypeError) as error:
        raise SciquantError(f"quantization.json lacks {error}; rerun the quantize stage") from None
    if str(method).startswith("qat-"):
        raise SciquantError(
            f"method {method} fine-tunes the weights (and qat-lsq the scales) after "
            "calibration, and the quantize stage keeps only the converted .tflite, so the "
            "simulation it was converted from cannot be rebuilt from the FP32 model"
        )
    qmodel = quant_keras.quantize_model(fp32_model, target, precision, method)
    for name, layer in quant_keras.quant_layers(qmodel).items():
        if not isinstance(layer, quant_keras.QuantConv2D | quant_keras.QuantDense):
            layer.set_mode("quantize")  # the output softmax: a fixed grid, nothing to set
            continue
        if layer.kind != "int":
            layer.set_mode("quantize")
            continue
        entry = recorded.get(name)
        if not isinstance(entry, dict):
            raise SciquantError(f"quantization.json has no qparams of layer {name!r}")
        for which in ("input", "output") if layer.quantize_output else ("input",):
            qparams = entry.get(which) or {}
            if "scale" not in qparams:
                raise SciquantError(f"quantization.json has no {which} scale of layer {name!r}")
            getattr(layer, f"{which}_scale").assign(np.float32(qparams["scale"]))
            getattr(layer, f"{which}_zero_point").assign(np.float32(qparams["zero_point"]))
        layer.observe_weight()
        _check_weight_scales(name, layer.qparams("weight")[0], entry.get("weight") or {}, method)
        layer.calibrated = True
        layer.set_mode("quantize")
    return qmodel


def _check_weight_scales(name: str, scale: np.ndarray, recorded: dict, method: str) -> None:
    if np.ndim(scale) == 0:
        ours = {"scale": float(scale)}
    else:
        ours = {
            "scale_min": float(np.min(scale)),
            "scale_median": float(np.median(scale)),
            "scale_max": float(np.max(scale)),
        }
    for key, value in ours.items():
        theirs = recorded.get(key)
        if theirs is None or not math.isclose(value, float(theirs), rel_tol=1e-6):
            raise SciquantError(
                f"layer {name!r}: the FP32 kernel's weight {key} {value:.6g} is not the recorded "
                f"{theirs!r}: the deployed weights are not the FP32 ones (method {method}: "
                "fine-tuned weights are not kept beside a .tflite), so its simulation cannot be "
                "rebuilt"
            )
