"""Paired timing: a run and its FP32 baseline timed interleaved in one process, and the host.

A speed-up is only meaningful when both sides met the same machine: the same inputs, the same
CPU, the same background load. `paired_timing` calls the two in alternating order (ABBA: run,
baseline, baseline, run, ...) so that a load that drifts during the measurement hits both
alike, and reports the speed-up as the ratio of the two medians (baseline / run, > 1: the run
is faster) with a 95 % bootstrap confidence interval over the pairs. Two timings of separate
jobs are never divided by each other anywhere in sciquant.

Contention is measured, not guessed: the process's CPU time over the wall time of the timed
calls (`cpu_share`, per thread) falls below 1 when another process takes the core away from
it (a time slice lost is wall time without CPU time). Below `CONTENDED_SHARE` the timing is
flagged `contended`. The 1-minute load average and the CPU's int8/bf16 features
(`host_facts`) are recorded beside every timing.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sciquant.errors import SciquantError

__all__ = [
    "CONTENDED_SHARE",
    "CPU_FEATURES",
    "cpu_features",
    "cpu_name",
    "host_facts",
    "int8_class",
    "paired_timing",
    "ratio_of_medians",
]

#: CPU flags that decide how fast int8 and bf16 kernels are (Linux /proc/cpuinfo names).
CPU_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
)
#: Below this share of its wall time on the CPU (per thread), a timing shared its core.
CONTENDED_SHARE = 0.9
BOOTSTRAP_SAMPLES = 2000


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of `CPU_FEATURES` the first CPU has (all False where /proc/cpuinfo is missing)."""
    flags: set[str] = set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return {name: name in flags for name in CPU_FEATURES}


def int8_class(features: dict[str, bool]) -> str:
    """The host's int8 GEMM class: `amx`, `vnni` (AVX-512 or AVX VNNI), `avx2` or `other`.

    On an `avx2` host int8 products run at about the FP32 rate (no dot-product instruction):
    an INT8 speed-up there comes from memory traffic alone, if at all.
    """
    if features.get("amx_int8"):
        return "amx"
    if features.get("avx512_vnni") or features.get("avx_vnni"):
        return "vnni"
    if features.get("avx2"):
        return "avx2"
    return "other"


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux ``model name`` line), else `platform.processor()`."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def host_facts(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's name, int8/bf16 features and class, the usable cores and the load average."""
    features = cpu_features(cpuinfo)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu_name(cpuinfo),
        "cpu_features": features,
        "int8_class": int8_class(features),
        "bf16_native": bool(features["amx_bf16"] or features["avx512_bf16"]),
        "usable_cores": cores,
        "load_average_1min": _load_average(),
    }


def ratio_of_medians(
    baseline: np.ndarray, run: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """median(baseline) / median(run) and its 95 % percentile-bootstrap CI over the pairs.

    `baseline[i]` and `run[i]` were measured back to back (a pair); pairs are resampled
    together, so a load that hit both members of a pair cancels in the ratio.
    """
    baseline = np.asarray(baseline, dtype=np.float64)
    run = np.asarray(run, dtype=np.float64)
    if baseline.shape != run.shape or baseline.ndim != 1 or len(run) == 0:
        raise ValueError("paired times must be two 1-D arrays of the same, non-zero length")
    ratio = float(np.median(baseline) / np.median(run))
    if len(run) < 2:
        return ratio, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(run), size=(samples, len(run)))
    ratios = np.median(baseline[picks], axis=1) / np.median(run[picks], axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return ratio, float(low), float(high)


def paired_timing(
    run: Callable[[], Any],
    baseline: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """Time `run` and `baseline` interleaved (ABBA), `repeats` pairs after `warmup` pairs.

    A call's time is its wall time, or the number of seconds it returns where it returns one
    (a runner that times its own inference, leaving out the harness around it).

    Returns the medians and spreads of both (seconds), the paired speed-up
    (`paired_speedup` = median baseline / median run, with `paired_speedup_ci_low/high`), the
    per-pair times, `cpu_share` (process CPU time / (wall time × `threads`) over the timed
    calls), `contended` (cpu_share < `CONTENDED_SHARE`) and the load average before and after.
    """
    if repeats < 1:
        raise SciquantError(f"paired timing needs at least 1 repeat (got {repeats})")
    load_before = _load_average()
    times: dict[str, list[float]] = {"run": [], "baseline": []}
    calls = {"run": run, "baseline": baseline}
    wall = cpu = 0.0
    for i in range(warmup + repeats):
        order = ("run", "baseline") if i % 2 == 0 else ("baseline", "run")
        for name in order:
            cpu_started = time.process_time()
            started = time.perf_counter()
            returned = calls[name]()
            elapsed = time.perf_counter() - started
            if i >= warmup:
                own = isinstance(returned, int | float) and not isinstance(returned, bool)
                times[name].append(float(returned) if own else elapsed)
                wall += elapsed
                cpu += time.process_time() - cpu_started
    speedup, low, high = ratio_of_medians(np.array(times["baseline"]), np.array(times["run"]))
    share = cpu / (wall * max(threads, 1)) if wall > 0 else float("nan")
    result: dict[str, Any] = {
        "paired_speedup": speedup,
        "paired_speedup_ci_low": low,
        "paired_speedup_ci_high": high,
        "timing_pairs": repeats,
        "cpu_share": share,
        "contended": bool(share < CONTENDED_SHARE),
        "load_average_1min_before": load_before,
        "load_average_1min_after": _load_average(),
        "run_times_s": times["run"],
        "baseline_times_s": times["baseline"],
    }
    for name, values in times.items():
        result[f"{name}_time_s_median"] = statistics.median(values)
        result[f"{name}_time_s_min"] = min(values)
        result[f"{name}_time_s_max"] = max(values)
    return result
