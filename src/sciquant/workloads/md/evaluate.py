"""Evaluation of a GPCR-state classifier: test-split accuracy, F1, confusion, batch-1 latency.

The artifact's suffix picks the runtime: `.keras` (FP32 or fake-quantized Keras model) runs
with `sciquant.runtime.keras.KerasRunner`, `.tflite` with `sciquant.runtime.litert.LiteRTRunner`.
Writes `metrics.json` (layout shared with the blood-flow evaluation) and `confusion.png` next
to it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sciquant.errors import SciquantError  # noqa: E402
from sciquant.provenance import package_versions, provenance, write_json  # noqa: E402
from sciquant.quant.debug import DEBUG_INPUTS, describe  # noqa: E402
from sciquant.runtime.paired import host_facts, paired_timing  # noqa: E402
from sciquant.vocabulary import COORDINATES  # noqa: E402
from sciquant.workloads.md.train import TF_PACKAGES, load_pixelmaps  # noqa: E402

__all__ = [
    "COORDINATE_KEYS",
    "calibration_frames",
    "classification_metrics",
    "make_runner",
    "plot_confusion",
    "quant_debug",
    "run",
]

COORDINATE_KEYS = COORDINATES
RUNNERS = {".keras": "keras", ".tflite": "litert"}


def make_runner(artifact: Path, threads: int | None = None) -> Any:
    """The runner for `artifact` by its suffix (`.keras` or `.tflite`)."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise SciquantError(f"{artifact}: model artifact not found; run the stage that writes it")
    suffix = artifact.suffix.lower()
    if suffix == ".keras":
        import sciquant.quant.keras  # noqa: F401  (registers the fake-quant layers it may hold)
        from sciquant.runtime.keras import KerasRunner

        return KerasRunner(artifact, threads=threads)
    if suffix == ".tflite":
        from sciquant.runtime.litert import LiteRTRunner

        return LiteRTRunner(artifact, threads=threads)
    raise SciquantError(
        f"{artifact}: unknown model format {suffix!r}; the md workload evaluates "
        f"{' or '.join(RUNNERS)} files"
    )


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, binary F1 (positive class 1), macro F1, and the confusion matrix.

    confusion[i][j] counts frames of true class i predicted as class j.
    """
    n_classes = max(int(probabilities.shape[1]), int(labels.max()) + 1 if len(labels) else 2)
    predicted = probabilities.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)

    def f1(positive: int) -> float:
        tp = confusion[positive, positive]
        fp = confusion[:, positive].sum() - tp
        fn = confusion[positive, :].sum() - tp
        return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0

    return {
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        "f1": f1(1),
        "f1_macro": float(np.mean([f1(k) for k in range(n_classes)])),
        "confusion": confusion.tolist(),
        "test_frames": int(len(labels)),
    }


def plot_confusion(confusion: list[list[int]], path: Path, title: str = "") -> None:
    """The confusion matrix as an annotated heat map (rows: true state, columns: predicted)."""
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    limit = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if limit and count > limit / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ticks = range(matrix.shape[0])
    ax.set_xticks(ticks, [f"state {k}" for k in ticks])
    ax.set_yticks(ticks, [f"state {k}" for k in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: Most test frames on which a LiteRT run's outputs are compared with its simulation's.
AGREEMENT_FRAMES = 1024


def calibration_frames(data: Any, summary: dict[str, Any], count: int) -> np.ndarray:
    """The first `count` calibration frames of a run, drawn from the train split as the md
    quantize stage draws them (`sciquant.workloads.md.quantize.run`: ``calibration.frames`` frames
    without replacement, a generator seeded by the run's ``seed``, in index order)."""
    train = np.flatnonzero(data.split == 0)
    frames = min(int(summary["calibration"]["frames"]), len(train))
    rng = np.random.default_rng(summary.get("seed", 0))
    chosen = np.sort(rng.choice(train, size=frames, replace=False))
    return data.x[chosen[:count]]


def quant_debug(
    artifact: Path,
    data: Any,
    runner: Any,
    probabilities: np.ndarray,
    inputs: int = DEBUG_INPUTS,
) -> dict[str, Any]:
    """Quantization debugging of a fake-quantized run (`sciquant.quant.debug`); {} for FP32
    runs and for float models converted for a runtime (LiteRT fp32 / fp16).

    The run's fake-quant model: the `.keras` artifact itself (a simulation), or for a LiteRT
    `.tflite` the fake-quant model it was converted from, which the quantize stage keeps beside
    it (``simulation`` in `quantization.json`: QAT's fine-tuned weights included); for a run
    quantized before that file was kept, the simulation rebuilt from the FP32 model and
    `quantization.json` (`sciquant.quant.debug.rebuild_keras_simulation`; post-training methods
    only: a QAT run then says so in ``quant_debug_note``).
    Per-layer output SQNR (``layer_sqnr_*``) on the first `inputs` calibration frames
    (`calibration_frames`); for a LiteRT run also the agreement of the simulated and the
    deployed class probabilities (``sim_vs_deployed_*``) on at most `AGREEMENT_FRAMES` evenly
    spaced test frames (`probabilities`: the runner's, on the whole test split), in steps of the
    int8 output's scale (1/256 for a softmax output). `inputs` 0 turns it off.
    """
    import json

    from sciquant.quant.debug import (
        keras_layer_sqnr,
        output_agreement,
        rebuild_keras_simulation,
        sqnr_metrics,
    )

    summary_path = Path(artifact).parent / "quantization.json"
    if inputs <= 0 or not summary_path.is_file():
        return {}
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as error:
        raise SciquantError(f"{summary_path}: not readable ({error}); rerun quantize") from error
    if not summary.get("layers"):
        return {}  # nothing fake-quantized (fp32, or fp16 converted from the float model)
    from sciquant.quant import keras as quant_keras

    deployed = getattr(runner, "name", "") == "litert"
    kept = summary.get("simulation")
    if deployed and kept and (Path(artifact).parent / kept).is_file():
        from sciquant.runtime.keras import load_keras_model

        qmodel = load_keras_model(Path(artifact).parent / kept)
    elif deployed:
        from sciquant.runtime.keras import load_keras_model

        try:
            qmodel = rebuild_keras_simulation(load_keras_model(summary["checkpoint"]), summary)
        except SciquantError as error:
            note = f"no simulation of this {summary.get('method')} run to debug with: {error}"
            print(note)
            return {"quant_debug_note": note}
    else:
        qmodel = getattr(runner, "model", None)
        if qmodel is None or not quant_keras.is_quantized(qmodel):
            return {}
    frames = calibration_frames(data, summary, inputs)
    batches = list(quant_keras.iterate_batches(frames, 64))
    metrics = sqnr_metrics(keras_layer_sqnr(qmodel, batches), len(frames))
    if deployed:
        x_test, _ = data.subset("test")
        chosen = np.unique(np.linspace(0, len(x_test) - 1, AGREEMENT_FRAMES).astype(int))
        simulated = np.concatenate(
            [
                np.asarray(qmodel(batch, training=False).numpy(), dtype=np.float32)
                for batch in quant_keras.iterate_batches(x_test[chosen], 256)
            ]
        )
        step = runner.output_details.get("scale")  # an integer output's step; None if float
        metrics.update(
            output_agreement(simulated, probabilities[chosen], step=step, inputs=len(chosen))
        )
    return metrics


def paired_latency(
    runner: Any, baseline: Any, x: np.ndarray, repeats: int, warmup: int = 5
) -> dict[str, Any]:
    """Batch-1 latency of `runner` paired with `baseline`'s (its target's FP32) on the same
    frames, interleaved (`sciquant.runtime.paired.paired_timing`); each side's time is its
    runner's own measurement of one call (`time_batch1`), frame i for both in pair i."""
    frames = np.asarray(x, dtype=np.float32)
    position = {"run": 0, "baseline": 0}

    def call(which: str, timed: Any) -> Any:
        def one() -> float:
            frame = frames[position[which] % len(frames)][None]
            position[which] += 1
            return timed.time_batch1(frame, repeats=1, warmup=0)["total_ms"] / 1e3

        return one

    paired = paired_timing(call("run", runner), call("baseline", baseline), repeats, warmup=warmup)
    return {
        "baseline_latency_ms_median": paired["baseline_time_s_median"] * 1e3,
        "paired_speedup": paired["paired_speedup"],
        "paired_speedup_ci_low": paired["paired_speedup_ci_low"],
        "paired_speedup_ci_high": paired["paired_speedup_ci_high"],
        "timing_pairs": repeats,
        "cpu_share": paired["cpu_share"],
        "contended": float(paired["contended"]),
        "load_average_1min": paired["load_average_1min_after"],
    }


def run(
    prepared: Path,
    artifact: Path,
    out: Path,
    *,
    coordinates: dict[str, Any],
    simulated: bool = False,
    runtime: str | None = None,
    repeats: int = 50,
    threads: int | None = None,
    extra: dict[str, Any] | None = None,
    study: str | None = None,
    settings_hashes: dict[str, str] | None = None,
    baseline: Path | None = None,
    debug_inputs: int = DEBUG_INPUTS,
) -> Path:
    """Classify the test split with `artifact`, time batch-1 inference; write metrics.json.

    Simulated runs (fake-quant) are not timed: their latency would be the simulation's overhead.
    `baseline`: the FP32 artifact of the run's target (`.keras` / `.tflite`); the run's batch-1
    calls are then timed interleaved with its calls on the same frames (`paired_latency`), the
    speed-up being the ratio of the paired medians; without it a timed run is its target's
    FP32 itself (speed-up 1).

    out: the metrics.json path (`confusion.png` goes next to it); runtime: the label stored in
    metrics.json (default: the runner's name, `keras` or `litert`); extra: further metrics
    (e.g. from quantization) merged into "metrics"; study, settings_hashes: default to the
    coordinates' entries of those names. debug_inputs: calibration frames of the per-layer
    SQNR of a quantized run (`quant_debug`; 0: no quantization debugging).
    """
    started = time.perf_counter()
    from sciquant.models.icnnmd import icnnmd_parameters

    artifact = Path(artifact)
    out = Path(out)
    data = load_pixelmaps(Path(prepared))  # before the runner: cheap errors first
    x_test, y_test = data.subset("test")
    if len(y_test) == 0:
        raise SciquantError(f"{data.path}: the test split (2) is empty; rerun the prepare stage")
    runner = make_runner(artifact, threads)
    probabilities = np.asarray(runner.predict(x_test), dtype=np.float32)
    if probabilities.shape[0] != len(y_test) or probabilities.ndim != 2:
        raise SciquantError(
            f"{artifact}: output shape {probabilities.shape} does not fit {len(y_test)} test "
            "frames; was it exported from a model for this data set?"
        )
    metrics = classification_metrics(y_test, probabilities)
    if not simulated:
        # A simulation's latency is fake-quant overhead, not a low-precision kernel's: untimed.
        timing = runner.time_batch1(x_test, repeats=repeats)
        metrics.update(
            {
                "latency_ms_median": timing["total_ms"],
                "h2d_ms_median": timing["h2d_ms"],
                "compute_ms_median": timing["compute_ms"],
                "d2h_ms_median": timing["d2h_ms"],
                "latency_ms_min": timing["total_ms_min"],
                "latency_ms_max": timing["total_ms_max"],
                "latency_repeats": repeats,
            }
        )
        if baseline is not None:
            metrics.update(paired_latency(runner, make_runner(baseline, threads), x_test, repeats))
        else:
            metrics["paired_speedup"] = 1.0
    # After the timings: the debugging's inferences are not among the timed ones.
    debug = quant_debug(artifact, data, runner, probabilities, debug_inputs)
    if "layer_sqnr_db" in debug:
        print(describe(debug))
    metrics.update(debug)
    metrics["parameters"] = icnnmd_parameters(data.grid, data.channels, probabilities.shape[1])
    metrics["model_bytes"] = artifact.stat().st_size
    if extra:
        metrics.update(extra)
    runtime = runtime or getattr(runner, "name", RUNNERS.get(artifact.suffix.lower()))
    label = ", ".join(str(coordinates.get(k)) for k in COORDINATE_KEYS if k in coordinates)
    plot_confusion(
        metrics["confusion"],
        out.parent / "confusion.png",
        f"{label}\n{runtime}: accuracy {metrics['accuracy']:.3f}",
    )
    prov = provenance(time.perf_counter() - started, threads)
    prov["packages"].update(package_versions(TF_PACKAGES))
    if runtime == "litert":
        prov["packages"].update(package_versions(("ai-edge-litert",)))
    payload = {
        "coordinates": {k: coordinates.get(k) for k in COORDINATE_KEYS},
        "study": study if study is not None else coordinates.get("study"),
        "settings_hashes": (
            settings_hashes if settings_hashes is not None else coordinates.get("settings_hashes")
        ),
        "simulated": simulated,
        "runtime": runtime,
        "metrics": metrics,
        "provenance": prov,
    }
    if "latency_ms_median" in metrics:  # a timing: the CPU and its int8/bf16 features beside it
        payload["host"] = host_facts()
    latency = (
        f"batch-1 latency {metrics['latency_ms_median']:.3f} ms (median of {repeats})"
        if "latency_ms_median" in metrics
        else "not timed (a simulation)"
    )
    if "paired_speedup_ci_low" in metrics:
        latency += (
            f", {metrics['paired_speedup']:.2f}x FP32 (paired, 95 % CI "
            f"{metrics['paired_speedup_ci_low']:.2f}-{metrics['paired_speedup_ci_high']:.2f})"
        )
    if metrics.get("contended"):
        latency += f" [contended: {metrics['cpu_share']:.0%} of the wall time on the CPU]"
    print(
        f"{artifact.name} ({runtime}): accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f}"
        f" on {metrics['test_frames']} test frames, {latency}"
    )
    return write_json(out, payload)
