"""Where a number came from: package versions, device, git revision, host, wall time."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary name beside `path` to write to; on success it replaces `path`.

    The name is unique (two writers of one file, e.g. two jobs or a Snakemake job beside
    `sciquant submit`, never share it) and keeps `path`'s suffix (some writers pick their format
    by it). The file's data and the folder's entry are fsynced before and after the rename, so a
    node crash leaves the old file or the new one, never an empty one that looks finished. On an
    error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from a shared group
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _umask() -> int:
    """The process's file-creation mask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform lets a folder be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> Path:
    """Write a CSV table atomically (header `columns`, one line per row)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (no half-written metrics.json after a crash)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=False))
    return path
