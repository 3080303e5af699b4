"""Dataset overview figure: pressure and flow at the inlet and outlets over one cycle."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sciquant.workloads.bloodflow.data import (  # noqa: E402
    INLET,
    OUTLET,
    find_vtps,
    load_simulation,
    point_types,
    read_dataset_info,
)

MMHG = 1333.2  # dyn/cm² per mmHg


def plot_bloodflow(raw: Path, out: Path, n_simulations: int = 4) -> Path:
    """Plot inlet and outlet pressure (mmHg) and flow (mL/s) of the first simulations."""
    vtps = find_vtps(raw)
    info = read_dataset_info(vtps)
    paths = sorted(vtps.glob("*.vtp"))[:n_simulations]
    fig, axes = plt.subplots(2, len(paths), figsize=(3.2 * len(paths), 5.2), squeeze=False)
    for column, path in enumerate(paths):
        sim = load_simulation(path, info)
        types = point_types(sim.centerline)
        locations = [("inlet", int(np.flatnonzero(types == INLET)[0]))]
        locations += [
            (f"outlet {i}", int(p)) for i, p in enumerate(np.flatnonzero(types == OUTLET))
        ]
        for label, point in locations:
            style = {"lw": 2.0, "color": "k"} if label == "inlet" else {"lw": 1.0}
            axes[0, column].plot(sim.times, sim.pressure[:, point] / MMHG, label=label, **style)
            axes[1, column].plot(sim.times, sim.flowrate[:, point], label=label, **style)
        axes[0, column].set_title(f"{sim.name} ({len(locations) - 1} outlets)", fontsize=9)
        axes[1, column].set_xlabel("time in cycle [s]")
    axes[0, 0].set_ylabel("pressure [mmHg]")
    axes[1, 0].set_ylabel("flow rate [mL/s]")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{raw}: inlet (black) and outlets over one cardiac cycle", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_md(prepared: Path, out: Path) -> Path:
    """The pixel maps of an md dataset: one frame and the mean map per state, and how far apart
    the states' mean maps are, pixel by pixel (what the CNN has to pick up)."""
    from sciquant.workloads.md.data import load_prepared

    data = load_prepared(prepared)  # errors name the file and say to rerun prepare
    x, y, split = data["x"], data["y"], data["split"]
    labels = sorted(int(label) for label in np.unique(y))
    fig, axes = plt.subplots(2, len(labels) + 1, figsize=(3.0 * (len(labels) + 1), 6.0))
    means = {}
    for column, label in enumerate(labels):
        frames = x[y == label]
        means[label] = frames.mean(axis=0)
        axes[0, column].imshow(frames[0], interpolation="nearest")
        axes[0, column].set_title(f"state {label}: first frame", fontsize=9)
        axes[1, column].imshow(means[label], interpolation="nearest")
        counts = ", ".join(
            f"{name} {int(np.sum((y == label) & (split == code)))}"
            for code, name in enumerate(("train", "val", "test"))
        )
        axes[1, column].set_title(f"state {label}: mean ({counts})", fontsize=8)
    difference = np.abs(means[labels[-1]] - means[labels[0]]).sum(axis=-1)
    image = axes[1, -1].imshow(difference, cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=axes[1, -1], fraction=0.046)
    axes[1, -1].set_title(f"|mean {labels[-1]} − mean {labels[0]}| (RGB sum)", fontsize=8)
    spread = x.reshape(len(x), -1).std(axis=0).reshape(x.shape[1:]).sum(axis=-1)
    image = axes[0, -1].imshow(spread, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=axes[0, -1], fraction=0.046)
    axes[0, -1].set_title("std over all frames (RGB sum)", fontsize=8)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(f"{prepared}: ICNNMD pixel maps, {len(x)} frames, grid {x.shape[1]}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
