"""Where a number came from: package versions, device, git revision, host, wall time."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
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


#: The devices a stage may be asked for (`--device`): what its node type has.
DEVICES = ("cpu", "cuda")


def cuda_available() -> bool:
    """Whether torch sees a usable CUDA device here (False where torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def select_device(wanted: str, stage: str) -> str:
    """The device a stage runs on: `cuda` where its node type asks for a GPU and CUDA is there,
    else `cpu`.

    A CPU node type (`wanted` `cpu`) runs on the CPU even where CUDA exists. A GPU node type
    without CUDA is not an error: the stage runs on the CPU (a user running the GPU study on a
    laptop still gets results) and says so loudly on stderr, which the rules and `sciquant
    submit` keep in the stage's log; the output records `cpu`. In a Slurm job the warning adds
    that a GPU job without a GPU is a misconfiguration of the node type or the site.
    """
    if wanted not in DEVICES:
        raise ValueError(f"unknown device {wanted!r}; known: {', '.join(DEVICES)}")
    if wanted == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    print(f"WARNING: {stage}: {cuda_missing_message()}", file=sys.stderr, flush=True)
    return "cpu"


def cuda_missing_message() -> str:
    """Why a GPU node type's stage runs on the CPU here, and where to look."""
    try:
        import torch

        build = torch.version.cuda
        why = (
            f"torch {torch.__version__} is built without CUDA"
            if build is None
            else f"torch {torch.__version__} (CUDA {build}) sees no CUDA device"
        )
    except ImportError:
        why = "torch is not installed"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        why += f", CUDA_VISIBLE_DEVICES={visible!r}"
    message = (
        f"its node type asks for a GPU, but CUDA is not available here ({why}); "
        "running on the CPU instead (slower; the results are valid and record device 'cpu')"
    )
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        message += (
            f". This is Slurm job {job}: a job on a GPU node type that gets no usable GPU is a "
            "misconfiguration; check the node type's `nodes` entry (partition, constraint, gpu / "
            "gres), the node's GPU driver and that the environment's torch is a CUDA build"
        )
    return message


def describe_device(device: str) -> str:
    """The device a stage used, as recorded: `cuda:0 (NVIDIA V100-SXM2-32GB)`, or `cpu (<the
    CPU's model>)`."""
    if device.startswith("cuda"):
        import torch

        try:
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        except (RuntimeError, AssertionError):  # no CUDA here: the stage's own error follows
            return f"{device} (not available)"
    return f"cpu ({device_name()})"


def device_provenance(device: str, wanted: str | None = None) -> dict[str, str]:
    """The provenance keys of the device a stage ran on: `device` (`describe_device`),
    `device_type` (`cpu` / `cuda`), `cpu_model` (the host's CPU, which runs the data handling
    also on GPU runs) and `device_requested` (what the node type asked for; it differs from
    `device_type` where a GPU node type found no CUDA)."""
    return {
        "device": describe_device(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "device_requested": wanted or ("cuda" if device.startswith("cuda") else "cpu"),
        "cpu_model": device_name(),
    }


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


def provenance(
    wall_time_s: float,
    threads: int | None = None,
    device: str | None = None,
    wanted: str | None = None,
) -> dict[str, Any]:
    """Package versions, device, git revision, host and wall time of a stage.

    `device`: the device the stage ran on (`select_device`; `wanted`: the one its node type
    asked for), recorded by `device_provenance`; None: `device` is the CPU's model alone (stages
    that leave the choice to their framework).
    """
    record = {
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device_name(),
        "host": platform.node(),
        "threads": threads,
        "git_revision": git_revision(),
        "wall_time_s": round(wall_time_s, 3),
    }
    if device is not None:
        record.update(device_provenance(device, wanted))
    return record


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


#: The key `write_json` adds to a mapping payload that held non-finite numbers.
NON_FINITE = "non_finite"


def json_pointer(keys: Sequence[str | int]) -> str:
    """The RFC 6901 JSON Pointer of a location: `("metrics", "a/b")` → `/metrics/a~1b`."""
    return "".join("/" + str(key).replace("~", "~0").replace("/", "~1") for key in keys)


def pointer_keys(pointer: str) -> list[str]:
    """The keys of an RFC 6901 JSON Pointer (the inverse of `json_pointer`; list positions as
    text): `/metrics/a~1b` → `["metrics", "a/b"]`."""
    if not pointer.startswith("/"):
        return []
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def finite_json(value: Any) -> tuple[Any, dict[str, str]]:
    """`value` with every non-finite float (NaN, +∞, −∞) replaced by None, and what was replaced.

    Returns (copy, {JSON Pointer of the location: "nan" | "inf" | "-inf"}); mappings and
    lists (tuples become lists) are copied, the input is left as it is.
    """
    found: dict[str, str] = {}

    def clean(item: Any, keys: tuple[str | int, ...]) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            found[json_pointer(keys)] = "nan" if math.isnan(item) else "inf" if item > 0 else "-inf"
            return None
        if isinstance(item, dict):
            return {key: clean(inner, (*keys, key)) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [clean(inner, (*keys, index)) for index, inner in enumerate(item)]
        return item

    return clean(value, ()), found


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (no half-written metrics.json after a crash); always valid JSON.

    JSON has no NaN or infinity. A non-finite float anywhere in `payload` (a diverged run's
    error, an interval that one sample cannot give) is written as `null`, and a mapping payload
    gets a top-level `"non_finite"` object naming each by its JSON Pointer (RFC 6901) and what it
    was, e.g. `{"/metrics/pressure_error_pct": "nan", "/metrics/flowrate_error_pct": "inf"}`;
    the key is absent where every number is finite. So `null` alone still means "not measured",
    and a reader tells it from a value that came out NaN or infinite (`sciquant.report.cube`
    counts the latter in errors and scores as a diverged run); an entry counts only where the
    value it points to is `null` (a payload read back, changed and written again keeps its
    earlier entries). A payload that is not a mapping has nowhere to list them: its non-finite
    numbers are written as `null` only.
    """
    cleaned, found = finite_json(payload)
    if found and isinstance(cleaned, dict):
        # A payload read back from such a file and written again keeps its earlier entries.
        earlier = cleaned.get(NON_FINITE) or {}
        if not isinstance(earlier, dict):
            raise ValueError(f"{path}: the payload's '{NON_FINITE}' is not a mapping")
        cleaned[NON_FINITE] = {**earlier, **found}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(cleaned, indent=1, sort_keys=False, allow_nan=False))
    return path
