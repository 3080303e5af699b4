"""The quantize stage for blood-flow surrogates: PTQ or QAT of a trained MeshGraphNet.

PTQ calibrates the ranges on the calibration split: the true states of the first
`calibration_samples` training samples at `calibration_steps` evenly spaced time steps (the inputs
the model sees in a rollout). QAT starts from that calibration and fine-tunes with the FP32
training loss (`sciquant.workloads.bloodflow.train.fit`): STE moves the weights through the
fake-quant kernels' straight-through gradient, LSQ also learns the scales. The result is saved as
`quantized.pt` (weights, qparams, how it was made), loadable with `load_quantized`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sciquant.data.download import sha256_of
from sciquant.errors import SciquantError
from sciquant.models.meshgraphnet import MeshGraphNet, MeshGraphNetConfig
from sciquant.quant.adaround import AdaRoundSettings, adaround, correct_bias, float_layers
from sciquant.quant.degree import enable_degree_qat, protection_settings, quantize_degree_model
from sciquant.quant.equalize import equalize
from sciquant.quant.pytorch import (
    QuantizedModel,
    calibrate,
    enable_lsq,
    enable_tqt,
    quantize_model,
    set_mode,
)
from sciquant.quant.spec import parse_precision
from sciquant.vocabulary import MIXED, quantize_section
from sciquant.workloads.bloodflow.data import load_index
from sciquant.workloads.bloodflow.features import GraphTensors, Normalizer, true_state_inputs
from sciquant.workloads.bloodflow.train import (
    TrainSettings,
    fit,
    load_checkpoint,
    load_graphs,
    load_model,
    save_atomic,
)

QUANTIZED_FORMAT = "sciquant-quantized-meshgraphnet"
# 6: from version-6 FP32 checkpoints (the output corrects the lumped step); 7: the formulation
# 8: the bias of ONNX Runtime / OpenVINO targets on the int32 grid s_x·s_w (as their GEMMs add it)
QUANTIZED_VERSION = 8
#: The file name the quantize stage writes.
QUANTIZED_NAME = "quantized.pt"


def calibration_inputs(
    graphs: list[GraphTensors], steps_per_graph: int, norm: Normalizer
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Model inputs (node features, edge features, edge index) at evenly spaced true states."""
    for graph in graphs:
        for t in np.linspace(0, graph.num_steps - 2, steps_per_graph).astype(int):
            yield true_state_inputs(graph, int(t), norm)


def qat_settings(model_settings: dict[str, Any], qat: dict[str, Any]) -> TrainSettings:
    """The FP32 training settings with the QAT section's epochs, steps and learning rate.

    qat: the ``quantize.qat`` section with the schema's defaults filled
    (`sciquant.vocabulary.quantize_section`)."""
    base = TrainSettings.of(model_settings)
    return dataclasses.replace(
        base,
        epochs=qat["epochs"],
        steps_per_epoch=qat["steps_per_epoch"],
        learning_rate=qat["learning_rate"],
        learning_rate_min=min(base.learning_rate_min, qat["learning_rate"]),
        threshold_learning_rate=qat["threshold_learning_rate"],
    )


def run(
    checkpoint: Path,
    prepared: Path,
    out: Path,
    target: str,
    method: str,
    precision: str,
    settings: dict[str, Any],
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    recommendation: Path | None = None,
) -> Path:
    """Quantize the FP32 model of `checkpoint`; write `quantized.pt` into `out`.

    settings: {"quantize": the config's quantize section, "model": the model's settings}; what
    the quantize section leaves out takes the schema's defaults.
    precision `mixed`: the per-layer precisions of `recommendation` (from `sensitivity`).
    """
    quantize_settings = quantize_section(settings)
    settings = {**settings, "quantize": quantize_settings}  # recorded in quantized.pt
    if threads:
        torch.set_num_threads(threads)
    model, fp32_state = load_model(checkpoint)
    norm = Normalizer.of_checkpoint(fp32_state)
    index = load_index(prepared)
    train_names = index["samples"]["train"]
    calibration = load_graphs(
        prepared, train_names[: quantize_settings["calibration_samples"]], norm
    )
    layer_precisions = None
    if precision == MIXED:
        if recommendation is None:
            raise SciquantError("precision `mixed` needs --recommendation (from `sensitivity`)")
        chosen = load_recommendation(recommendation)
        layer_precisions = chosen["layer_precisions"]
        precision = chosen["high"]
    if method == "ptq-cle":
        model = equalize(model)  # the same function, channel ranges shared across ReLUs
    qmodel = _quantized_copy(
        model, target, precision, method, layer_precisions, quantize_settings["qat"]["init"]
    )
    steps = quantize_settings["calibration_steps"]
    batches = list(calibration_inputs(calibration, steps, norm))
    calibrate(qmodel, batches)
    print(f"calibrated {len(qmodel.quantized_layers())} layers on {len(calibration)} samples")
    moved = None
    if method in ("ptq-adaround", "ptq-biascorr"):
        if method == "ptq-adaround":
            options = quantize_settings["adaround"]
            adaround(qmodel, model, batches, AdaRoundSettings(**options, seed=seed))
        else:
            correct_bias(qmodel, model, batches)
        # the FP32 layers these methods moved: the per-layer SQNR is measured against them
        moved = float_layers(qmodel, model)

    if method.startswith("qat-"):
        if method == "qat-lsq":
            enable_lsq(qmodel)
        elif method == "qat-tqt":
            enable_tqt(qmodel)  # before the optimizer: the thresholds are new parameters
        elif method == "qat-degree":  # LSQ (STE on pow2 targets) + Degree-Quant protection
            p_min, p_max = protection_settings(quantize_settings["qat"])
            enable_degree_qat(qmodel, p_min, p_max, seed)
        train_graphs = load_graphs(prepared, train_names, norm)
        valid_graphs = load_graphs(prepared, index["samples"]["valid"], norm)
        fine_tune = qat_settings(settings.get("model", {}), quantize_settings["qat"])
        torch.manual_seed(seed)

        # What the fine-tuning resumes only with (train.bloodflow.RESUME_KEYS): the same FP32
        # weights and the same prepared data.
        sources = {
            "source_sha256": sha256_of(checkpoint),
            "data_sha256": sha256_of(prepared / "index.json"),
        }

        def state(trained: QuantizedModel) -> dict[str, Any]:
            return {
                **_quantized_state(trained, fp32_state, target, method, precision, settings),
                **sources,
            }

        fit(qmodel, train_graphs, valid_graphs, norm, fine_tune, seed, out, state, progress)
        set_mode(qmodel, "quantize")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quantized.pt"
    state = _quantized_state(qmodel, fp32_state, target, method, precision, settings)
    if moved is not None:
        state["float_layers"] = moved
    save_atomic(state, path)
    return path


def _quantized_copy(model, target, precision, method, precisions, qat_init=None) -> QuantizedModel:  # noqa: ANN001
    """The fake-quantized copy of `model` for `method` (its own kind of model where it has one);
    qat_init: the ``quantize.qat.init`` start of QAT methods (None: the default)."""
    if method == "qat-degree":
        return quantize_degree_model(
            model, target, precision, precisions=precisions, qat_init=qat_init
        )
    return quantize_model(
        model, target, precision, method, precisions=precisions, qat_init=qat_init
    )


def _quantized_state(qmodel, fp32_state, target, method, precision, settings) -> dict[str, Any]:  # noqa: ANN001
    return {
        "format": QUANTIZED_FORMAT,
        "version": QUANTIZED_VERSION,
        "architecture": fp32_state["architecture"],
        "statistics": fp32_state["statistics"],
        "formulation": fp32_state.get("formulation", "residual"),
        "target": target,
        "method": method,
        "precision": precision,
        "layer_precisions": {k: str(v) for k, v in qmodel.layer_precisions.items()},
        "state_dict": qmodel.state_dict(),
        "settings": settings,
        "seed": fp32_state["seed"],
    }


def load_quantized(path: Path) -> tuple[QuantizedModel, dict[str, Any]]:
    """Rebuild a quantized model from `quantized.pt` (eval mode) and return it with its state.

    A missing or unreadable file raises a `SciquantError` that points to the quantize stage,
    the one that writes it.
    """
    try:
        state = load_checkpoint(
            path, QUANTIZED_FORMAT, QUANTIZED_VERSION, label="sciquant quantized MeshGraphNet"
        )
    except SciquantError as error:
        # load_checkpoint's own advice for these two cases names the train stage.
        cause = error.__cause__
        if isinstance(cause, FileNotFoundError):
            raise SciquantError(
                f"{path}: quantized model not found; run the quantize stage first"
            ) from cause
        if cause is not None:
            first_line = (str(cause).splitlines() or [""])[0][:200]
            raise SciquantError(
                f"{path}: not a readable quantized model ({type(cause).__name__}: {first_line});"
                " delete it and rerun the quantize stage"
            ) from cause
        raise
    model = MeshGraphNet(MeshGraphNetConfig(**state["architecture"]))
    qmodel = _quantized_copy(
        model,
        state["target"],
        parse_precision(state["precision"]),
        state["method"],
        state["layer_precisions"],
    )
    try:
        # The saved mode (quantize) and the frozen qparams come back with the state.
        qmodel.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise SciquantError(
            f"{path}: does not match its recorded architecture ({error}); rerun quantize"
        ) from error
    qmodel.eval()
    return qmodel, state


def export(checkpoint: Path, prepared: Path | None, out: Path) -> Path:
    """Write a model as ONNX: FP32 from `checkpoint.pt`, QDQ (its own scales) from `quantized.pt`.

    A quantized export is traced on the first test graph of `prepared`.
    """
    from sciquant.quant.export import export_fp32_onnx, export_qdq_onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    if not is_quantized(checkpoint):
        model, _ = load_model(checkpoint)
        return export_fp32_onnx(model, out)
    if prepared is None:
        raise SciquantError(f"{checkpoint}: exporting a quantized model needs --prepared")
    qmodel, state = load_quantized(checkpoint)
    norm = Normalizer.of_checkpoint(state)
    first_test = load_index(prepared)["samples"]["test"][:1]
    example = next(calibration_inputs(load_graphs(prepared, first_test, norm), 1, norm))
    return export_qdq_onnx(qmodel, out, example)


def is_quantized(path: Path) -> bool:
    """Whether `path` is a quantized.pt: its format says so.

    A file that cannot be read (missing or corrupt) has no format; it counts as quantized if it
    is named `quantized.pt`, the name the quantize stage writes, so that `load_quantized`
    reports it and points to that stage (otherwise the FP32 loader would point to training).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a missing or corrupt file is reported by the loaders with its fix
        return Path(path).name == QUANTIZED_NAME
    return isinstance(state, dict) and state.get("format") == QUANTIZED_FORMAT


def load_recommendation(path: Path) -> dict[str, Any]:
    """The mixed-precision recommendation written by `sciquant sensitivity`."""
    try:
        recommendation = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SciquantError(
            f"{path}: cannot read the recommendation ({error}); rerun sensitivity"
        ) from error
    if not isinstance(recommendation, dict) or not isinstance(
        recommendation.get("layer_precisions"), dict
    ):
        raise SciquantError(
            f"{path}: not a mixed-precision recommendation (no `layer_precisions`); give the "
            "recommendation.json written by `sciquant sensitivity`"
        )
    if "high" not in recommendation:
        raise SciquantError(
            f"{path}: the recommendation has no `high` precision; rerun sensitivity"
        )
    return recommendation
