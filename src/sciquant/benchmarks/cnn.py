"""Batch-1 latency of the ICNNMD CNN in LiteRT: FP32 vs FP16 vs INT8 TFLite, side by side.

`sciquant bench cnn`. For each pixel-map grid the network (`sciquant.models.icnnmd`, random
weights: latency does not depend on them) is converted to FP32, FP16 (float16 weights),
full-integer INT8 TFLite (int8 I/O; TFLite's own min/max calibration on random pixel maps,
which is as fast as any other calibration) and, for comparison, dynamic-range INT8 (`dyn-int8`:
int8 weights, activations quantized on the fly inside each kernel, float I/O; not a study
precision), and each file is timed with
`sciquant.runtime.litert.LiteRTRunner.time_batch1`: h2d (quantize + set_tensor), compute
(invoke), d2h (get_tensor + dequantize). The variants run round-robin, one timed call each
per repeat (after one untimed call that brings its weights back into the caches), so drifts and
noise from other processes hit them equally; medians are reported with ratios against FP32 of
the same delegate setting.

Grids (`GRIDS`): a pixel map of N atoms is ceil(sqrt(N)) pixels on a side, so grid 10 is a
molecule of ~100 atoms (the network's minimum), grid 32 ~1,000 atoms, grid 50 ~2,500 atoms (a
GPCR's C-alpha / backbone selection). Both interpreter setups are timed: with the XNNPACK
delegate (LiteRT's default) and with the built-in kernels only.

The project's goal: INT8 at least 1.9× faster than FP32 (goal 2.5×), invoke only, as measured for
a small CNN on this machine kind (REFERENCE.md).

Measured here (2 shared cores of an AMD EPYC that exposes AVX2 + FMA only: no AVX-512, no VNNI;
1 thread, 200 repeats), invoke medians FP32 / FP16 / INT8 with XNNPACK:

    grid 10 (~100 atoms)     0.097 / 0.097 / 0.105 ms   INT8 0.92×
    grid 32 (~1,000 atoms)   1.88  / 1.87  / 1.55  ms   INT8 1.21×
    grid 50 (~2,500 atoms)   5.50  / 5.47  / 4.26  ms   INT8 1.29×

The built-in kernels are about 1.5× slower for every variant (grid 50: 8.18 / 8.23 / 6.31 ms),
so XNNPACK (LiteRT's default) is the setting to use; 2 threads were no faster than 1 (the second
core is busy with other work on this machine kind). FP16 TFLite stores float16 weights and
computes in float32 on this CPU: same speed as FP32, half the file. INT8 misses the 1.9× goal
on this CPU: without VNNI, XNNPACK's int8 kernels multiply-accumulate through 16-bit products at
about the FP32 FMA rate; int8 I/O adds quantize + dequantize (0.03 ms at grid 10, 0.14 ms at
grid 50) to h2d and d2h, which at grid 10 outweighs the compute.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.errors import SciquantError

__all__ = ["GOAL_SPEEDUP", "GRIDS", "MIN_SPEEDUP", "VARIANTS", "format_table", "run"]

#: Pixel-map side lengths timed by default: ~100, ~1,000 and ~2,500 atoms.
GRIDS = (10, 32, 50)
VARIANTS = ("fp32", "fp16", "int8", "dyn-int8")
_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "w8a8", "dyn-int8": "dynamic"}
MIN_SPEEDUP, GOAL_SPEEDUP = 1.9, 2.5
_CALIBRATION_FRAMES = 32


def run(
    grids: Sequence[int] = GRIDS,
    repeats: int = 200,
    threads: int = 1,
    warmup: int = 20,
    delegates: Sequence[bool] = (True, False),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time FP32 / FP16 / INT8 TFLite ICNNMD at each grid; one row per (grid, delegate, variant).

    threads: interpreter threads (and TensorFlow's, for building and converting); delegates:
    which XNNPACK settings to time (True = the default delegate on).
    """
    if repeats < 1 or warmup < 0 or threads < 1:
        raise SciquantError(
            f"bench cnn needs repeats >= 1, warmup >= 0, threads >= 1 "
            f"(got {repeats}, {warmup}, {threads})"
        )
    from sciquant.runtime.keras import configure_threads

    configure_threads(threads)
    from sciquant.models.icnnmd import build_icnnmd
    from sciquant.quant.tflite import convert
    from sciquant.runtime.litert import LiteRTRunner

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="sciquant-bench-cnn-") as tmp:
        for grid in grids:
            model = build_icnnmd(grid, seed=seed)
            frames = rng.random((_CALIBRATION_FRAMES, grid, grid, 3), dtype=np.float32)
            files = {
                variant: convert(
                    model, Path(tmp) / f"g{grid}-{variant}.tflite", _PRECISION[variant], frames
                )
                for variant in VARIANTS
            }
            runners = {
                (delegate, variant): LiteRTRunner(files[variant], threads=threads, xnnpack=delegate)
                for delegate in delegates
                for variant in VARIANTS
            }
            samples = _time_round_robin(runners, frames, repeats, warmup)
            for delegate in delegates:
                base = samples[(delegate, "fp32")]
                for variant in VARIANTS:
                    parts = samples[(delegate, variant)]
                    row = {
                        "grid": grid,
                        "atoms": grid * grid,
                        "variant": variant,
                        "xnnpack": delegate,
                        "threads": threads,
                        "repeats": repeats,
                        "file_bytes": files[variant].stat().st_size,
                    }
                    for part in ("h2d_ms", "compute_ms", "d2h_ms", "total_ms"):
                        row[part] = statistics.median(parts[part])
                    q1, _, q3 = statistics.quantiles(parts["total_ms"], n=4, method="inclusive")
                    row["total_iqr_ms"] = q3 - q1
                    row["speedup_total"] = statistics.median(base["total_ms"]) / row["total_ms"]
                    row["speedup_compute"] = (
                        statistics.median(base["compute_ms"]) / row["compute_ms"]
                    )
                    rows.append(row)
    return rows


def _time_round_robin(
    runners: dict[tuple[bool, str], Any], frames: np.ndarray, repeats: int, warmup: int
) -> dict[tuple[bool, str], dict[str, list[float]]]:
    """Per runner, per part: ms of every timed call; each repeat calls every runner once."""
    samples = {
        key: {"h2d_ms": [], "compute_ms": [], "d2h_ms": [], "total_ms": []} for key in runners
    }
    for i in range(warmup + repeats):
        frame = frames[i % len(frames)][None]
        for key, runner in runners.items():
            # One untimed call first: the other models' weights have just gone through the
            # caches, and a deployed model runs alone, with its own weights cached.
            timing = runner.time_batch1(frame, repeats=1, warmup=1)
            if i < warmup:
                continue
            for part, values in samples[key].items():
                values.append(timing[part])
    return samples


def format_table(rows: list[dict[str, Any]]) -> str:
    """Medians per grid and delegate, ratios against FP32, and the INT8 goal check."""
    lines = []
    header = (
        f"{'grid':>5} {'atoms':>6} {'delegate':>8} {'variant':>7} {'h2d ms':>8} {'compute ms':>10} "
        f"{'d2h ms':>8} {'total ms':>9} {'IQR ms':>7} {'×FP32 total':>11} {'×FP32 compute':>13} "
        f"{'file kB':>8}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for row in rows:
        delegate = "xnnpack" if row["xnnpack"] else "builtin"
        lines.append(
            f"{row['grid']:>5} {row['atoms']:>6} {delegate:>8} {row['variant']:>7} "
            f"{row['h2d_ms']:>8.4f} {row['compute_ms']:>10.4f} {row['d2h_ms']:>8.4f} "
            f"{row['total_ms']:>9.4f} {row['total_iqr_ms']:>7.4f} {row['speedup_total']:>10.2f}× "
            f"{row['speedup_compute']:>12.2f}× {row['file_bytes'] / 1e3:>8.1f}"
        )
    lines.append("")
    lines.append(
        f"INT8 vs FP32 (compute = invoke only), goal >= {MIN_SPEEDUP}× (target {GOAL_SPEEDUP}×):"
    )
    for row in rows:
        if row["variant"] not in ("int8", "dyn-int8"):
            continue
        speedup = row["speedup_compute"]
        verdict = (
            "meets the goal"
            if speedup >= GOAL_SPEEDUP
            else "meets the minimum"
            if speedup >= MIN_SPEEDUP
            else "below the minimum"
        )
        delegate = "xnnpack" if row["xnnpack"] else "builtin"
        lines.append(
            f"  {row['variant']:>8} grid {row['grid']:>3} ({delegate}, "
            f"{row['threads']} thread(s)): "
            f"{speedup:.2f}× compute, {row['speedup_total']:.2f}× total: {verdict}"
        )
    return "\n".join(lines)
