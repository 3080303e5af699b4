"""Retained gain: how much of what the network adds over no network a quantized run keeps.

For one field (blood flow: pressure or flow; a plug-in workload: each error its
`sample_errors` gives), with e_b, e_f and e_q the mean errors over the test simulations (or
samples) of the no-network baseline (blood flow: the calibrated physics prior, `BASELINE`; a
plug-in: its `gain_baseline`), of the FP32 network and of the quantized run:

    gain = e_b − e_f,        retained gain = (e_b − e_q) / (e_b − e_f)          (reported in %)

100 % keeps all of the network's gain, 0 % is no better than no network at all, below 0 is worse
(flagged in the report). The 95 % confidence interval is a paired bootstrap over test
simulations: every resample draws the same simulations for the three errors, so what they share
(a hard simulation is hard for all) cancels. Where the FP32 network has no gain that the test
set can tell from zero (`significant_gain`: one-sided 95 % paired bootstrap), the ratio means
nothing and is not reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: The baseline of the retained gain of blood flow, and of a metrics.json that names none
#: (`gain_baseline`): the calibrated prior (`sciquant.workloads.bloodflow.physics`).
BASELINE = "calibrated_model"
RESAMPLES = 2000
FP32_RUN = ("reference", "none", "fp32")  # (target, method, precision) of the FP32 network


def retained_gain(
    baseline: Sequence[float],
    fp32: Sequence[float],
    quantized: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(retained gain, CI low, CI high) in % from per-simulation errors, paired by position.

    NaN for all three where the FP32 network has no significant gain over the baseline.
    """
    b, f, q = (np.asarray(v, dtype=np.float64) for v in (baseline, fp32, quantized))
    if not (len(b) == len(f) == len(q)) or len(b) == 0:
        raise ValueError("retained_gain: the three error lists must be non-empty and paired")
    if not significant_gain(b, f, resamples, seed):
        return math.nan, math.nan, math.nan
    gain = float(np.mean(b - f))
    value = 100 * float(np.mean(b - q)) / gain
    draws = np.random.default_rng(seed).integers(len(b), size=(resamples, len(b)))
    gains = (b - f)[draws].mean(axis=1)
    kept = (b - q)[draws].mean(axis=1)
    ratios = 100 * kept[gains > 0] / gains[gains > 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return value, float(low), float(high)


def gain_lower_bound(
    baseline: Sequence[float], fp32: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The FP32 network's mean gain over the baseline and its one-sided 95 % lower bound.

    Paired bootstrap over test simulations: the bound is the 5th percentile of the resampled
    mean gain (in the errors' units, percentage points).
    """
    gains = np.asarray(baseline, dtype=np.float64) - np.asarray(fp32, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(len(gains), size=(resamples, len(gains)))
    return float(gains.mean()), float(np.percentile(gains[draws].mean(axis=1), 5.0))


def significant_gain(
    baseline: Sequence[float], fp32: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> bool:
    """Whether the FP32 network's gain over the baseline is > 0 with 95 % confidence.

    A gain within the test set's noise has no share to retain: a ratio over it would swing
    between large positive and negative values.
    """
    if len(baseline) == 0:
        return False
    return gain_lower_bound(baseline, fp32, resamples, seed)[1] > 0


def field_name(error: str) -> str:
    """The field of a per-simulation error metric, as the gain metrics name it:
    `pressure_error_pct` → `pressure` (`retained_gain_pressure_pct`), `rmse` → `rmse`."""
    return error.removesuffix("_pct").removesuffix("_error")


def error_fields(*sources: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The error metrics every simulation of every source has, in the first one's order."""
    tables = [table for source in sources for table in source.values()]
    if not tables:
        return []
    return [key for key in tables[0] if all(key in table for table in tables)]


def _paired_errors(
    key: str, names: list[str], *sources: Mapping[str, Mapping[str, float]]
) -> list[list[float]] | None:
    """Each source's error `key` over `names`, in that order (None if one lacks it)."""
    try:
        return [[float(source[n][key]) for n in names] for source in sources]
    except (KeyError, TypeError, ValueError):
        return None


def network_gains(
    baseline: Mapping[str, Mapping[str, float]], fp32: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """The FP32 network's gain per field: `network_gain_<field>_pct` (percentage points) and its
    one-sided 95 % lower bound `network_gain_<field>_pct_ci_low`."""
    names = sorted(set(baseline) & set(fp32))
    metrics: dict[str, float] = {}
    for key in error_fields(baseline, fp32) if names else ():
        errors = _paired_errors(key, names, baseline, fp32)
        if errors is None:
            continue
        gain, low = gain_lower_bound(*errors)
        field = field_name(key)
        metrics[f"network_gain_{field}_pct"] = gain
        metrics[f"network_gain_{field}_pct_ci_low"] = low
    return metrics


def run_gains(
    baseline: Mapping[str, Mapping[str, float]],
    fp32: Mapping[str, Mapping[str, float]],
    quantized: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """Retained-gain metrics of one run from per-simulation errors {simulation: {metric: %}}.

    Metrics `retained_gain_<field>_pct` and its `_ci_low` / `_ci_high`, over the simulations
    all three have.
    """
    names = sorted(set(baseline) & set(fp32) & set(quantized))
    metrics: dict[str, float] = {}
    for key in error_fields(baseline, fp32, quantized) if names else ():
        errors = _paired_errors(key, names, baseline, fp32, quantized)
        if errors is None:
            continue
        value, low, high = retained_gain(*errors)
        field = field_name(key)
        metrics[f"retained_gain_{field}_pct"] = value
        metrics[f"retained_gain_{field}_pct_ci_low"] = low
        metrics[f"retained_gain_{field}_pct_ci_high"] = high
    return metrics


#: Prefix of the retained gain pooled over seeds (`pooled_gains`): `pooled_retained_gain_…`.
POOLED_PREFIX = "pooled_"


def seed_mean_errors(
    tables: Sequence[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Per simulation every seed's table has, each error metric they all have averaged over the
    seeds: {simulation: {metric: mean over seeds}}."""
    names = sorted(set.intersection(*(set(table) for table in tables))) if tables else []
    averaged: dict[str, dict[str, float]] = {}
    for name in names:
        keys = [k for k in tables[0][name] if all(k in table[name] for table in tables)]
        try:
            averaged[name] = {k: float(np.mean([float(t[name][k]) for t in tables])) for k in keys}
        except (TypeError, ValueError):
            continue
    return averaged


def pooled_gains(
    baselines: Sequence[Mapping[str, Mapping[str, float]]],
    fp32: Sequence[Mapping[str, Mapping[str, float]]],
    quantized: Sequence[Mapping[str, Mapping[str, float]]],
) -> dict[str, float]:
    """The retained gain of one (target, method, precision) pooled over its seeds.

    The three sequences hold one per-simulation table per seed, paired by position (seed s's
    baseline, its FP32 network and its quantized run). Each simulation's errors are averaged
    over the seeds first, so the ratio is Σ_s Σ_i (e_b − e_q) / Σ_s Σ_i (e_b − e_f) over the
    simulations every seed has, and its paired bootstrap resamples simulations (the same draw
    for every seed): one value and an interval from the same runs, where a mean of the seeds'
    own ratios would stand beside one seed's interval. The interval is over test simulations
    for these seeds; how much another seed moves the ratio it does not tell.

    Metrics `pooled_retained_gain_<field>_pct` and `_ci_low` / `_ci_high`; none with fewer
    than two seeds.
    """
    if not (len(baselines) == len(fp32) == len(quantized)) or len(fp32) < 2:
        return {}
    pooled = run_gains(
        seed_mean_errors(baselines), seed_mean_errors(fp32), seed_mean_errors(quantized)
    )
    return {f"{POOLED_PREFIX}{name}": value for name, value in pooled.items()}
