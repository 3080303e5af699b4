"""Time `snakemake -n` (DAG building and validation) on a generated study of ≥ 10,000 runs.

The generated study is the `ci` study's two MeshGraphNets with a sweep of 251 runs per training
(`SWEEPS`: simulated PTQ / QAT at every weight and activation width, OpenVINO FP32, BF16 and
paired INT8 runs) and as many seeds as `n_runs` needs (20 for 10,000: 10,040 runs). With the
config's default `batch` (at most 1,000 jobs) its runs are batched: per training, jobs of a
few runs each instead of two or three jobs per run (quantize, export, evaluate). The dry runs are
the commands a user types, in a subprocess: the repository's Snakefile, `--directory` a temporary
folder, output quieted. Goals: under 10 s for 10,000 runs, job table included, and at most
`batch.max_jobs` (1,000) jobs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sciquant.batch import batch_size, settings
from sciquant.errors import SciquantError
from sciquant.runtime.paired import cpu_features, cpu_name
from sciquant.study import SCHEMA, Study, load_config

ROOT = SCHEMA.parents[2]
GOAL_S = 10.0


#: Runs of one training in the generated study: the FP32 reference; every weight × activation
#: width of seven calibrated methods, simulated (7 × 35); OpenVINO's FP32, BF16 and three INT8
#: PTQ runs, timed beside its FP32 (paired).
SWEEPS = [
    {
        "targets": ["reference"],
        "methods": [
            "ptq-minmax", "ptq-percentile", "ptq-mse", "ptq-adaround", "ptq-biascorr",
            "ptq-cle", "qat-lsq",
        ],
        "precisions": [f"w{w}a{a}" for w in range(2, 9) for a in range(4, 9)],
    },
    {"targets": ["openvino-cpu"], "methods": ["none"], "precisions": ["bf16"]},
    {
        "targets": ["openvino-cpu"],
        "methods": ["ptq-minmax", "ptq-percentile", "ptq-mse"],
        "precisions": ["w8a8"],
    },
]  # fmt: skip


def make_config(n_runs: int) -> dict[str, Any]:
    """The ci study (two MeshGraphNets) with the sweep above and enough seeds for `n_runs`
    runs (251 per training), the config's default `batch` (at most 1,000 jobs)."""
    config = yaml.safe_load((ROOT / "workflow" / "config" / "ci.yaml").read_text())
    config["study"] = "dryrun"
    config["quantize"]["sweeps"] = SWEEPS
    per_seed = len(config["models"]) * (1 + 7 * 35 + 5)
    seeds = max(1, -(-n_runs // per_seed))
    config["seeds"] = list(range(seeds))
    if seeds > 20:
        config["limits"] = {"max_seeds": seeds}
    return config


def snakemake_command() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def _time(command: list[str], timeout_s: float) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SciquantError(f"the dry run failed (exit {result.returncode}):\n{output[-3000:]}")
    return seconds, output


def run(n_runs: int = 10_000, timeout_s: float = 900) -> dict[str, Any]:
    """Generate the study and time two dry runs of it; seconds, runs and the DAG's job count.

    `snakemake -n --quiet` builds and checks the DAG only (Snakemake's mode for large
    workflows); `snakemake -n --quiet rules` also schedules every job (resources, params) and
    prints the job table, which gives the job count.
    """
    with tempfile.TemporaryDirectory(prefix="sciquant-dryrun-") as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(make_config(n_runs)))
        study = Study(load_config(path))
        runs = len(study.runs())
        command = [
            *snakemake_command(), "-n", "-s", str(ROOT / "Snakefile"),
            "--directory", tmp, "--configfile", str(path), "--quiet",
        ]  # fmt: skip
        dag_seconds, _ = _time(command, timeout_s)
        seconds, output = _time([*command, "rules"], timeout_s)
    total = re.search(r"^total\s+(\d+)$", output, flags=re.MULTILINE)
    jobs = int(total[1]) if total else None
    return {"runs": runs, "jobs": jobs, "dag_seconds": dag_seconds, "seconds": seconds,
            "goal_s": GOAL_S, "max_jobs": settings(study)["max_jobs"],
            "batch_size": batch_size(study), "cpu": cpu_name(),
            "cpu_flags": [k for k, v in cpu_features().items() if v]}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    goal = result["goal_s"]
    header = (
        f"{'runs':>7} {'batch':>5} {'jobs':>7} {'max_jobs':>8} {'-n --quiet (DAG)':>17} "
        f"{'-n (all jobs)':>14} {'goal':>7}"
    )
    row = (
        f"{result['runs']:>7} {result['batch_size']:>5} {result['jobs'] or '?':>7} "
        f"{result['max_jobs']:>8} {result['dag_seconds']:>15.1f} s {result['seconds']:>12.1f} s "
        f"{goal:>5.0f} s"
    )
    fast = "meets" if result["seconds"] < goal else "MISSES"
    jobs = result["jobs"]
    few = "meets" if jobs is not None and jobs <= result["max_jobs"] else "MISSES"
    return "\n".join([
        f"CPU: {result['cpu']}; flags: {', '.join(result['cpu_flags']) or 'none'}",
        header,
        row,
        f"{fast} the goal (`snakemake -n` < {goal:.0f} s); {few} the goal "
        f"(jobs ≤ batch.max_jobs = {result['max_jobs']})",
    ])  # fmt: skip
