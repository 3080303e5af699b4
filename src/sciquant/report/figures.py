"""The report's figures (matplotlib, Agg): errors vs bit-width, speed-ups, Pareto front, heat maps.

Every function takes the runs of one (dataset, model) — dims `(seed, target, method, precision)` —
and returns a PNG as bytes, or None where the runs lack what the figure needs.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from sciquant.report.cube import metric_kind, seed_estimates, speedups  # noqa: E402

DPI = 100
WIDTH_IN = 8.0


def colors(runs: xr.Dataset, dim: str) -> dict[str, str]:
    """One colour per label of `method` or `target`, the same in every panel and figure."""
    return {str(label): f"C{i % 10}" for i, label in enumerate(runs[dim].values)}


def png_bytes(fig: plt.Figure) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def metric_label(name: str) -> str:
    """A metric's axis label: `pressure_error_pct` → `pressure error [%]`."""
    words = name.split("_")
    units = {"pct": "%", "s": "s", "ms": "ms"}
    unit = next((units[w] for w in words if w in units), None)
    text = " ".join(w for w in words if w not in units)
    return f"{text} [{unit}]" if unit else text


def target_grid(count: int) -> tuple[plt.Figure, np.ndarray]:
    """One panel per target, two columns, shared y axis."""
    columns = min(count, 2)
    rows = -(-count // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(WIDTH_IN, 3.0 * rows + 0.6), squeeze=False, sharey=True
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes


def error_vs_bits(runs: xr.Dataset, name: str) -> bytes | None:
    """A quality metric (mean ± 95 % CI over seeds) vs precision: a panel per target, a line per
    method; the dashed line is the reference FP32; hollow markers are simulated precisions."""
    estimates = seed_estimates(runs[name])
    simulated = seed_estimates(runs["simulated"])
    if not estimates:
        return None
    precisions = [str(p) for p in runs["precision"].values]
    targets = [str(t) for t in runs["target"].values if any(k[0] == t for k in estimates)]
    fig, axes = target_grid(len(targets))
    reference = estimates.get(("reference", "none", "fp32"))
    method_colors = colors(runs, "method")
    for ax, target in zip(axes.flat, targets, strict=False):
        for method in map(str, runs["method"].values):
            keys = [(target, method, p) for p in precisions if (target, method, p) in estimates]
            if not keys:
                continue
            x = np.array([precisions.index(k[2]) for k in keys])
            y = np.array([estimates[k].mean for k in keys])
            half_width = np.nan_to_num([estimates[k].half_width for k in keys])
            color = method_colors[method]
            ax.plot(x, y, marker="o", ms=4, lw=1.2, color=color, label=method)
            if half_width.any():
                ax.vlines(x, y - half_width, y + half_width, color=color, lw=1)
            hollow = np.array([simulated[k].mean > 0 for k in keys])
            if hollow.any():
                ax.plot(x[hollow], y[hollow], "o", ms=7, mfc="white", mec=color)
        if reference is not None:
            ax.axhline(reference.mean, color="0.4", ls="--", lw=1)
        ax.set_title(target, fontsize=10)
        ax.set_xticks(range(len(precisions)), precisions, rotation=45, fontsize=8)
        ax.grid(alpha=0.3)
    values = [e.mean for e in estimates.values() if e.mean > 0]
    if metric_kind(name) == "error" and values and max(values) / min(values) > 50:
        axes.flat[0].set_yscale("log")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric_label(name))
    handles = [plt.Line2D([], [], color=c, marker="o", label=m) for m, c in method_colors.items()]
    axes.flat[0].legend(handles=handles, fontsize=7)
    fig.suptitle(f"{metric_label(name)} vs precision (hollow: simulated; dashed: reference FP32)")
    fig.tight_layout()
    return png_bytes(fig)


def speedup_vs_precision(runs: xr.Dataset) -> bytes | None:
    """Paired speed-up over FP32 (mean over seeds and methods) vs precision, a line per target."""
    ratios, baselines = speedups(runs)
    if not baselines or runs.sizes["precision"] < 2:
        return None  # nothing to compare FP32 with
    precisions = [str(p) for p in runs["precision"].values]
    per_precision = ratios.mean(["seed", "method"], skipna=True)
    simulated = runs["simulated"].max(["seed", "method"], skipna=True)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.0))
    target_colors = colors(runs, "target")
    for target in map(str, runs["target"].values):
        values = per_precision.sel(target=target).values
        shown = ~np.isnan(values)
        if not shown.any():
            continue
        x = np.arange(len(precisions))[shown]
        label = target if baselines.get(target) == target else f"{target} (vs reference FP32)"
        color = target_colors[target]
        ax.plot(x, values[shown], marker="o", color=color, label=label)
        hollow = shown & (simulated.sel(target=target).values > 0)
        ax.plot(
            np.arange(len(precisions))[hollow], values[hollow], "o", ms=8, mfc="white", mec=color
        )
    ax.axhline(1.0, color="0.4", ls="--", lw=1)
    ax.set_xticks(range(len(precisions)), precisions, rotation=45, fontsize=8)
    ax.set_ylabel("paired speed-up over the target's FP32 [×]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("speed-up vs precision (hollow: simulated, not a real low-precision kernel)")
    fig.tight_layout()
    return png_bytes(fig)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the (time, quality) points that no point beats in both, in order of time."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[int] = []
    best = -np.inf
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1])):
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def accuracy_speed_pareto(runs: xr.Dataset, quality_name: str) -> bytes | None:
    """Quality vs relative time (1 / paired speed-up over the target's FP32) of every timed
    (target, method, precision), means over seeds; the Pareto front is the line.

    Times of separate jobs are not compared: each run's time is the one measured beside its
    target's FP32 in the same process (`speedups`)."""
    qualities = seed_estimates(runs[quality_name])
    times = {key: 1.0 / e.mean for key, e in seed_estimates(speedups(runs)[0]).items()}
    simulated = seed_estimates(runs["simulated"])
    keys = [k for k in qualities if k in times]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.6))
    target_colors = colors(runs, "target")
    for target in map(str, runs["target"].values):
        mine = [k for k in keys if k[0] == target]
        if not mine:
            continue
        measured = [k for k in mine if simulated[k].mean == 0]
        others = [k for k in mine if simulated[k].mean > 0]
        color = target_colors[target]
        ax.scatter([times[k] for k in measured], [qualities[k].mean for k in measured],
                   s=22, color=color, label=target)  # fmt: skip
        ax.scatter([times[k] for k in others], [qualities[k].mean for k in others],
                   s=22, facecolors="none", edgecolors=color)  # fmt: skip
    measured = [k for k in keys if simulated[k].mean == 0]
    points = [(times[k], qualities[k].mean) for k in measured]
    front = pareto_front(points, higher_is_better=metric_kind(quality_name) == "score")
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k-", lw=1, zorder=0)
    for i in front:
        target, method, precision = measured[i]
        ax.annotate(f"{target} {precision} ({method})", points[i], fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter())
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("time relative to the target's FP32 (1 / paired speed-up)")
    ax.set_ylabel(metric_label(quality_name))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(
        "accuracy–speed trade-off; line: Pareto front of measured runs (hollow: simulated)"
    )
    fig.tight_layout()
    return png_bytes(fig)


def sensitivity_heatmap(path: Path) -> bytes | None:
    """A per-layer sensitivity table as a heat map; None where the CSV is absent or empty.

    The CSV's first column names the layers (rows); every other numeric column is one heat-map
    column (e.g. a bit-width), values in the metric the table was measured in.
    """
    if not Path(path).is_file():
        return None
    table = pd.read_csv(path, index_col=0).select_dtypes("number")
    if table.empty:
        return None  # a table with no numeric column: the caller says so
    height = min(0.28 * len(table) + 1.5, 16.0)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, height))
    image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, fontsize=8)
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index], fontsize=7)
    fig.colorbar(image, ax=ax)
    ax.set_title(f"per-layer sensitivity: {Path(path).stem}")
    fig.tight_layout()
    return png_bytes(fig)
