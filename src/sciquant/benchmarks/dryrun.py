"""Time `snakemake -n` (DAG building and validation) on a generated study of ≥ 10,000 runs.

The generated study is the `ci` study with `n_runs` seeds: every seed is one FP32 training and
one evaluated run (`results/<dataset>/<model>/seed<s>/reference/none/fp32`), so the DAG has
about two jobs per run, the fewest a run can cost (a quantization sweep adds runs of two or three
jobs each: quantize, export, evaluate). The dry runs are the commands a user types, in a
subprocess: the repository's Snakefile, `--directory` a temporary folder, output quieted.
Goal: under 10 s for 10,000 runs.
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

from sciquant.errors import SciquantError
from sciquant.study import SCHEMA, Study, load_config

ROOT = SCHEMA.parents[2]
GOAL_S = 10.0


def make_config(n_runs: int) -> dict[str, Any]:
    """The ci study with enough seeds for `n_runs` runs."""
    config = yaml.safe_load((ROOT / "workflow" / "config" / "ci.yaml").read_text())
    config["study"] = "dryrun"
    config["seeds"] = list(range(n_runs))
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
        runs = len(Study(load_config(path)).runs())
        command = [
            *snakemake_command(), "-n", "-s", str(ROOT / "Snakefile"),
            "--directory", tmp, "--configfile", str(path), "--quiet",
        ]  # fmt: skip
        dag_seconds, _ = _time(command, timeout_s)
        seconds, output = _time([*command, "rules"], timeout_s)
    total = re.search(r"^total\s+(\d+)$", output, flags=re.MULTILINE)
    jobs = int(total[1]) if total else None
    return {"runs": runs, "jobs": jobs, "dag_seconds": dag_seconds, "seconds": seconds,
            "goal_s": GOAL_S}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    goal = result["goal_s"]
    header = f"{'runs':>7} {'jobs':>7} {'-n --quiet (DAG)':>17} {'-n (all jobs)':>14} {'goal':>7}"
    row = (
        f"{result['runs']:>7} {result['jobs'] or '?':>7} {result['dag_seconds']:>15.1f} s "
        f"{result['seconds']:>12.1f} s {goal:>5.0f} s"
    )
    verdict = "meets" if result["seconds"] < goal else "MISSES"
    return "\n".join([header, row, f"{verdict} the goal (`snakemake -n` < {goal:.0f} s)"])
