"""Batch-1 latency of a classifier runner, one way for every backend.

A runner times one frame as three parts, `h2d` (input into the runtime), `compute` and `d2h`
(output back to numpy), in milliseconds; `batch1_latency` calls it on the frames in turn,
drops the warm-up calls and reports each part's median and the whole call's median and spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from sciquant.errors import SciquantError

PARTS = ("h2d_ms", "compute_ms", "d2h_ms")


def batch1_latency(
    time_one: Callable[[np.ndarray], dict[str, float]],
    x: np.ndarray,
    repeats: int,
    warmup: int,
) -> dict[str, float]:
    """Medians of `PARTS` over `repeats` single frames of `x` (cycled) after `warmup` calls.

    time_one(frame [1, ...]) -> {"h2d_ms", "compute_ms", "d2h_ms"}; the total is the wall time
    of the whole call. Returns the part medians, total_ms (median), total_ms_min,
    total_ms_max and repeats.
    """
    if len(x) == 0:
        raise SciquantError("no frames to time; the test split is empty")
    if repeats < 1:
        raise SciquantError(f"latency repeats must be at least 1 (got {repeats})")
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    totals = []
    for i in range(warmup + repeats):
        frame = x[i % len(x)][None]
        started = time.perf_counter()
        timing = time_one(frame)
        total = (time.perf_counter() - started) * 1e3
        if i < warmup:
            continue
        for part in PARTS:
            parts[part].append(timing[part])
        totals.append(total)
    result = {part: statistics.median(values) for part, values in parts.items()}
    result["total_ms"] = statistics.median(totals)
    result["total_ms_min"] = min(totals)
    result["total_ms_max"] = max(totals)
    result["repeats"] = float(repeats)
    return result


def timing_summary(timings: list[dict[str, float]]) -> dict[str, float]:
    """A step runner's per-call timings (`h2d`, `compute`, `d2h` in ms) as the number of calls
    and each part's median and interquartile range; empty where nothing was timed."""
    if not timings:
        return {}
    summary = {"calls": float(len(timings))}
    for key in ("h2d", "compute", "d2h"):
        values = [timing[key] for timing in timings]
        summary[f"{key}_median"] = statistics.median(values)
        if len(values) > 1:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            summary[f"{key}_iqr"] = q3 - q1
    return summary
