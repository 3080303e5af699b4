"""Per-layer sensitivity and a mixed-precision recommendation for a blood-flow surrogate.

Each Linear layer is quantized alone at the low precision (all others float) and the rollout
errors on the validation simulations are measured. Layers are then lowered greedily, least
sensitive first, while the rollout errors of the whole assignment stay within the budget
(`max_ratio_to_fp32` × the FP32 errors on the same simulations); the rest keep the high precision.
The choice uses validation simulations only, so the test errors of the recommended run (evaluated
like every other run, precision label `mixed`) are not selected on.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sciquant.provenance import write_json  # noqa: E402
from sciquant.quant.pytorch import calibrate, layer_names, quantize_model  # noqa: E402
from sciquant.vocabulary import section_with_defaults  # noqa: E402
from sciquant.workloads.bloodflow.data import load_index  # noqa: E402
from sciquant.workloads.bloodflow.features import GraphTensors, Normalizer  # noqa: E402
from sciquant.workloads.bloodflow.quantize import calibration_inputs  # noqa: E402
from sciquant.workloads.bloodflow.rollout import StepFunction, rollout_all, rollout_errors  # noqa: E402
from sciquant.workloads.bloodflow.train import load_graphs, load_model  # noqa: E402

FIELDS = ("pressure_error_pct", "flowrate_error_pct")


def mean_errors(step: StepFunction, graphs: list[GraphTensors], norm: Normalizer) -> dict:
    """Mean rollout errors (%) over the graphs."""
    predictions = rollout_all(step, graphs, norm)
    errors = [rollout_errors(p, q, g, norm) for g, (p, q) in zip(graphs, predictions, strict=True)]
    return {field: float(np.mean([e[field] for e in errors])) for field in FIELDS}


def within_budget(errors: dict, reference: dict, ratio: float) -> bool:
    return all(errors[f] <= ratio * reference[f] for f in FIELDS)


def run(
    checkpoint: Path,
    prepared: Path,
    out: Path,
    settings: dict[str, Any],
    threads: int | None = None,
) -> Path:
    """Write `sensitivity.csv`, `sensitivity.png` and `recommendation.json` into `out`.

    settings: the config's `quantize` section (its `sensitivity` entry chooses target, method,
    low and high precision and the budget; calibration_* as for PTQ); what it leaves out takes
    the schema's defaults.
    """
    # `sensitivity` has no default of its own (left out: no analysis); here it is asked for
    settings = {**settings, "sensitivity": settings.get("sensitivity") or {}}
    settings = section_with_defaults(settings, "quantize", "quantize")
    if threads:
        torch.set_num_threads(threads)
    options = settings["sensitivity"]
    target, method = options["target"], options["method"]
    low, high = options["precision"], options["fallback"]
    ratio = options["max_ratio_to_fp32"]
    model, state = load_model(checkpoint)
    norm = Normalizer.of_checkpoint(state)
    index = load_index(prepared)
    validation = index["samples"]["valid"] or index["samples"]["train"][:2]
    judged = load_graphs(prepared, validation[: options["simulations"]], norm)
    calibration = load_graphs(
        prepared, index["samples"]["train"][: settings["calibration_samples"]], norm
    )
    steps = settings["calibration_steps"]

    # Observers see the float model's activations, so a layer's qparams at a precision do not
    # depend on the other layers: calibrate each precision once, then copy per layer.
    calibrated = {
        precision: calibrate(
            quantize_model(model, target, precision, method),
            calibration_inputs(calibration, steps, norm),
        ).quant_linears()
        for precision in (low, high)
    }

    def quantized(precisions: dict[str, str]) -> torch.nn.Module:
        qmodel = quantize_model(
            model, target, high, method, layers=list(precisions), precisions=precisions
        )
        for name, layer in qmodel.quant_linears().items():
            layer.load_state_dict(calibrated[precisions[name]][name].state_dict())
        return qmodel.eval()

    fp32 = mean_errors(model, judged, norm)
    rows = []
    names = layer_names(model)
    for i, name in enumerate(names):
        errors = mean_errors(quantized({name: low}), judged, norm)
        rows.append({"layer": name, **errors})
        print(f"[{i + 1}/{len(names)}] {name}: {errors}", flush=True)

    order = sorted(rows, key=lambda r: max(r[f] / fp32[f] for f in FIELDS))
    assignment = {name: high for name in names}
    lowered = []
    for row in order:
        trial = dict(assignment, **{row["layer"]: low})
        errors = mean_errors(quantized(trial), judged, norm)
        if within_budget(errors, fp32, ratio):
            assignment, combined = trial, errors
            lowered.append(row["layer"])
        else:
            break  # the rest are more sensitive still
    if not lowered:
        combined = mean_errors(quantized(assignment), judged, norm)
    out.mkdir(parents=True, exist_ok=True)
    _write_table(out / "sensitivity.csv", rows, fp32)
    _plot(out / "sensitivity.png", rows, fp32, low)
    recommendation = {
        "target": target,
        "method": method,
        "low": low,
        "high": high,
        "max_ratio_to_fp32": ratio,
        "fp32_validation_errors": fp32,
        "validation_errors": combined,
        "lowered_layers": lowered,
        "layer_precisions": assignment,
    }
    path = write_json(out / "recommendation.json", recommendation)
    print(f"{len(lowered)} of {len(names)} layers at {low}, the rest {high}: {combined}")
    return path


def _write_table(path: Path, rows: list[dict], fp32: dict) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["layer", *FIELDS, *(f"{f}_ratio_to_fp32" for f in FIELDS)])
        for row in rows:
            values = [row[f] for f in FIELDS]
            writer.writerow([row["layer"], *values, *(row[f] / fp32[f] for f in FIELDS)])


def _plot(path: Path, rows: list[dict], fp32: dict, low: str) -> None:
    """Heat map: one row per layer, columns pressure and flow error as a ratio to FP32."""
    ratios = np.array([[row[f] / fp32[f] for f in FIELDS] for row in rows])
    fig, ax = plt.subplots(figsize=(4.2, 0.22 * len(rows) + 1.2))
    image = ax.imshow(ratios, aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(rows)), [row["layer"] for row in rows], fontsize=7)
    ax.set_xticks(range(len(FIELDS)), ["pressure", "flow"])
    for (i, j), value in np.ndenumerate(ratios):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="tab:blue")
    fig.colorbar(image, ax=ax, label="error / FP32 error")
    ax.set_title(f"one layer at {low}, others float", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
