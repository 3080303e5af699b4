"""The report a person reads: one self-contained HTML page (figures embedded as base64 PNG).

Per (dataset, model): what to deploy on each target under the error budget, the table of every
target × method × precision (mean ± 95 % CI over seeds, speed-up over FP32) and the figures.
Every number is the cube's value through `format_value`; table cells also carry it unrounded in
`data-value` (and `data-ci`, `data-n`), so a reader or a test can check them.

A run whose errors or scores came out NaN or infinite (the cube's `diverged`) is shown as
diverged, never as missing: its row has the class `diverged`, `data-diverged` (in how many seeds)
and a ✗ mark beside its seed count; each metric that diverged says so in its cell (with
`data-diverged`, its seeds) instead of a dash; the table's notes count the diverged runs. A
combination that was not run has no row.
"""

from __future__ import annotations

import base64
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from sciquant.errors import SciquantError
from sciquant.provenance import atomic_path
from sciquant.quant.debug import OVERFLOW_RISK
from sciquant.quant.spec import parse_precision
from sciquant.quant.targets import TARGETS
from sciquant.report import figures
from sciquant.report.cube import (
    LAYER_DIM,
    LAYER_SQNR,
    Constraint,
    Deployment,
    Estimate,
    RunKey,
    applicable_constraints,
    check_budget_metrics,
    choose_deployments,
    contended_runs,
    diverged_metric_seeds,
    diverged_runs,
    headline_metrics,
    load_cube,
    parse_budget,
    quality_metrics,
    seed_estimates,
    speedup_metric,
    speedups,
    time_metric,
    workload_slices,
)
from sciquant.report.gain import BASELINE as GAIN_BASELINE
from sciquant.report.gain import FP32_RUN, POOLED_PREFIX, field_name
from sciquant.vocabulary import MIXED

SIMULATED_NOTE = (
    "* simulated: a bit-width the target does not run natively, evaluated as fake-quantization "
    "under the target's scheme; its errors are the simulation's, and it is not timed (a "
    "fake-quant run's time is not a low-precision kernel's)."
)
REFERENCE_BASELINE_NOTE = (
    "‡ this target has no FP32 run: speed-up relative to the reference FP32 (another runtime)."
)
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
#: The first bytes of a file of each image type: a figure whose content is not what its name
#: says is left out, not embedded as an image no browser shows.
IMAGE_SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}

STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       line-height: 1.45; color: #1d1d1f; background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.5rem; margin: 0.5rem 0; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 2px solid #ddd; }
h3 { font-size: 1.05rem; margin-top: 1.5rem; }
code { word-break: break-all; }
.meta, .note, figcaption { color: #555; font-size: 0.9rem; }
.table-scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: 0.5rem 0 1rem;
                border: 1px solid #e5e5e5; }
table { border-collapse: collapse; font-size: 0.88rem; white-space: nowrap; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f7; position: sticky; top: 0; }
th.label, td.label { text-align: left; }
tr.baseline td { font-weight: 600; }
tr.group-start td { border-top: 2px solid #ccc; }
tr.diverged { background: #fff3f3; }
.diverged-mark { color: #b00020; font-weight: 600; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; display: block; }
nav ul { padding-left: 1.2rem; }
details { margin: 0.5rem 0; }
@media (max-width: 600px) { main { padding: 0.6rem; } h1 { font-size: 1.25rem; }
                            table { font-size: 0.8rem; } }
"""


def significant_decimals(value: float, digits: int) -> int:
    """Decimals that show `value` to `digits` significant digits."""
    return max(0, digits - 1 - math.floor(math.log10(abs(value))))


def format_value(value: float, digits: int = 4) -> str:
    """A number as the report shows it: integers whole, others to `digits` significant digits."""
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{significant_decimals(value, digits)}f}"


def format_estimate(estimate: Estimate) -> str:
    """`mean ± half-width` (half-width to 2 significant digits); the mean alone for one seed."""
    if estimate.n < 2 or math.isnan(estimate.half_width):
        return format_value(estimate.mean)
    return f"{format_value(estimate.mean)} ± {format_value(estimate.half_width, digits=2)}"


def estimate_cell(
    metric: str, estimate: Estimate | None, suffix: str = "", diverged: int = 0
) -> str:
    """A table cell with the formatted estimate and its unrounded value in data attributes.

    `diverged`: in how many seeds this metric came out NaN or infinite; the cell then says so
    (`data-diverged`), after the mean of the other seeds where there is one, else instead of a
    dash.
    """
    mark = ""
    if diverged:
        seeds = f"{diverged} seed{'s' if diverged > 1 else ''}"
        text = "✗ diverged" + (f" in {seeds}" if estimate is not None else f" ({seeds})")
        mark = f' <span class="diverged-mark">{escape(text)}</span>'
    flag = f' data-diverged="{diverged}"' if diverged else ""
    if estimate is None:
        return f'<td data-metric="{escape(metric)}"{flag}>{mark.strip() or "—"}</td>'
    return (
        f'<td data-metric="{escape(metric)}" data-value="{estimate.mean!r}" '
        f'data-ci="{estimate.half_width!r}" data-n="{estimate.n}"{flag}>'
        f"{escape(format_estimate(estimate))}{suffix}{mark}</td>"
    )


def table(head: Sequence[str], rows: Sequence[str], css_class: str, data: str = "") -> str:
    """A horizontally scrollable table of already rendered `<th>`s and `<tr>`s."""
    thead = f"<thead><tr>{''.join(head)}</tr></thead>" if head else ""
    return (
        f'<div class="table-scroll"><table class="{css_class}"{data}>{thead}'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def precision_label(precision: str, simulated: bool) -> str:
    return f"{precision}*" if simulated else precision


def results_table(dataset: str, model: str, runs: xr.Dataset) -> str:
    """Every (target, method, precision) run: seeds, headline metrics, speed-up over FP32."""
    metrics = headline_metrics(runs)
    diverged_metrics = diverged_metric_seeds(runs)
    # A metric that diverged in every run it was measured in still gets its column.
    metrics += [
        name
        for name in dict.fromkeys(n for by_name in diverged_metrics.values() for n in by_name)
        if name in runs and name not in metrics
    ]
    estimates = {name: seed_estimates(runs[name]) for name in metrics}
    simulated = seed_estimates(runs["simulated"])
    diverged = diverged_runs(runs)
    time_name = time_metric(runs)
    gains, baselines = speedups(runs) if speedup_metric(runs) else (None, {})
    if gains is not None:
        estimates["speedup"] = seed_estimates(gains)
    suffixes = retained_gain_suffixes(runs, metrics)
    if gains is not None:
        suffixes["speedup"] = speedup_suffixes(runs)
    head = [f'<th class="label">{label}</th>' for label in ("target", "method", "precision")]
    head.append("<th>seeds</th>")
    head += [
        f'<th data-metric="{escape(n)}" title="{escape(n)}">{escape(figures.metric_label(n))}</th>'
        for n in metrics
    ]
    if gains is not None:
        head.append('<th data-metric="speedup">speed-up over FP32 [×]</th>')
    rows = []
    previous_target = None
    for key in simulated:  # in cube order: grouped by target, its FP32 first
        target = key[0]
        against_reference = baselines.get(target, target) != target
        first_of_target = target != previous_target
        rows.append(
            result_row(
                key,
                simulated[key],
                estimates,
                against_reference,
                first_of_target,
                suffixes,
                diverged.get(key, 0),
                diverged_metrics.get(key, {}),
            )
        )
        previous_target = target
    data = f' data-dataset="{escape(dataset)}" data-model="{escape(model)}"'
    notes = results_notes(simulated, baselines, time_name, sum(diverged.values()))
    notes += capped_bits_note(list(simulated))
    if any(name.startswith("retained_gain") for name in suffixes):
        notes += f'<p class="note">{RETAINED_GAIN_NOTE}</p>'
    return table(head, rows, "results", data) + notes


SPEEDUP_NOTE = (
    "Speed-ups are paired: each timed run's evaluation timed it and its target's FP32 "
    "interleaved in one process on the same inputs; the ratio of the two medians (the "
    "network's calls alone, as <code>sciquant bench rollout</code> times them, where the "
    "runtime allows) with, in brackets, its 95 % bootstrap interval over the pairs (seed 0's "
    "where several seeds ran). ⚠ contended: the timing got less than 90 % of its wall time on "
    "the CPU (another process shared the core); rerun it alone. Times of separate jobs are "
    "never divided."
)


def speedup_suffixes(runs: xr.Dataset) -> dict[RunKey, str]:
    """Per run: its paired speed-up's bootstrap interval, and a flag where it was contended."""
    name = speedup_metric(runs)
    suffixes: dict[RunKey, str] = {}
    if name is None:
        return suffixes
    contended = contended_runs(runs)
    first_seed = runs.isel(seed=0)
    low = high = {}
    if f"{name}_ci_low" in runs:
        low = seed_estimates(first_seed[f"{name}_ci_low"].expand_dims("seed"))
        high = seed_estimates(first_seed[f"{name}_ci_high"].expand_dims("seed"))
    for key in seed_estimates(runs[name]):
        text = ""
        if key in low and key in high:
            text = f" [{format_value(low[key].mean, 3)}, {format_value(high[key].mean, 3)}]"
        if key in contended:
            text += " ⚠ contended"
        suffixes[key] = text
    return suffixes


RETAINED_GAIN_NOTE = (
    "Retained gain: (baseline error − the run's) / (baseline error − FP32 network's), per "
    "field, the baseline being the calibrated physics prior with no network (below the "
    "table); 100 % keeps all the network adds, below 0 is worse than no network at all. In "
    "brackets: its 95 % paired bootstrap interval over the test simulations. Where several "
    "seeds ran, the cell's value is the mean of the seeds' own ratios (± its t interval over "
    "seeds) and beside it the ratio pooled over the seeds (each test simulation's errors "
    "averaged over them first) with that pooled ratio's interval over simulations, which says "
    "nothing about how another seed would move it (seed 0's interval, so marked, where the cube "
    "has no pooled ratio)."
)


def retained_gain_suffixes(
    runs: xr.Dataset, metrics: Sequence[str]
) -> dict[str, dict[RunKey, str]]:
    """Per retained-gain metric and run: its bootstrap interval, and a flag where it is < 0."""
    suffixes: dict[str, dict[RunKey, str]] = {}
    for name in metrics:
        if not name.startswith("retained_gain") or f"{name}_ci_low" not in runs:
            continue
        first_seed = runs.isel(seed=0)
        low = seed_estimates(first_seed[f"{name}_ci_low"].expand_dims("seed"))
        high = seed_estimates(first_seed[f"{name}_ci_high"].expand_dims("seed"))
        pooled = pooled_values(runs, name)
        value = seed_estimates(runs[name])
        suffixes[name] = {}
        several = runs.sizes.get("seed", 1) > 1
        for key, estimate in value.items():
            text = ""
            if key in pooled:  # several seeds: the pooled ratio and its interval
                mid, lo, hi = (format_value(v, 3) for v in pooled[key])
                text = f" pooled {mid} [{lo}, {hi}]"
            elif key in low and key in high:  # one seed, or a cube without the pooled ratio
                text = f" [{format_value(low[key].mean, 3)}, {format_value(high[key].mean, 3)}]"
                text += " (seed 0)" if several and estimate.n > 1 else ""
            if estimate.mean < 0:
                text += " ✗ worse than no network"
            suffixes[name][key] = text
    return suffixes


def pooled_values(runs: xr.Dataset, name: str) -> dict[RunKey, tuple[float, float, float]]:
    """Per run: the retained gain `name` pooled over seeds and its interval (value, low, high),
    where the cube has it (`sciquant.report.cube.pooled_retained_gains`)."""
    names = [f"{POOLED_PREFIX}{name}{suffix}" for suffix in ("", "_ci_low", "_ci_high")]
    if any(n not in runs or "seed" in runs[n].dims for n in names):
        return {}
    values = [runs[n].transpose("target", "method", "precision") for n in names]
    labels = [[str(v) for v in values[0][dim].values] for dim in values[0].dims]
    pooled = {}
    for index in zip(*np.nonzero(values[0].notnull().values), strict=True):
        key = tuple(labels[d][i] for d, i in enumerate(index))
        pooled[key] = tuple(float(v.values[index]) for v in values)
    return pooled


def result_row(
    key: RunKey,
    simulated: Estimate,
    estimates: dict[str, dict[RunKey, Estimate]],
    against_reference: bool,
    first_of_target: bool,
    suffixes: dict[str, dict[RunKey, str]] | None = None,
    diverged: int = 0,
    diverged_metrics: dict[str, int] | None = None,
) -> str:
    """One run's row: labels (precision marked `*` where simulated), seeds, metric cells.

    `diverged`: in how many seeds the run diverged (row class `diverged`, `data-diverged` and a
    mark beside the seed count); `diverged_metrics`: per metric, in how many seeds it did.
    """
    target, method, precision = key
    classes = ["baseline"] if (method, precision) == ("none", "fp32") else []
    if first_of_target:
        classes.append("group-start")
    seeds = f"n={simulated.n}"
    if diverged:
        classes.append("diverged")
        seeds += f' <span class="diverged-mark">✗ {diverged} diverged</span>'
    cells = [
        f'<td class="label">{escape(target)}</td>',
        f'<td class="label">{escape(method)}</td>',
        f'<td class="label">{escape(precision_label(precision, simulated.mean > 0))}</td>',
        f"<td>{seeds}</td>",
    ]
    for name, by_run in estimates.items():
        marker = " ‡" if name == "speedup" and against_reference else ""
        marker += (suffixes or {}).get(name, {}).get(key, "")
        count = (diverged_metrics or {}).get(name, 0)
        cells.append(estimate_cell(name, by_run.get(key), marker, count))
    flag = f' data-diverged="{diverged}"' if diverged else ""
    return (
        f'<tr class="{" ".join(classes)}" data-target="{escape(target)}" '
        f'data-method="{escape(method)}" data-precision="{escape(precision)}"{flag}>'
        + "".join(cells)
        + "</tr>"
    )


def diverged_note(count: int) -> str:
    """The note counting a table's diverged runs (one run: one seed of a row)."""
    runs = f"{count} run{'s' if count > 1 else ''}"
    return (
        f"✗ diverged: {runs} (a seed of a target × method × precision) gave NaN or infinite "
        "errors or scores, marked in their rows and cells. A cell's mean is over the seeds "
        "whose value stayed finite, and a configuration that diverged in any seed is never "
        "chosen to deploy. A run that was not made has no row. Check the "
        "diverged runs' training and quantization, and rerun them."
    )


def results_notes(
    simulated: dict[RunKey, Estimate],
    baselines: dict[str, str],
    time_name: str | None,
    diverged: int = 0,
) -> str:
    """The footnotes the table needs: diverged runs (`diverged`: how many), simulated
    precisions, reference baselines, statistics."""
    notes = [diverged_note(diverged)] if diverged else []
    if any(e.mean > 0 for e in simulated.values()):
        notes.append(SIMULATED_NOTE)
    if any(baselines.get(t, t) != t for t in {key[0] for key in simulated}):
        notes.append(REFERENCE_BASELINE_NOTE)
    if time_name:
        notes.append(SPEEDUP_NOTE)
    notes.append("Mean ± 95 % confidence interval over seeds (t-distribution); n: seeds.")
    return "".join(f'<p class="note">{note}</p>' for note in notes)


def budget_text(constraints: Sequence[Constraint]) -> str:
    return " and ".join(c.describe() for c in constraints)


def deploy_table(
    deployments: Sequence[Deployment], constraints: Sequence[Constraint], time_name: str | None
) -> str:
    """Per target: the precision and method to deploy, the checks it passed, its speed."""
    head = [
        f'<th class="label">{label}</th>'
        for label in ("target", "deploy", "method", "within budget", "why")
    ]
    time_label = figures.metric_label(time_name) if time_name else "time"
    head += [f"<th>{escape(time_label)}</th>", "<th>speed-up over FP32 [×]</th>"]
    rows = []
    for choice in deployments:
        checks = "; ".join(
            f"{figures.metric_label(c.constraint.metric)} {format_value(c.value)} "
            f"{c.constraint.sign} {format_value(c.threshold)}"
            for c in choice.checks
        )
        rows.append(
            f'<tr data-target="{escape(choice.target)}" '
            f'data-precision="{escape(choice.precision or "")}" '
            f'data-method="{escape(choice.method or "")}">'
            f'<td class="label">{escape(choice.target)}</td>'
            f'<td class="label"><strong>{escape(choice.precision or "—")}</strong></td>'
            f'<td class="label">{escape(choice.method or "—")}</td>'
            f'<td class="label">{escape(checks or "—")}</td>'
            f'<td class="label">{escape(choice.reason)}</td>'
            + estimate_cell("time", choice.time)
            + estimate_cell("speedup", choice.speedup)
            + "</tr>"
        )
    budget = (
        f'<p class="note">Budget: {escape(budget_text(constraints))} (means over seeds; FP32 of '
        "the target's FP32 graph, else the reference's). Simulated precisions are not "
        "candidates.</p>"
    )
    return budget + table(head, rows, "deploy")


BASELINE_NAMES = {
    "lumped_model": "the lumped tree's own response to the inflow (the physics prior, no network)",
    "calibrated_model": "the same prior with its wall stiffness and viscosity fitted per "
    "simulation to the inlet's systolic and diastolic pressure (inputs known at inference; no "
    "network): the baseline of the retained gain",
    "expansion_calibrated_model": "the lumped prior with the Borda–Carnot loss of every widening "
    "of the graph (a stenosis's throat and its recovery) linearized about the cycle's flow, "
    "calibrated the same way (geometry and inputs known at inference; no network)",
}


def baselines_note(dataset: str, runs: xr.Dataset) -> str:
    """What the dataset's baselines (not runs) score on the same test data, or nothing."""
    try:
        baselines = json.loads(str(runs.attrs.get("baselines", "{}"))).get(dataset, {})
        gain_baseline = json.loads(str(runs.attrs.get("gain_baselines", "{}"))).get(dataset)
    except json.JSONDecodeError:
        return ""
    gain_baseline = gain_baseline or GAIN_BASELINE
    sentences = []
    for name, values in baselines.items():
        scores = ", ".join(
            f"{figures.metric_label(metric)} {format_value(value)}"
            for metric, value in values.items()
        )
        if scores:
            label = BASELINE_NAMES.get(name, name.replace("_", " "))
            if name == gain_baseline and name not in BASELINE_NAMES:
                label += ": the baseline of the retained gain"
            sentences.append(f"{escape(label)}: {escape(scores)}")
    if not sentences:
        return ""
    return (
        '<p class="note baseline-note">Without a network, on the same test data: '
        + "; ".join(sentences)
        + ".</p>"
        + weaker_baseline_note(baselines, gain_baseline, runs)
        + no_gain_note(baselines.get(gain_baseline, {}), runs, gain_baseline)
    )


def gain_baseline_label(name: str) -> str:
    """How the notes name the retained gain's baseline `name`."""
    if name == GAIN_BASELINE:
        return "the calibrated prior"
    return f"the {name.replace('_', ' ')} baseline"


def weaker_baseline_note(
    baselines: dict[str, dict[str, float]],
    gain_baseline: str = GAIN_BASELINE,
    runs: xr.Dataset | None = None,
) -> str:
    """A note for each error on which the retained gain's baseline (`gain_baseline`) errs more
    than another no-network baseline: the gain is then measured against the weaker of the two,
    and the network's margin over the stronger one is smaller than the gain suggests. With
    `runs`, the FP32 network's error beside the best baseline's on those errors, flagged where
    it does not beat it."""
    chosen = baselines.get(gain_baseline, {})
    fields, against_best = [], []
    for metric, value in chosen.items():
        if not metric.endswith("_error_pct") or not isinstance(value, int | float):
            continue
        best = min(
            (v for v in (b.get(metric) for b in baselines.values()) if isinstance(v, int | float)),
            default=value,
        )
        fp32 = _fp32_value(runs, metric) if runs is not None and best < value else math.nan
        if not math.isnan(fp32) and best > 0:
            mark = "✗ " if fp32 >= best else ""
            against_best.append(
                f"{mark}{figures.metric_label(metric)}: FP32 network {format_value(fp32)} against "
                f"{format_value(best)} (×{fp32 / best:.2f})"
            )
        for name, other in baselines.items():
            better = other.get(metric) if name != gain_baseline else None
            if isinstance(better, int | float) and better < value:
                label = BASELINE_NAMES.get(name, name.replace("_", " ")).split(" (")[0]
                fields.append(
                    f"{figures.metric_label(metric)}: {format_value(value)} against "
                    f"{format_value(better)} for {label}"
                )
    if not fields:
        return ""
    label = gain_baseline_label(gain_baseline)
    return (
        '<p class="note weaker-baseline-note">! The retained gain\'s baseline, '
        f"{escape(label.removeprefix('the '))}, errs more than another baseline without a "
        f"network ({escape('; '.join(fields))}): the network's margin over the best no-network "
        f"answer is smaller than its gain over {escape(label)}.</p>"
    ) + (
        '<p class="note weaker-baseline-note">Against the best no-network answer: '
        f"{escape('; '.join(against_best))}"
        + (" (✗: the network does not beat it there)" if any("✗" in a for a in against_best)
           else "")
        + ".</p>"
        if against_best
        else ""
    )  # fmt: skip


#: The FP32 network's run in a cube's (target, method, precision) coordinates.
FP32_SELECTION = dict(zip(("target", "method", "precision"), FP32_RUN, strict=True))


def _fp32_value(runs: xr.Dataset, metric: str) -> float:
    """The FP32 network's `metric` (mean over seeds), NaN where the runs do not have it."""
    try:
        return float(runs[metric].sel(FP32_SELECTION).mean())
    except (KeyError, ValueError):
        return math.nan


def training_note(dataset: str, runs: xr.Dataset) -> str:
    """The FP32 network's errors on some of its training simulations beside its test errors,
    each against the calibrated prior on the same simulations: whether its gain holds on trees
    it has not seen (`evaluate.training_simulations`), or nothing where they were not measured."""
    try:
        baseline = json.loads(str(runs.attrs.get("baselines", "{}"))).get(dataset, {})
        prior = baseline.get(GAIN_BASELINE, {})
        values = {
            name: float(runs[name].sel(FP32_SELECTION).mean())
            for name in ("training_simulations", "training_pressure_error_pct",
                         "training_flowrate_error_pct", "training_calibrated_pressure_error_pct",
                         "training_calibrated_flowrate_error_pct", "pressure_error_pct",
                         "flowrate_error_pct")
        }  # fmt: skip
    except (KeyError, ValueError, json.JSONDecodeError):
        return ""
    if any(math.isnan(v) for v in values.values()) or not prior:
        return ""
    parts, fitted = [], []
    for field, label in (("pressure", "pressure"), ("flowrate", "flow")):
        train = values[f"training_{field}_error_pct"]
        train_prior = values[f"training_calibrated_{field}_error_pct"]
        test, test_prior = values[f"{field}_error_pct"], prior.get(f"{field}_error_pct")
        if not isinstance(test_prior, int | float) or train_prior <= 0 or test_prior <= 0:
            return ""
        train_ratio, test_ratio = train / train_prior, test / test_prior
        parts.append(
            f"{label}: {format_value(train)} % against {format_value(train_prior)} % on training "
            f"trees (×{train_ratio:.2f}), {format_value(test)} % against "
            f"{format_value(test_prior)} % on test trees (×{test_ratio:.2f})"
        )
        if train_ratio < 1 <= test_ratio:
            fitted.append(label)
    note = (
        f'<p class="note training-note">The FP32 network on {int(values["training_simulations"])}'
        " of its training simulations and on the test simulations, each against the calibrated "
        f"prior on the same trees: {escape('; '.join(parts))}.</p>"
    )
    if fitted:
        note += (
            '<p class="note training-note">✗ On '
            f"{escape(' and '.join(fitted))} the network beats the calibrated prior on the trees "
            "it was trained on but not on the test trees: what it learned is fitted to those "
            "trees, not physics that carries over to unseen ones.</p>"
        )
    return note


def no_gain_note(
    baseline: dict[str, float], runs: xr.Dataset, gain_baseline: str = GAIN_BASELINE
) -> str:
    """A warning for each field on which the FP32 network does not beat the gain's baseline
    (`gain_baseline`, named `baseline` here)."""
    fields = []
    for metric, value in baseline.items():
        bound = runs.get(f"network_gain_{field_name(metric)}_pct_ci_low")
        if metric not in runs or not (metric.endswith("_error_pct") or bound is not None):
            continue
        fp32 = _fp32_value(runs, metric)
        if math.isnan(fp32):  # no FP32 run of it, or its value missing: nothing to say
            continue
        untold = bound is not None and not bool((bound.sel(FP32_SELECTION) > 0).any())
        if fp32 >= value or untold:
            fields.append(
                f"{figures.metric_label(metric)}: FP32 network {format_value(fp32)}, no network "
                f"{format_value(value)}"
            )
    if not fields:
        return ""
    return (
        '<p class="note no-gain-note">✗ The FP32 network does not beat '
        f"{escape(gain_baseline_label(gain_baseline))} without a network by more than the test "
        f"set's noise ({escape('; '.join(fields))}; one-sided 95 % paired bootstrap): it has "
        "no gain for quantization to keep, and its runs' retained gain is not reported.</p>"
    )


#: The agreement of a deployed run with its simulation (`sciquant.quant.debug`), per unit.
AGREEMENT_COLUMNS = (
    ("sim_vs_deployed_max_steps", "sim vs runtime, max [output steps]"),
    ("sim_vs_deployed_median_steps", "sim vs runtime, median [output steps]"),
    ("sim_vs_deployed_max_rel_rms", "sim vs runtime, max [× output RMS]"),
    ("sim_vs_deployed_median_rel_rms", "sim vs runtime, median [× output RMS]"),
)
DEBUG_NOTE = (
    "Per-layer output SQNR = 10·log10(Σ y_FP32² / Σ (y_quantized − y_FP32)²) of each quantized "
    "layer's output on a few calibration inputs, with every earlier layer quantized too (errors "
    "propagate): the first layer where it drops is where the network loses precision; ∞: the "
    "layer's quantized output is exact. Its FP32 reference is the run's own weights with the "
    "quantizers off (for QAT, the fine-tuned ones). Sim vs runtime: |simulated − deployed| "
    "output of a runtime run and of the fake-quant simulation it was deployed from, on the same "
    "test inputs, max and median over all output values, in steps of a quantized output (LiteRT "
    "int8) or relative to the output's RMS (a float output). Mean over seeds; the worst layer "
    "is the one with the lowest mean."
)


def capped_bits_note(keys: Sequence[tuple[str, str, str]]) -> str:
    """A note naming the rows whose target stores fewer weight bits than their precision says
    (a target's `weight_scheme.max_bits`, as openvino-avx2's 7), or "" where none does."""
    capped = []
    for target, method, precision in keys:
        row = TARGETS.get(target)
        if row is None:
            continue
        if precision == MIXED:  # bits per layer: the 8-bit ones as the target stores them
            named, what = 8, "8-bit layers"
        else:
            try:
                parsed = parse_precision(precision)
            except SciquantError:
                continue
            if parsed.kind != "int":
                continue
            named, what = parsed.weight_bits, "weights"
        bits = row.weight_spec(named).bits
        if bits < named:
            capped.append(f"{target} · {method} · {precision}: {what} in {bits} bits")
    if not capped:
        return ""
    return (
        f'<p class="note capped-bits-note">Fewer weight bits than the precision names, as the '
        f"target stores them: {escape('; '.join(capped))}.</p>"
    )


def overflow_note(runs: xr.Dataset) -> str:
    """A warning naming the runs whose runtime's int8 GEMM may saturate on the CPU that
    evaluated them (`OVERFLOW_RISK`), or "" where none may."""
    if OVERFLOW_RISK not in runs or not bool((runs[OVERFLOW_RISK] > 0).any()):
        return ""
    flagged = [
        " · ".join(key)
        for key, estimate in seed_estimates(runs[OVERFLOW_RISK]).items()
        if estimate.mean > 0
    ]
    return (
        '<p class="note overflow-note">⚠ int8 overflow: '
        f"{escape(', '.join(flagged))} ran OpenVINO INT8 with weights beyond 7 bits on a CPU "
        "without VNNI, where its int8 GEMM saturates the int16 sums of u8 × s8 products: its "
        "errors are the runtime's on this CPU, not the quantization's (see sim vs runtime "
        "below). Quantize for target openvino-avx2 (weights in [-63, 63]), or evaluate on a "
        "CPU with VNNI or AMX.</p>"
    )


def debug_section(runs: xr.Dataset) -> str:
    """Quantization debugging of these runs, where their metrics have it: per run the worst
    layer's output SQNR and the simulation's agreement with its runtime, and the per-layer
    SQNR table (one column per run) folded away below it. Empty where no run has any."""
    layer_means = None
    if LAYER_SQNR in runs and bool(runs[LAYER_SQNR].notnull().any()):
        values = runs[LAYER_SQNR]
        with warnings.catch_warnings():  # a run absent in every seed: an empty mean, NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            layer_means = values.mean("seed", skipna=True)
        layer_means = layer_means.isel({LAYER_DIM: values.notnull().any(
            [d for d in values.dims if d != LAYER_DIM]).values})  # fmt: skip
    columns = [(n, label) for n, label in AGREEMENT_COLUMNS if n in runs]
    columns = [(n, label) for n, label in columns if bool(runs[n].notnull().any())]
    estimates = {name: seed_estimates(runs[name]) for name, _ in columns}
    worst: dict[RunKey, tuple[str, float]] = {}
    per_layer: dict[RunKey, dict[str, float]] = {}
    if layer_means is not None:
        layers = [str(layer) for layer in layer_means[LAYER_DIM].values]
        matrix = layer_means.transpose("target", "method", "precision", LAYER_DIM)
        for index in np.ndindex(*matrix.shape[:3]):
            row = matrix.values[index]
            if np.all(np.isnan(row)):
                continue
            key = tuple(str(matrix[dim].values[i]) for dim, i in
                        zip(("target", "method", "precision"), index, strict=True))  # fmt: skip
            per_layer[key] = {
                layer: float(v) for layer, v in zip(layers, row, strict=True) if not np.isnan(v)
            }
            lowest = min(per_layer[key], key=per_layer[key].__getitem__)
            worst[key] = (lowest, per_layer[key][lowest])
    keys = list(dict.fromkeys([*worst, *(k for by_run in estimates.values() for k in by_run)]))
    if not keys:
        return ""
    simulated = seed_estimates(runs["simulated"])
    order = {key: i for i, key in enumerate(simulated)}  # the results table's order
    keys.sort(key=lambda key: order.get(key, len(order)))
    head = [f'<th class="label">{label}</th>' for label in ("target", "method", "precision")]
    head += ['<th class="label">worst layer</th>', "<th>its output SQNR [dB]</th>"]
    head += [f'<th data-metric="{escape(n)}">{escape(label)}</th>' for n, label in columns]
    rows = []
    for key in keys:
        target, method, precision = key
        cells = [f'<td class="label">{escape(label)}</td>' for label in key]
        if key in worst:
            layer, value = worst[key]
            cells.append(f'<td class="label" data-metric="layer_sqnr_worst_layer">'
                         f"<code>{escape(layer)}</code></td>")  # fmt: skip
            cells.append(f'<td data-metric="layer_sqnr_db_worst" data-value="{value!r}">'
                         f"{escape(format_value(value, 3))}</td>")  # fmt: skip
        else:
            cells += ['<td class="label">—</td>', "<td>—</td>"]
        cells += [estimate_cell(name, estimates[name].get(key)) for name, _ in columns]
        rows.append(
            f'<tr data-target="{escape(target)}" data-method="{escape(method)}" '
            f'data-precision="{escape(precision)}">' + "".join(cells) + "</tr>"
        )
    parts = ["<h3>Quantization debugging</h3>", table(head, rows, "quant-debug")]
    if per_layer:
        parts.append(layer_sqnr_table(per_layer, worst))
    parts.append(f'<p class="note">{DEBUG_NOTE}</p>')
    return "".join(parts)


def layer_sqnr_table(
    per_layer: dict[RunKey, dict[str, float]], worst: dict[RunKey, tuple[str, float]]
) -> str:
    """Output SQNR [dB] per layer (rows, in the model's order) and run (columns), folded; each
    run's worst layer in bold."""
    layers = list(dict.fromkeys(layer for values in per_layer.values() for layer in values))
    head = ['<th class="label">layer</th>'] + [
        f'<th data-target="{escape(t)}" data-method="{escape(m)}" data-precision="{escape(p)}">'
        f"{escape(t)}<br>{escape(m)}<br>{escape(p)}</th>"
        for t, m, p in per_layer
    ]
    rows = []
    for layer in layers:
        cells = [f'<td class="label"><code>{escape(layer)}</code></td>']
        for key, values in per_layer.items():
            if layer not in values:
                cells.append("<td>—</td>")
                continue
            text = escape(format_value(values[layer], 3))
            if worst[key][0] == layer:
                text = f"<strong>{text}</strong>"
            cells.append(f'<td data-value="{values[layer]!r}">{text}</td>')
        rows.append(f'<tr data-layer="{escape(layer)}">' + "".join(cells) + "</tr>")
    return (
        "<details><summary>output SQNR per layer [dB] (worst of each run in bold)</summary>"
        + table(head, rows, "layer-sqnr")
        + "</details>"
    )


def image_html(data: bytes, caption: str, mime: str = "image/png") -> str:
    """A figure with its image embedded as base64."""
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="data:{mime};base64,{encoded}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def workload_figures(runs: xr.Dataset) -> list[str]:
    """Error vs precision per quality metric, speed-up vs precision, and the Pareto front."""
    rendered = []
    qualities = quality_metrics(runs)
    for name in qualities:
        png = figures.error_vs_bits(runs, name)
        if png:
            caption = f"{figures.metric_label(name)} per target and method (mean ± 95 % CI)"
            rendered.append(image_html(png, caption))
    if speedup_metric(runs):
        png = figures.speedup_vs_precision(runs)
        if png:
            rendered.append(image_html(png, "paired speed-up over FP32 per target"))
        if qualities:
            png = figures.accuracy_speed_pareto(runs, qualities[0])
            if png:
                rendered.append(image_html(png, "accuracy–speed Pareto front"))
    return rendered


def anchor(dataset: str, model: str) -> str:
    return escape(f"{dataset}--{model}")


def workload_section(
    dataset: str, model: str, runs: xr.Dataset, constraints: Sequence[Constraint]
) -> str:
    """What to deploy, the results table and the figures of one (dataset, model)."""
    parts = [f'<section id="{anchor(dataset, model)}"><h2>{escape(dataset)} · {escape(model)}</h2>']
    deployments = choose_deployments(runs, constraints)
    parts.append("<h3>What to deploy</h3>")
    if deployments:
        applicable = applicable_constraints(runs, constraints)
        parts.append(deploy_table(deployments, applicable, time_metric(runs)))
    else:
        parts.append(
            f'<p class="note">No budget constraint applies: {escape(budget_text(constraints))} '
            "names no metric these runs have.</p>"
        )
    parts.append("<h3>Results over seeds</h3>")
    parts.append(results_table(dataset, model, runs))
    parts.append(overflow_note(runs))
    parts.append(baselines_note(dataset, runs))
    parts.append(training_note(dataset, runs))
    parts.append(debug_section(runs))
    parts.append("<h3>Figures</h3>")
    parts += workload_figures(runs)
    parts.append("</section>")
    return "".join(parts)


def extra_figures_section(
    extra_figures: Sequence[Path], sensitivity_csvs: Sequence[Path], relative_to: Path
) -> str:
    """Rollout curves and per-layer sensitivity heat maps, those whose files exist."""
    rendered = []
    for path in map(Path, extra_figures):
        mime = IMAGE_TYPES.get(path.suffix.lower())
        data = path.read_bytes() if mime and path.is_file() else b""
        if mime and data.startswith(IMAGE_SIGNATURES[mime]):
            rendered.append(image_html(data, display_path(path, relative_to), mime))
        else:
            kind = "not a PNG or JPEG file" if path.is_file() else "no such file"
            print(f"report: figure {path} left out ({kind})", file=sys.stderr)
    for path in map(Path, sensitivity_csvs):
        png = figures.sensitivity_heatmap(path)
        if png:
            rendered.append(image_html(png, display_path(path, relative_to)))
        else:
            kind = "no numeric column after the layer names" if path.is_file() else "no such file"
            print(f"report: sensitivity table {path} left out ({kind})", file=sys.stderr)
    if not rendered:
        return ""
    return (
        '<section id="figures"><h2>Rollouts and sensitivity</h2>' + "".join(rendered) + "</section>"
    )


def mixed_settings_note(cube: xr.Dataset) -> str:
    """A warning at the top where runs that should share a config section were made under
    different settings of it (a results folder holding runs of an earlier config, aggregated by
    hand): each run records a hash of every section it depends on (`run_settings_hashes`), so
    runs of two models differ in `models.*` only by name; two hashes under one section key
    mean its numbers were made under different settings and do not compare side by side."""
    try:
        sections = json.loads(str(cube.attrs.get("run_settings_hashes", "{}")))
    except json.JSONDecodeError:
        return ""
    if not isinstance(sections, dict):
        return ""
    mixed = {k: v for k, v in sections.items() if isinstance(v, list) and len(v) > 1}
    if not mixed:
        return ""
    shown = "; ".join(
        f"<code>{escape(str(key))}</code>: "
        + ", ".join(f"<code>{escape(str(h)[:12])}</code>" for h in hashes)
        for key, hashes in mixed.items()
    )
    count = f"{len(mixed)} config section{'s' if len(mixed) > 1 else ''}"
    return (
        f'<p class="note"><strong>These runs were made under different settings of {count}'
        f"</strong> ({shown}): their numbers do not compare side by side. Rerun the study, or "
        "aggregate the runs of one config only.</p>"
    )


def display_path(path: Path, relative_to: Path) -> str:
    try:
        return str(path.resolve().relative_to(relative_to.resolve()))
    except ValueError:
        return str(path)


def provenance_section(cube: xr.Dataset) -> str:
    """What the numbers were made with: packages, devices, revisions, config hashes."""
    rows = []
    for key in ("study", "config_hash", "run_settings_hashes", "git_revisions", "devices",
                "packages", "python_versions", "hosts", "wall_time_s_total"):  # fmt: skip
        if key in cube.attrs:
            value = cube.attrs[key]
            text = format_attr(value)
            rows.append(f'<tr><th class="label">{escape(key)}</th><td class="label">'
                        f"<code>{escape(text)}</code></td></tr>")  # fmt: skip
    return (
        '<section id="provenance"><h2>Provenance</h2><details open><summary>versions, devices, '
        "revisions</summary>" + table([], rows, "provenance") + "</details></section>"
    )


def format_attr(value: Any) -> str:
    """A cube attribute for display: JSON lists and mappings unpacked into short text."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list):
            return ", ".join(map(str, parsed))
        if isinstance(parsed, dict):
            return "; ".join(
                f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in parsed.items()
            )
        return value
    if isinstance(value, float):
        return format_value(value)
    return str(value)


def render(
    cube: xr.Dataset,
    constraints: Sequence[Constraint],
    extras: str,
    source: str,
) -> str:
    """The whole page."""
    slices = workload_slices(cube)
    study = str(cube.attrs.get("study", "")) or "study"
    contents = "".join(
        f'<li><a href="#{anchor(d, m)}">{escape(d)} · {escape(m)}</a></li>' for d, m, _ in slices
    )
    if extras:
        contents += '<li><a href="#figures">Rollouts and sensitivity</a></li>'
    contents += '<li><a href="#provenance">Provenance</a></li>'
    seeds = ", ".join(str(s) for s in cube["seed"].values)
    head = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>sciquant report: {escape(study)}</title><style>{STYLE}</style></head><body><main>"
        f"<h1>Quantization study “{escape(study)}”</h1>"
        f'<p class="meta">{int(cube.attrs.get("runs", 0))} runs · seeds {escape(seeds)} · '
        f"from <code>{escape(source)}</code></p>"
        f"<nav><ul>{contents}</ul></nav>" + mixed_settings_note(cube)
    )
    body = "".join(workload_section(d, m, runs, constraints) for d, m, runs in slices)
    return head + body + extras + provenance_section(cube) + "</main></body></html>\n"


def build_report(
    cube_path: Path,
    out_html: Path,
    error_budget: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    extra_figures: Sequence[Path] = (),
    sensitivity_csvs: Sequence[Path] = (),
) -> Path:
    """Write the self-contained HTML report of a result cube (`results/report/index.html`).

    `error_budget`: `{"metric": NAME, "max_ratio_to_fp32" | "min_ratio_to_fp32" | "max_value" |
    "min_value": NUMBER}` or a list of them (all must hold); None: `cube.DEFAULT_BUDGET`.
    `extra_figures` (PNG/JPEG, e.g. rollouts) and `sensitivity_csvs` (per-layer tables) are
    embedded where the files exist and skipped where not.
    """
    constraints = parse_budget(error_budget)
    cube = load_cube(cube_path)
    if error_budget is not None:  # the default budget names every workload's metrics
        check_budget_metrics(cube, constraints)
    extras = extra_figures_section(extra_figures, sensitivity_csvs, Path.cwd())
    page = render(cube, constraints, extras, display_path(Path(cube_path), Path.cwd()))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_html) as partial:
        partial.write_text(page, encoding="utf-8")
    print(f"report of {int(cube.attrs.get('runs', 0))} runs → {out_html} ({len(page) // 1024} KiB)")
    return out_html


def bench_report(n_runs: int = 1000) -> float:
    """Seconds to build the report of `n_runs` fake runs (writing and aggregating not timed)."""
    from sciquant.report.cube import aggregate, write_fake_study

    with tempfile.TemporaryDirectory(prefix="sciquant-bench-") as folder:
        root = Path(folder)
        paths = write_fake_study(root, n_runs)
        aggregate(paths, root / "metrics.nc", root / "metrics.csv", {"study": "bench"})
        started = time.perf_counter()
        build_report(root / "metrics.nc", root / "index.html")
        return time.perf_counter() - started
