"""Dataset overview figure: pressure and flow at the inlet and outlets over one cycle."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sciquant.data.bloodflow import INLET, OUTLET, find_vtps, load_simulation, point_types  # noqa: E402

MMHG = 1333.2  # dyn/cm² per mmHg


def plot_bloodflow(raw: Path, out: Path, n_simulations: int = 4) -> Path:
    """Plot inlet and outlet pressure (mmHg) and flow (mL/s) of the first simulations."""
    vtps = find_vtps(raw)
    info = json.loads((vtps / "dataset_info.json").read_text())
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
