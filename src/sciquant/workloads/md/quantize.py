"""The quantize stage for the md workload: PTQ / QAT of the trained ICNNMD classifier.

    run(Path(".../fp32/model.keras"), Path(".../prepared"), Path(".../litert-cpu/ptq-minmax/w8a8"),
        target="litert-cpu", method="ptq-minmax", precision="w8a8")

`Target.plan(precision, "keras")` decides the artifact:

- simulated (an integer precision the target does not run natively: any sub-8-bit precision,
  w8a8 on `reference` and `npu-pow2`), or native with runtime ``keras`` (fp32 on `reference`):
  ``model.keras``, the fake-quantized (or FP32) Keras model (`sciquant.quant.keras`; loads with
  `sciquant.runtime.keras.load_keras_model`).
- native on ``litert-cpu``: ``model.tflite``: fp32 and fp16 converted from the FP32 model, w8a8
  converted from the calibrated (and QAT-trained) fake-quant model, so the INT8 file (int8 input
  and output) carries our scales (`sciquant.quant.tflite`).
- native on TensorRT targets and ``cpu-x86``: ``model.onnx`` via Keras's ``model.export(format=
  "onnx")``, which on the TensorFlow backend needs the ``tf2onnx`` package; without it the stage
  stops with a SciquantError saying so.
- impossible combinations (fp16 on npu-pow2, ...): SciquantError from the targets table.

Calibration: `calibration_samples` frames drawn without replacement from the train split
(split 0) with a generator seeded by `seed`, observed in batches of `batch_size`. QAT (qat-ste,
qat-lsq) then trains `qat_epochs` epochs over the whole train split from the calibrated model
(RMSprop at `qat_learning_rate`, seeded shuffling, TensorFlow op determinism on, as in training).

Also writes ``quantization.json``: target, method, precision, plan label and runtime, the
artifact's name, per-layer scales / zero points, the calibration size, QAT losses, for TFLite the
tensors' scales read back from the file, and provenance.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.errors import SciquantError
from sciquant.provenance import package_versions, provenance, write_json
from sciquant.quant.spec import parse_precision
from sciquant.quant.targets import Plan, get_target
from sciquant.workloads.md import data as md_data

__all__ = ["ARTIFACTS", "QUANTIZATION_FORMAT", "artifact_for", "run"]

QUANTIZATION_FORMAT = "sciquant-md-quantization"
QUANTIZATION_VERSION = 1
#: Artifact file names, in the order `artifact_for` looks for them.
ARTIFACTS = ("model.tflite", "model.onnx", "model.keras")
#: Beside a LiteRT integer artifact: the fake-quant Keras model it was converted from.
SIMULATION = "simulation.keras"
TF_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert", "tf2onnx")
TRAIN_SPLIT = 0


def run(
    checkpoint: Path,
    prepared: Path,
    out: Path,
    *,
    target: str,
    method: str,
    precision: str,
    calibration_samples: int = 256,
    qat_epochs: int = 2,
    qat_learning_rate: float = 1e-5,
    qat_init: str | None = None,
    batch_size: int = 128,
    seed: int = 0,
    threads: int | None = None,
    adaround: dict[str, Any] | None = None,
) -> Path:
    """Quantize the FP32 Keras model `checkpoint` for (target, method, precision) into `out`.

    qat_init: where QAT methods' calibration starts (``quantize.qat.init``; None: the default).
    adaround: the `quantize.adaround` settings (`AdaRoundSettings` fields but `seed`, which is
    `seed`) for ptq-adaround. Returns the artifact (`model.keras`, `model.tflite` or
    `model.onnx`); see the module docstring for which one a plan gives.
    """
    started = time.perf_counter()
    checkpoint, prepared, out = Path(checkpoint), Path(prepared), Path(out)
    plan = get_target(target).plan(precision, "keras")  # impossible combinations raise here
    parsed = parse_precision(precision)
    if calibration_samples < 1 or batch_size < 1 or qat_epochs < 0:
        raise SciquantError(
            "quantize settings: calibration_frames and batch_size must be >= 1 and qat epochs "
            f">= 0 (got {calibration_samples}, {batch_size}, {qat_epochs})"
        )
    from sciquant.runtime.keras import configure_threads

    configure_threads(threads)
    import keras
    import tensorflow as tf

    from sciquant.quant import keras as quant_keras

    method = quant_keras.check_method(method, parsed)  # unknown methods fail before any work
    if plan.runtime in ("tensorrt", "onnxruntime"):
        _require_tf2onnx(plan)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()

    from sciquant.runtime.keras import load_keras_model

    model = load_keras_model(checkpoint)
    if quant_keras.is_quantized(model):
        raise SciquantError(f"{checkpoint}: already quantized; quantize the FP32 model.keras")
    data = md_data.load_prepared(prepared)
    x, y, split = data["x"], data["y"], data["split"]
    train = np.flatnonzero(split == TRAIN_SPLIT)
    if len(train) == 0:
        raise SciquantError(
            f"{prepared}/pixelmaps.npz: the train split (0) is empty; rerun prepare"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(train, size=min(calibration_samples, len(train)), replace=False))
    calibration = x[chosen]

    qmodel = None
    history: list[dict[str, float]] = []
    weights: dict[str, Any] | None = None
    if parsed.kind == "int":
        qmodel = quant_keras.quantize_model(model, plan.target, parsed, method, qat_init=qat_init)
        quant_keras.calibrate(qmodel, quant_keras.iterate_batches(calibration, batch_size))
        print(f"calibrated {len(quant_keras.quant_layers(qmodel))} layers on {len(chosen)} frames")
        if method in ("ptq-adaround", "ptq-biascorr"):
            weights = _change_weights(
                qmodel, model, method, calibration, batch_size, seed, adaround
            )
        if method in ("qat-ste", "qat-lsq") and qat_epochs > 0:
            fine_tune = quant_keras.qat_lsq if method == "qat-lsq" else quant_keras.qat_ste
            history = fine_tune(
                qmodel,
                x[train],
                y[train],
                epochs=qat_epochs,
                learning_rate=qat_learning_rate,
                batch_size=batch_size,
                seed=seed,
            )
            print(
                f"{method}: "
                + ", ".join(f"epoch {h['epoch']} loss {h['loss']:.4f}" for h in history)
            )

    out.mkdir(parents=True, exist_ok=True)
    for name in (*ARTIFACTS, SIMULATION):  # one artifact per run folder: artifact_for is exact
        (out / name).unlink(missing_ok=True)
    tflite_info: dict[str, Any] | None = None
    simulation = None
    if plan.runtime == "litert":
        from sciquant.quant import tflite

        source = qmodel if qmodel is not None else model
        tflite_precision = "w8a8" if parsed.kind == "int" else str(parsed)
        artifact = tflite.convert(source, out / "model.tflite", tflite_precision, calibration)
        tflite_info = _tflite_summary(artifact, qmodel)
        if qmodel is not None:
            # the fake-quant model the .tflite was converted from (QAT: the fine-tuned weights),
            # for the evaluation's per-layer SQNR and simulation-vs-deployed agreement
            simulation = _save_keras(qmodel, out / SIMULATION).name
    elif plan.runtime in ("tensorrt", "onnxruntime"):
        artifact = _export_onnx(qmodel if qmodel is not None else model, out / "model.onnx")
    else:
        artifact = _save_keras(qmodel if qmodel is not None else model, out / "model.keras")

    prov = provenance(time.perf_counter() - started, threads)
    prov["packages"].update(package_versions(TF_PACKAGES))
    summary = {
        "format": QUANTIZATION_FORMAT,
        "version": QUANTIZATION_VERSION,
        "target": plan.target.name,
        "method": method,
        "precision": str(parsed),
        "plan": plan.label,
        "simulated": plan.simulated,
        "runtime": plan.runtime,
        "artifact": artifact.name,
        "simulation": simulation,
        "checkpoint": str(checkpoint),
        "seed": seed,
        "calibration": {
            "frames": int(len(chosen)),
            "split": "train",
            "batch_size": batch_size,
            "used": parsed.kind == "int",
        },
        "qat": (
            {"epochs": qat_epochs, "learning_rate": qat_learning_rate, "history": history}
            if method.startswith("qat-") and parsed.kind == "int"
            else None
        ),
        "weights": weights,
        "layers": quant_keras.layer_summary(qmodel) if qmodel is not None else {},
        "tflite": tflite_info,
        "provenance": prov,
    }
    write_json(out / "quantization.json", summary)
    return artifact


def _change_weights(
    qmodel: Any, model: Any, method: str, calibration: np.ndarray, batch_size: int, seed: int,
    adaround: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """AdaRound or bias correction of the calibrated `qmodel` on the calibration frames
    (`sciquant.quant.keras_adaround`); what quantization.json records of it."""
    from sciquant.quant import keras as quant_keras
    from sciquant.quant import keras_adaround

    batches = list(quant_keras.iterate_batches(calibration, batch_size))
    if method == "ptq-adaround":
        options = {key: value for key, value in (adaround or {}).items() if key != "seed"}
        try:
            settings = keras_adaround.AdaRoundSettings(**options, seed=seed)
        except TypeError as error:
            raise SciquantError(f"quantize.adaround: {error}") from None
        per_layer = keras_adaround.adaround_keras(qmodel, model, batches, settings)
        return {"method": method, "settings": dict(vars(settings)), "layers": per_layer}
    per_layer = keras_adaround.correct_bias_keras(qmodel, model, batches, seed=seed)
    return {"method": method, "layers": {name: {"rms_shift": v} for name, v in per_layer.items()}}


def artifact_for(out: Path) -> Path:
    """The artifact of a quantize run folder (as its quantization.json names it)."""
    out = Path(out)
    summary_path = out / "quantization.json"
    if summary_path.is_file():
        import json

        try:
            name = json.loads(summary_path.read_text()).get("artifact")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and (out / name).is_file():
            return out / name
    for name in ARTIFACTS:
        if (out / name).is_file():
            return out / name
    raise SciquantError(
        f"{out}: no quantized model ({', '.join(ARTIFACTS)}) found; run the quantize stage"
    )


def _save_keras(model: Any, path: Path) -> Path:
    """model.save to a temporary .keras name, then rename (no half-written model.keras)."""
    part = path.with_name(f".{path.stem}.part.keras")
    model.save(part)
    os.replace(part, path)
    return path


def _require_tf2onnx(plan: Plan) -> None:
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        raise SciquantError(
            f"target {plan.target.name!r} runs precision {plan.precision} natively from ONNX, "
            "and exporting a Keras model to ONNX needs the tf2onnx package (Keras 3's "
            "model.export(format='onnx') uses it on the TensorFlow backend), which is not "
            "installed; install tf2onnx, or quantize the md workload for litert-cpu (native) or "
            "reference (simulation)"
        ) from None


def _export_onnx(model: Any, path: Path) -> Path:
    """Keras 3 ONNX export (tf2onnx); fake-quant ops become QuantizeLinear/DequantizeLinear."""
    part = path.with_name(path.name + ".part")
    try:
        model.export(str(part), format="onnx", verbose=False)
    except Exception as error:
        raise SciquantError(
            f"ONNX export of the Keras model failed ({type(error).__name__}: {str(error)[:300]})"
        ) from error
    os.replace(part, path)
    return path


def _tflite_summary(path: Path, qmodel: Any) -> dict[str, Any]:
    """What the .tflite file holds: I/O quantization, activation scales, whose ranges."""
    from sciquant.quant import tflite

    details = tflite.tensor_quantization(path)
    activations = [
        {key: entry[key] for key in ("name", "dtype", "scale", "zero_point") if key in entry}
        for entry in details["tensors"]
        if "scale" in entry and entry["dtype"] in ("int8", "uint8")
    ]
    info: dict[str, Any] = {
        "inputs": details["inputs"],
        "outputs": details["outputs"],
        "activations": activations,
        "per_channel_tensors": sum(1 for entry in details["tensors"] if "channels" in entry),
    }
    if qmodel is not None:
        info["ranges"] = "fake-quant model (ours)"
        info["adopted_fake_quant_ranges"] = tflite.uses_fake_quant_ranges(qmodel, path)
    return info
