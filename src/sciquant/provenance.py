"""Where a number came from: package versions, device, git revision, host, wall time."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("sciquant", "torch", "numpy", "onnx", "onnxruntime", "vtk", "snakemake")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_name() -> str:
    """The processor (or GPU) the run used, as the OS names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(cwd: Path | None = None) -> str:
    """The workflow checkout's commit (with `-dirty` if it has local changes), or `unknown`."""
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        return revision or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(wall_time_s: float, threads: int | None = None) -> dict[str, Any]:
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device_name(),
        "host": platform.node(),
        "threads": threads,
        "git_revision": git_revision(),
        "wall_time_s": round(wall_time_s, 3),
    }


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> Path:
    """Write a CSV table atomically (header `columns`, one line per row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (no half-written metrics.json after a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False))
    os.replace(tmp, path)
    return path
