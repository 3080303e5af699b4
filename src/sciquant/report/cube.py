"""The result cube: every run's metrics.json → one xarray Dataset (NetCDF) and a tidy CSV.

Dims are a run's coordinates `(dataset, model, seed, target, method, precision)`; every numeric
scalar in a run's `"metrics"` becomes a float64 variable (nested tables such as `per_simulation`
stay in the run's own metrics.json), plus `simulated` (1.0 / 0.0). A combination that was not run
is NaN, never dropped. Provenance (package versions, devices, git revisions, config hashes, study)
is kept as attributes, JSON strings where the value is not a scalar.

A diverged run is not a missing one. An error or score (`diverging_metric`) that came out NaN or
infinite (`null` listed in the file's `non_finite`, see `sciquant.provenance.write_json`, or a
bare NaN/Infinity of an older writer) is NaN in its variable, and where any run has one the cube
gets a `diverged` variable: per run, how many of its errors and scores diverged (0 for a run
without, NaN where no run was made), and the attribute `diverged_metrics`, a JSON list of
`{"run": {coordinate: label}, "metrics": [names]}`, one per diverged run. A `null` that is not
listed (or NaN in a timing detail, e.g. the interval of a single timing pair) is "not measured".
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from sciquant.errors import SciquantError
from sciquant.provenance import (
    NON_FINITE,
    atomic_path,
    json_pointer,
    pointer_keys,
    write_json,
)
from sciquant.quant.targets import TARGETS, fp32_target
from sciquant.report.gain import BASELINE as GAIN_BASELINE
from sciquant.report.gain import FP32_RUN, network_gains, pooled_gains, run_gains
from sciquant.vocabulary import COORDINATES

#: Display and sort order of known labels; unknown labels follow, alphabetically.
TARGET_ORDER = tuple(TARGETS)
METHOD_ORDER = (
    "none", "ptq-minmax", "ptq-percentile", "ptq-mse", "ptq-entropy", "ptq-adaround",
    "ptq-biascorr", "ptq-cle", "ptq-dynamic", "qat-ste", "qat-lsq", "qat-tqt", "qat-degree",
)  # fmt: skip

PRECISION_PATTERN = re.compile(r"^w(\d+)a(\d+)$")
UNIT_PATTERN = re.compile(r"_(pct|s|ms|bytes)(?:_|$)")
UNITS = {"pct": "%", "s": "s", "ms": "ms", "bytes": "bytes"}
CACHE_VERSION = 6  # raise when RunRecord or read_metrics changes, so old caches are not reused
#: The per-layer output SQNR of quantized runs (`sciquant.quant.debug`): in metrics.json a
#: table {layer: dB}; in the cube a variable over the run's coordinates and `LAYER_DIM`.
LAYER_SQNR = "layer_sqnr_db"
LAYER_DIM = "layer"
#: Cube variables that are not metrics: a metrics.json may not use these names for its metrics.
RESERVED_NAMES = ("simulated", "diverged", LAYER_SQNR, LAYER_DIM)
#: Quantization-debugging metrics (`sciquant.quant.debug`): the report shows them in a table of
#: their own, not as columns of the results table.
DEBUG_PREFIXES = ("layer_sqnr_", "sim_vs_deployed_")
#: The FP32 network's errors on training simulations (`evaluate.training_simulations`): kept in
#: the cube, shown in the report's note beside the test errors, not a table column.
TRAINING_PREFIX = "training_"


@dataclass(frozen=True)
class RunRecord:
    """One parsed metrics.json: coordinates, scalar metrics, provenance."""

    path: str
    coordinates: tuple[Any, ...]
    simulated: bool
    metrics: dict[str, float | int]
    study: str | None
    # SHA-256 of each config section the run depends on, by the section's key (`datasets.x`,
    # `models.y`, `evaluate`, ...; `Study.settings_hashes`); a metrics.json of an earlier
    # version, with one `config_hash` of the whole config, gives it under `config`.
    settings_hashes: dict[str, str]
    provenance: dict[str, Any]
    # Named scores of something that is not a run (e.g. the blood-flow `lumped_model`, the
    # physics prior alone): {name: {metric: value}}; the same for every run of a dataset.
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per test simulation {simulation: {metric: value}}: the run's own (`per_simulation`) and
    # the baselines' ({name: ...}); what the retained gain's paired bootstrap needs.
    per_simulation: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_per_simulation: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # The baseline (a key of `baselines`) the retained gain is measured against: metrics.json's
    # `gain_baseline`, the calibrated prior (`GAIN_BASELINE`) where it names none.
    gain_baseline: str = GAIN_BASELINE
    # The scalar errors and scores (`diverging_metric`) that came out NaN or infinite; their
    # values in `metrics` are NaN.
    diverged: list[str] = field(default_factory=list)
    # The per-layer output SQNR {layer: dB} of a quantized run (`LAYER_SQNR`); +inf for a layer
    # whose quantized output is exact.
    layer_sqnr_db: dict[str, float] = field(default_factory=dict)


def precision_bits(precision: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a precision label: fp32 → (32, 32), bf16 → (16, 16),
    w4a8 → (4, 8)."""
    if precision[:2] in ("fp", "bf") and precision[2:].isdigit():
        return int(precision[2:]), int(precision[2:])
    match = PRECISION_PATTERN.match(precision)
    if match:
        return int(match.group(1)), int(match.group(2))
    return 0, 0


def label_order(dim: str, labels: Iterable[Any]) -> list[Any]:
    """The labels of a dim in display order (FP32 first, then fewer bits; known targets first)."""
    unique = set(labels)
    if dim == "seed":
        return sorted(unique)
    if dim == "precision":
        return sorted(unique, key=lambda p: (*(-b for b in precision_bits(p)), p))
    known = {"target": TARGET_ORDER, "method": METHOD_ORDER}.get(dim, ())
    rank = {label: i for i, label in enumerate(known)}
    return sorted(unique, key=lambda label: (rank.get(label, len(known)), str(label)))


def label_ranks(dim: str, labels: Iterable[Any]) -> dict[Any, int]:
    """Each label's position in `label_order`."""
    return {label: i for i, label in enumerate(label_order(dim, labels))}


def read_metrics(path: Path) -> RunRecord:
    """Parse one metrics.json; numeric scalars only (bool → 0/1, null → NaN); tables skipped.

    A non-finite value (a `null` its `non_finite` lists, or a bare NaN/±Infinity) becomes NaN;
    the errors and scores among them are the record's `diverged`. A metric name a NetCDF
    variable cannot have (with `/`, or a coordinate's or `RESERVED_NAMES`' name) is an error
    naming the file and the metric.
    """
    try:
        payload = json.loads(Path(path).read_bytes())
        coordinates = payload["coordinates"]
        key = tuple(coordinates[name] for name in COORDINATES)
        key = (*key[:2], int(key[2]), *key[3:])
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: metrics file not found; rerun its evaluate stage") from error
    except IsADirectoryError as error:
        raise SciquantError(
            f"{path}: a folder, not a metrics file; pass the runs' metrics.json files (for "
            f"example {Path(path) / '**' / 'metrics.json'} with your shell's globstar)"
        ) from error
    except OSError as error:
        raise SciquantError(
            f"{path}: cannot be read ({error}); rerun its evaluate stage"
        ) from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SciquantError(
            f"{path}: not valid JSON ({error}); delete it and rerun its evaluate stage"
        ) from error
    except (KeyError, TypeError, ValueError) as error:
        raise SciquantError(
            f"{path}: no `coordinates` with {', '.join(COORDINATES)} and an integer seed "
            f"({type(error).__name__}: {error}); it was not written by `sciquant evaluate`; "
            "delete it and rerun that stage"
        ) from error
    if not isinstance(payload.get("metrics"), dict):
        raise SciquantError(
            f"{path}: no `metrics` object; it was not written by `sciquant evaluate` (or was "
            "cut short): delete it and rerun that stage"
        )
    listed = payload.get(NON_FINITE)
    non_finite = {
        keys[1]
        for keys in map(pointer_keys, listed if isinstance(listed, dict) else {})
        if len(keys) == 2 and keys[0] == "metrics"
    }
    metrics: dict[str, float | int] = {}
    diverged = []
    for name, value in payload.get("metrics", {}).items():
        if isinstance(value, dict | list | str):
            continue
        check_metric_name(path, name)
        if value is None and name.startswith(LAYER_SQNR):
            # An SQNR of +inf (an exact layer) is a value, not a divergence.
            metrics[name] = _listed_value(listed, ("metrics", name))
        elif value is None:
            metrics[name] = math.nan
            if name in non_finite and diverging_metric(name):
                diverged.append(name)
        elif isinstance(value, bool):
            metrics[name] = int(value)
        elif isinstance(value, float) and not math.isfinite(value):
            metrics[name] = math.nan
            if diverging_metric(name):
                diverged.append(name)
        elif isinstance(value, int | float):
            metrics[name] = value
    return RunRecord(
        path=str(path),
        coordinates=key,
        simulated=bool(payload.get("simulated", False)),
        metrics=metrics,
        study=payload.get("study"),
        settings_hashes=_settings_hashes(payload),
        provenance=payload.get("provenance") or {},
        baselines=_numeric_table(payload.get("baselines")),
        per_simulation=_numeric_table(payload.get("metrics", {}).get("per_simulation")),
        baseline_per_simulation={
            str(name): _numeric_table(values.get("per_simulation"))
            for name, values in (payload.get("baselines") or {}).items()
            if isinstance(values, dict) and values.get("per_simulation")
        },
        gain_baseline=str(payload.get("gain_baseline") or GAIN_BASELINE),
        diverged=diverged,
        layer_sqnr_db=_layer_sqnr(payload.get("metrics", {}).get(LAYER_SQNR), listed),
    )


def _listed_value(listed: Any, keys: Sequence[str]) -> float:
    """What a `null` of metrics.json was: ±inf or NaN as its `non_finite` entry says, else NaN
    (a `null` alone means "not measured")."""
    kind = listed.get(json_pointer(keys)) if isinstance(listed, dict) else None
    return {"inf": math.inf, "-inf": -math.inf}.get(str(kind), math.nan)


def _layer_sqnr(table: Any, listed: Any) -> dict[str, float]:
    """The per-layer SQNR table of a metrics.json, exact layers (`null`, listed "inf") +inf."""
    if not isinstance(table, dict):
        return {}
    values = {}
    for layer, value in table.items():
        if value is None:
            values[str(layer)] = _listed_value(listed, ("metrics", LAYER_SQNR, str(layer)))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[str(layer)] = float(value)
    return values


def check_metric_name(path: Path, name: str) -> None:
    """Refuse a metric name the cube cannot hold, naming the metrics.json and the metric."""
    if "/" in name:
        problem = "contains '/', which a NetCDF variable name cannot"
    elif name in COORDINATES or name in RESERVED_NAMES:
        problem = "is the name of one of the cube's coordinates or own variables"
    elif not name.strip():
        problem = "is empty"
    else:
        return
    raise SciquantError(
        f"{path}: metric {name!r} {problem}; rename it (e.g. {_safe_name(name)!r}) in what wrote "
        "this file, rerun that stage, then aggregate again"
    )


def _safe_name(name: str) -> str:
    """A usable spelling of a refused metric name (for the error message)."""
    safe = name.replace("/", "_").strip() or "metric"
    return f"{safe}_value" if safe in COORDINATES or safe in RESERVED_NAMES else safe


def diverging_metric(name: str) -> bool:
    """Whether a non-finite value of this metric means the run diverged: an error or a score
    (`metric_kind`), not a spread (`_std`, `_min`, ..., the interval of a single sample) nor a
    timing detail."""
    return (
        metric_kind(name) in ("error", "score")
        and not name.endswith(SPREAD_SUFFIXES)
        and name not in TIMING_DETAILS
        and name not in COUNT_METRICS
    )


def _numeric_table(section: Any) -> dict[str, dict[str, float]]:
    """A two-level table {name: {metric: value}} of metrics.json (`baselines`, a
    `per_simulation`): numeric values only; anything else is ignored."""
    if not isinstance(section, dict):
        return {}
    return {
        str(name): {
            str(k): float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for name, values in section.items()
        if isinstance(values, dict)
    }


def file_signature(path: Path) -> list[int]:
    """What tells a rewritten metrics.json from the one cached: mtime and ctime [ns], size
    [bytes] and inode. Every writer replaces the file (a new inode, `provenance.atomic_path`)
    and any write or rename sets the ctime, so a rewrite is seen even where the file system's
    mtime is coarse or a tool restored it and the size did not change."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError as error:
        raise SciquantError(f"{path}: metrics file not found; rerun its evaluate stage") from error
    return [stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns]


def read_cache(cache: Path) -> dict[str, Any]:
    """The cached records by path; empty where the cache is absent, unreadable or outdated."""
    try:
        content = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return content.get("records", {}) if content.get("version") == CACHE_VERSION else {}


def read_records(metrics_files: Sequence[Path], cache: Path | None) -> list[RunRecord]:
    """Parse each metrics.json, reusing `cache`'s record where the file is unchanged."""
    cached = read_cache(cache) if cache else {}
    records, entries = [], {}
    for path in metrics_files:
        signature = file_signature(path)
        entry = cached.get(str(path))
        if entry is not None and entry["signature"] == signature:
            fields = entry["record"]
            record = RunRecord(**fields | {"coordinates": tuple(fields["coordinates"])})
        else:
            record = read_metrics(path)
        records.append(record)
        entries[str(path)] = {"signature": signature, "record": asdict(record)}
    if cache:
        with atomic_path(cache) as partial:
            partial.write_text(json.dumps({"version": CACHE_VERSION, "records": entries}))
    return records


def read_all(metrics_files: Sequence[Path], cache: Path | None = None) -> list[RunRecord]:
    """Parse every metrics.json, sorted by coordinates; two files for one run is an error."""
    records = read_records(metrics_files, cache)
    ranks = [
        label_ranks(dim, (r.coordinates[d] for r in records)) for d, dim in enumerate(COORDINATES)
    ]
    records.sort(key=lambda r: tuple(map(dict.__getitem__, ranks, r.coordinates)))
    for first, second in zip(records, records[1:], strict=False):
        if first.coordinates == second.coordinates:
            run = ", ".join(f"{k}={v}" for k, v in zip(COORDINATES, first.coordinates, strict=True))
            raise SciquantError(
                f"{first.path} and {second.path}: both hold the run {run}; remove the stale one"
            )
    return records


def fp32_networks(
    records: Sequence[RunRecord],
) -> dict[tuple[Any, ...], dict[str, dict[str, float]]]:
    """Per (dataset, model, seed): the per-simulation errors of its FP32 reference run."""
    return {
        r.coordinates[:3]: r.per_simulation
        for r in records
        if tuple(r.coordinates[3:]) == FP32_RUN and r.per_simulation
    }


def with_retained_gain(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The records with each run's retained gain (`sciquant.report.gain`) added, and the FP32
    network's own gain over the no-network baseline on its FP32 reference run.

    The FP32 network of a run is the FP32 reference run of its (dataset, model, seed); runs
    without per-simulation errors or without that baseline are left as they are.
    """
    fp32 = fp32_networks(records)
    updated = []
    for record in records:
        network = fp32.get(record.coordinates[:3])
        baseline = record.baseline_per_simulation.get(record.gain_baseline)
        if network and baseline:
            gains = (
                network_gains(baseline, network)
                if tuple(record.coordinates[3:]) == FP32_RUN
                else run_gains(baseline, network, record.per_simulation)
            )
            record = replace(record, metrics={**record.metrics, **gains})
        updated.append(record)
    return updated


#: The coordinates of a quantity pooled over seeds (`pooled_retained_gains`).
POOLED_COORDINATES = tuple(dim for dim in COORDINATES if dim != "seed")


def pooled_retained_gains(records: Sequence[RunRecord]) -> dict[tuple[Any, ...], dict[str, float]]:
    """Per (dataset, model, target, method, precision) run in two or more seeds, its retained
    gain pooled over them (`sciquant.report.gain.pooled_gains`), each seed paired with its own
    FP32 network and baseline; keys as `POOLED_COORDINATES`. The FP32 network itself has none.
    """
    seed = COORDINATES.index("seed")
    fp32 = fp32_networks(records)
    seeds: dict[tuple[Any, ...], list[RunRecord]] = {}
    for record in records:
        baseline = record.baseline_per_simulation.get(record.gain_baseline)
        if tuple(record.coordinates[3:]) == FP32_RUN or not record.per_simulation:
            continue
        if not baseline or not fp32.get(record.coordinates[:3]):
            continue
        key = record.coordinates[:seed] + record.coordinates[seed + 1 :]
        seeds.setdefault(key, []).append(record)
    pooled = {}
    for key, runs in seeds.items():
        gains = pooled_gains(
            [r.baseline_per_simulation[r.gain_baseline] for r in runs],
            [fp32[r.coordinates[:3]] for r in runs],
            [r.per_simulation for r in runs],
        )
        if gains:
            pooled[key] = gains
    return pooled


def metric_names(records: Sequence[RunRecord]) -> list[str]:
    """Every scalar metric of any run, in order of first appearance."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.metrics))
    return list(names)


def to_dataset(records: Sequence[RunRecord], study_info: dict[str, Any]) -> xr.Dataset:
    """The cube of these runs: the full product of coordinates, NaN where a run is absent."""
    labels = {
        dim: label_order(dim, (r.coordinates[d] for r in records))
        for d, dim in enumerate(COORDINATES)
    }
    positions = {dim: label_ranks(dim, labels[dim]) for dim in COORDINATES}
    index = tuple(
        np.array([positions[dim][r.coordinates[d]] for r in records], dtype=np.intp)
        for d, dim in enumerate(COORDINATES)
    )
    shape = tuple(len(labels[dim]) for dim in COORDINATES)
    variables = {}
    any_diverged = any(r.diverged for r in records)
    for name in ["simulated", *(["diverged"] if any_diverged else []), *metric_names(records)]:
        values = np.full(shape, np.nan)
        if name == "simulated":
            values[index] = [float(r.simulated) for r in records]
        elif name == "diverged":
            values[index] = [float(len(r.diverged)) for r in records]
        else:
            values[index] = [r.metrics.get(name, math.nan) for r in records]
        variables[name] = (COORDINATES, values, variable_attrs(name))
    coords = {
        dim: np.array(labels[dim], dtype=np.int64 if dim == "seed" else object)
        for dim in COORDINATES
    }
    layers = list(dict.fromkeys(layer for r in records for layer in r.layer_sqnr_db))
    if layers:
        values = np.full((*shape, len(layers)), np.nan)
        column = {layer: i for i, layer in enumerate(layers)}
        for position, record in zip(zip(*index, strict=True), records, strict=True):
            for layer, value in record.layer_sqnr_db.items():
                values[(*position, column[layer])] = value
        variables[LAYER_SQNR] = (
            (*COORDINATES, LAYER_DIM),
            values,
            {"units": "dB", "description": "output SQNR of each quantized layer against the "
             "float network on calibration inputs (sciquant.quant.debug); inf: exact"},
        )  # fmt: skip
        coords[LAYER_DIM] = np.array(layers, dtype=object)
    pooled = pooled_retained_gains(records)
    if pooled:  # over (dataset, model, target, method, precision): no seed dimension
        seed = COORDINATES.index("seed")
        pooled_shape = shape[:seed] + shape[seed + 1 :]
        pooled_index = {
            r.coordinates[:seed] + r.coordinates[seed + 1 :]: position[:seed] + position[seed + 1 :]
            for position, r in zip(zip(*index, strict=True), records, strict=True)
        }
        for name in dict.fromkeys(n for gains in pooled.values() for n in gains):
            values = np.full(pooled_shape, np.nan)
            for key, gains in pooled.items():
                values[pooled_index[key]] = gains.get(name, math.nan)
            description = (
                "retained gain pooled over the seeds that ran (errors averaged per test "
                "simulation first); its interval a paired bootstrap over simulations"
            )
            if name not in variables:  # a run's own metric of that name comes first
                variables[name] = (
                    POOLED_COORDINATES,
                    values,
                    {**variable_attrs(name), "description": description},
                )
    attrs = provenance_attrs(records, study_info)
    if any_diverged:
        attrs["diverged_metrics"] = json.dumps(
            [
                {"run": dict(zip(COORDINATES, r.coordinates, strict=True)), "metrics": r.diverged}
                for r in records
                if r.diverged
            ]
        )
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def variable_attrs(name: str) -> dict[str, str]:
    """`units` from the metric's name (`_pct` → %, `_s` → s, `_ms` → ms, `_bytes` → bytes)."""
    if name == "simulated":
        return {"description": "1: bit-width below the target's native ones, run as simulation"}
    if name == "diverged":
        return {"description": "errors and scores of the run that came out NaN or infinite"}
    match = UNIT_PATTERN.search(name)
    return {"units": UNITS[match.group(1)]} if match else {}


def _settings_hashes(payload: dict[str, Any]) -> dict[str, str]:
    """A metrics.json's `settings_hashes` (section → hash), or its `config_hash` (earlier
    versions: one hash of the whole config) as section `config`; {} where it has neither."""
    hashes = payload.get("settings_hashes")
    if isinstance(hashes, dict):
        return {str(k): str(v) for k, v in hashes.items() if v is not None}
    legacy = payload.get("config_hash")
    return {"config": str(legacy)} if legacy is not None else {}


def provenance_attrs(records: Sequence[RunRecord], study_info: dict[str, Any]) -> dict[str, Any]:
    """Study info and what the runs were made with, as NetCDF-safe attributes."""

    def distinct(values: Iterable[Any]) -> list[Any]:
        return sorted({v for v in values if v is not None}, key=str)

    packages: dict[str, set[str]] = {}
    devices: dict[str, set[str]] = {}
    for record in records:
        for package, version in record.provenance.get("packages", {}).items():
            packages.setdefault(package, set()).add(str(version))
        device = record.provenance.get("device")
        if device is not None:
            devices.setdefault(record.coordinates[3], set()).add(str(device))
    attrs: dict[str, Any] = {"title": "sciquant result cube", "runs": len(records)}
    attrs["study"] = study_info.get("study") or ", ".join(distinct(r.study for r in records))
    for key, value in study_info.items():
        if key != "study":
            attrs[key] = value if isinstance(value, str | int | float) else json.dumps(value)
    sections: dict[str, set[str]] = {}
    for record in records:
        for section, digest in record.settings_hashes.items():
            sections.setdefault(section, set()).add(digest)
    attrs["run_settings_hashes"] = json.dumps({s: sorted(d) for s, d in sorted(sections.items())})
    attrs["packages"] = json.dumps({p: sorted(v) for p, v in sorted(packages.items())})
    attrs["devices"] = json.dumps({t: sorted(devices[t]) for t in label_order("target", devices)})
    for key, name in (("git_revision", "git_revisions"), ("python", "python_versions"),
                      ("host", "hosts")):  # fmt: skip
        attrs[name] = json.dumps(distinct(r.provenance.get(key) for r in records))
    attrs["wall_time_s_total"] = float(sum(r.provenance.get("wall_time_s") or 0.0 for r in records))
    baselines: dict[str, dict[str, dict[str, float]]] = {}
    gain_baselines: dict[str, str] = {}  # the retained gain's baseline of each dataset
    for record in records:  # per dataset, the first run that has them
        if record.baselines:
            baselines.setdefault(str(record.coordinates[0]), record.baselines)
            gain_baselines.setdefault(str(record.coordinates[0]), record.gain_baseline)
    attrs["baselines"] = json.dumps(baselines)
    attrs["gain_baselines"] = json.dumps(gain_baselines)
    return attrs


def to_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """The tidy table: one row per run, columns coordinates, `simulated`, metrics; where a run
    diverged, a `diverged` column (the count, as in the cube) after `simulated`."""
    names = metric_names(records)
    counts = ["diverged"] if any(r.diverged for r in records) else []
    rows = [
        [
            *r.coordinates,
            r.simulated,
            *([len(r.diverged)] if counts else []),
            *(r.metrics.get(n, math.nan) for n in names),
        ]
        for r in records
    ]
    return pd.DataFrame(rows, columns=[*COORDINATES, "simulated", *counts, *names])


def cache_path(out_nc: Path) -> Path:
    """Where `aggregate` keeps its parsed records: `metrics.nc` → `metrics.cache.json`."""
    return out_nc.with_name(out_nc.stem + ".cache.json")


def aggregate(
    metrics_files: Sequence[Path],
    out_nc: Path,
    out_csv: Path,
    study_info: dict[str, Any],
    use_cache: bool = True,
) -> xr.Dataset:
    """Every run's metrics.json → `out_nc` (NetCDF, h5netcdf) and `out_csv` (one row per run).

    With `use_cache`, parsed files are kept in `cache_path(out_nc)`, so a re-aggregation after a
    rerun of some stages parses only the metrics.json files that changed (mtime or size).
    """
    if not metrics_files:
        raise SciquantError("no metrics.json files given; the study has no runs to aggregate")
    out_nc.parent.mkdir(parents=True, exist_ok=True)
    records = read_all(metrics_files, cache_path(out_nc) if use_cache else None)
    records = with_retained_gain(records)
    cube = to_dataset(records, study_info)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_nc) as partial_nc:
        cube.to_netcdf(partial_nc, engine="h5netcdf")
    with atomic_path(out_csv) as partial_csv:
        to_table(records).to_csv(partial_csv, index=False)
    print(
        f"{len(records)} runs, {len(cube.data_vars)} variables, "
        f"dims {dict(cube.sizes)} → {out_nc}, {out_csv}"
    )
    return cube


def load_cube(path: Path) -> xr.Dataset:
    """Read a cube written by `aggregate` fully into memory (the file is closed again).

    A missing file, or one that is not a complete cube (truncated, corrupt, another kind of
    file), is an error naming it and saying to aggregate again.
    """
    what = "the NetCDF file `sciquant aggregate --out-nc` writes (results/summary/metrics.nc)"
    if Path(path).is_dir():
        raise SciquantError(f"{path}: a folder, not a result cube; pass {what}")
    if not Path(path).is_file():
        raise SciquantError(f"{path}: result cube not found; run `sciquant aggregate` first")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as opened:
            cube = opened.load()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if Path(path).suffix.lower() != ".nc":  # another file given by mistake
            raise SciquantError(
                f"{path}: not a result cube ({type(error).__name__}); pass {what}"
            ) from error
        raise SciquantError(
            f"{path}: not a readable result cube, truncated or corrupt ({type(error).__name__}: "
            f"{error}); run `sciquant aggregate` again to rewrite it"
        ) from error
    if "simulated" not in cube or tuple(cube["simulated"].dims) != COORDINATES:
        raise SciquantError(
            f"{path}: not a result cube written by `sciquant aggregate` (no `simulated` over "
            f"{', '.join(COORDINATES)}); pass {what}, or run `sciquant aggregate` to write one"
        )
    return cube


def fake_metrics(run_index: int, coordinates: dict[str, Any]) -> dict[str, Any]:
    """A metrics.json payload shaped like `sciquant evaluate`'s, with made-up numbers."""
    rng = np.random.default_rng(run_index)
    weight_bits = precision_bits(coordinates["precision"])[0]
    error = 1.0 + 8.0 / max(weight_bits, 1) + 0.1 * rng.random()
    per_simulation = {
        f"sim_{i:03d}": {"pressure_error_pct": error * (1 + 0.1 * rng.standard_normal()),
                         "flowrate_error_pct": 2 * error}
        for i in range(5)
    }  # fmt: skip
    metrics = {
        "pressure_error_pct": error,
        "pressure_error_pct_std": 0.1 * error,
        "flowrate_error_pct": 2.0 * error,
        "flowrate_error_pct_std": 0.2 * error,
        "test_simulations": 5,
        "rollout_time_s_median": 0.01 * weight_bits * (1 + 0.05 * rng.random()),
        "rollout_time_repeats": 5,
        "parameters": 12345,
        "model_bytes": 12345 * weight_bits // 8,
        "per_simulation": per_simulation,
    }
    return {
        "coordinates": coordinates,
        "study": "bench",
        "settings_hashes": {"datasets.bench": "0" * 64, "models.bench": "1" * 64},
        "simulated": weight_bits < 8,
        "metrics": metrics,
        "provenance": {"packages": {"sciquant": "0.1.0"}, "python": "3.11", "device": "cpu",
                       "host": "bench", "threads": 1, "git_revision": "unknown",
                       "wall_time_s": 1.0},
    }  # fmt: skip


def write_fake_study(root: Path, n_runs: int) -> list[Path]:
    """`n_runs` fake metrics.json files under `root/results/...` (for benchmarks)."""
    precisions = ["fp32", "fp16", "w8a8", "w8a4", "w6a8", "w6a6", "w4a8", "w4a4", "w3a8", "w2a8"]
    grid = (
        (dataset, "meshgraphnet", seed, target, method, precision)
        for dataset in (f"bloodflow{i}" for i in range(100))
        for seed in range(5)
        for target in TARGET_ORDER
        for method in METHOD_ORDER
        for precision in precisions
    )
    paths = []
    for run_index, key in zip(range(n_runs), grid, strict=False):
        coordinates = dict(zip(COORDINATES, key, strict=True))
        folder = "results/{}/{}/seed{}/{}/{}/{}".format(*key)
        payload = fake_metrics(run_index, coordinates)
        paths.append(write_json(root / folder / "metrics.json", payload))
    return paths


def bench_aggregate(n_runs: int = 1000, rerun_fraction: float | None = None) -> float:
    """Seconds to aggregate `n_runs` fake metrics.json files (writing them is not timed).

    Without `rerun_fraction`: from scratch (no cache). With it: after a first aggregation, that
    fraction of the runs is rewritten, as after a rerun of some stages, and only then timed.
    """
    with tempfile.TemporaryDirectory(prefix="sciquant-bench-") as folder:
        root = Path(folder)
        paths = write_fake_study(root, n_runs)
        out_nc, out_csv = root / "metrics.nc", root / "metrics.csv"
        if rerun_fraction is not None:
            aggregate(paths, out_nc, out_csv, {"study": "bench"})
            for index, path in enumerate(paths[: round(rerun_fraction * len(paths))]):
                payload = fake_metrics(n_runs + index, json.loads(path.read_text())["coordinates"])
                write_json(path, payload)
        started = time.perf_counter()
        aggregate(paths, out_nc, out_csv, {"study": "bench"})
        return time.perf_counter() - started


# Summaries over seeds: what the report's tables and figures show.

#: An error's median over the test simulations (`pressure_error_pct_median`): a table column
#: beside the mean (which one bad tree can carry), not a figure or a ranking of its own.
TYPICAL_SUFFIX = "_error_pct_median"
SPREAD_SUFFIXES = ("_std", "_min", "_max", "_repeats", "_ci_low", "_ci_high")
COUNT_METRICS = ("simulated", "diverged", "test_simulations")
#: The paired speed-ups a timed run's evaluation measures against its target's FP32, in one
#: process, interleaved (`sciquant.runtime.paired`): the network's calls alone first (what
#: `sciquant bench rollout` times), then the whole rollout / batch-1 call.
PAIRED_SPEEDUPS = ("paired_step_speedup", "paired_speedup")
#: How a timing was taken, not what it measured: kept in the cube, not a table column.
TIMING_DETAILS = (
    *PAIRED_SPEEDUPS,
    "contended",
    "cpu_share",
    "load_average_1min",
    "timing_pairs",
    "baseline_rollout_time_s_median",
    "baseline_step_time_s_median",
    "baseline_latency_ms_median",
)
SCORE_PREFIXES = (
    "accuracy", "balanced_accuracy", "f1", "auc", "recall", "r2", "retained_gain",
)  # fmt: skip
TIME_PATTERN = re.compile(r"(?:^|_)(?:time|latency|ms|s)(?:_|$)")
ERROR_PATTERN = re.compile(r"error|loss|(?:^|_)(?:mse|rmse|mae)(?:_|$)")
PREFERRED_TIMES = ("latency_ms_median", "rollout_time_s_median")


def metric_kind(name: str) -> str:
    """`error` (lower is better), `score` (higher is better), `time` (lower is better), `other`."""
    if name.startswith(SCORE_PREFIXES):
        return "score"
    if ERROR_PATTERN.search(name):
        return "error"
    if TIME_PATTERN.search(name):
        return "time"
    return "other"


def headline_metrics(cube: xr.Dataset) -> list[str]:
    """Measured metrics worth a table column: quality first, then times, then the rest."""
    names = [
        name
        for name in cube.data_vars
        if name not in COUNT_METRICS
        and name not in TIMING_DETAILS
        and not str(name).endswith(SPREAD_SUFFIXES)
        and not str(name).startswith((*DEBUG_PREFIXES, TRAINING_PREFIX))
        and LAYER_DIM not in cube[name].dims
        and "seed" in cube[name].dims  # not a quantity pooled over seeds
        and bool(cube[name].notnull().any())
    ]
    rank = {"error": 0, "score": 0, "time": 1, "other": 2}
    return sorted(names, key=lambda name: rank[metric_kind(name)])


def quality_metrics(cube: xr.Dataset) -> list[str]:
    return [
        name
        for name in headline_metrics(cube)
        if metric_kind(name) in ("error", "score") and not name.endswith(TYPICAL_SUFFIX)
    ]


def time_metric(cube: xr.Dataset) -> str | None:
    """The end-to-end time that speed-ups are computed from (None where no run was timed)."""
    times = [name for name in headline_metrics(cube) if metric_kind(name) == "time"]
    for name in (*PREFERRED_TIMES, *(n for n in times if n.endswith("_median")), *times):
        if name in times:
            return name
    return None


def workload_slices(cube: xr.Dataset) -> list[tuple[str, str, xr.Dataset]]:
    """(dataset, model, runs) for each pair with runs; labels without a run are dropped."""
    slices = []
    for dataset in cube["dataset"].values:
        for model in cube["model"].values:
            runs = cube.sel({"dataset": dataset, "model": model})
            present = runs["simulated"].notnull()
            if not bool(present.any()):
                continue
            keep = {
                dim: present.any([d for d in present.dims if d != dim]).values
                for dim in present.dims
            }
            slices.append((str(dataset), str(model), runs.isel(keep)))
    return slices


RunKey = tuple[str, str, str]  # (target, method, precision)


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds, half-width of its 95 % confidence interval (t-distribution), seed count."""

    mean: float
    half_width: float
    n: int


def seed_estimates(values: xr.DataArray) -> dict[RunKey, Estimate]:
    """Mean ± 95 % CI over `seed` for every (target, method, precision) with at least one value."""
    from scipy.special import stdtrit  # the t quantile, without scipy.stats' slow import

    n = values.count("seed")
    mean = values.mean("seed", skipna=True)
    std = values.std("seed", ddof=1, skipna=True) if values.sizes["seed"] > 1 else mean * np.nan
    t_quantile = stdtrit(np.maximum(n.values - 1, 1), 0.975)
    half_width = np.where(
        n.values > 1, t_quantile * std.values / np.sqrt(np.maximum(n.values, 1)), np.nan
    )
    labels = [[str(label) for label in mean[dim].values] for dim in mean.dims]
    means, counts = mean.values, n.values
    return {
        tuple(labels[d][i] for d, i in enumerate(index)): Estimate(
            float(means[index]), float(half_width[index]), int(counts[index])
        )
        for index in zip(*np.nonzero(counts), strict=True)
    }


def fp32_graph(target: str) -> str:
    """The target whose FP32 run is `target`'s (`fp32_target`); a target no longer installed
    (a plug-in's, in an older cube) is its own."""
    return fp32_target(target) if target in TARGETS else target


def fp32_baseline(runs: xr.Dataset, name: str, target: str) -> tuple[xr.DataArray, str] | None:
    """A metric's FP32 values per seed on `target`'s FP32 graph (`fp32_graph`), else on
    `reference`, with that target's name."""
    for candidate in dict.fromkeys((target, fp32_graph(target), "reference")):
        try:
            fp32 = {"target": candidate, "method": "none", "precision": "fp32"}
            values = runs[name].sel(fp32).drop_vars(list(fp32))
        except KeyError:
            continue
        if bool(values.notnull().any()):
            return values, candidate
    return None


def speedup_metric(runs: xr.Dataset) -> str | None:
    """The paired speed-up these runs carry (`PAIRED_SPEEDUPS`, first found), or None."""
    for name in PAIRED_SPEEDUPS:
        if name in runs and bool(runs[name].notnull().any()):
            return name
    return None


def speedups(runs: xr.Dataset) -> tuple[xr.DataArray, dict[str, str]]:
    """Paired speed-ups over FP32 per seed (×), and each timed target's baseline (named as
    the target itself).

    Each value was measured in the run's own evaluation, interleaved with the FP32 of its
    target's graph (`fp32_target`: openvino-avx2's is openvino-cpu's) on the same inputs
    (`sciquant.runtime.paired`); an FP32 run is 1 by definition. Times of two separate jobs
    are never divided: a run without a paired measurement (a simulation, or an older
    metrics.json) has no speed-up (NaN).
    """
    name = speedup_metric(runs)
    if name is None:
        return runs["simulated"] * np.nan, {}
    values = runs[name]
    timed = values.notnull().any([d for d in values.dims if d != "target"])
    baselines = {
        str(t): str(t) for t, has in zip(runs["target"].values, timed.values, strict=True) if has
    }
    return values, baselines


def diverged_runs(runs: xr.Dataset) -> dict[RunKey, int]:
    """Per (target, method, precision): in how many seeds it diverged (only those that did)."""
    if "diverged" not in runs:
        return {}
    seeds = (runs["diverged"] > 0).sum("seed").expand_dims("seed")
    return {key: int(e.mean) for key, e in seed_estimates(seeds).items() if e.mean > 0}


def diverged_metric_seeds(runs: xr.Dataset) -> dict[RunKey, dict[str, int]]:
    """Per (target, method, precision) of these runs' (dataset, model): in how many seeds each
    of its errors and scores diverged (from the cube's `diverged_metrics`)."""
    try:
        entries = json.loads(str(runs.attrs.get("diverged_metrics", "[]")))
    except json.JSONDecodeError:
        return {}
    labels = {
        dim: {str(v) for v in np.atleast_1d(runs[dim].values)}
        for dim in ("dataset", "model", "target", "method", "precision")
    }
    seeds = {int(v) for v in np.atleast_1d(runs["seed"].values)}
    found: dict[RunKey, dict[str, int]] = {}
    for entry in entries:
        run = entry.get("run", {}) if isinstance(entry, dict) else {}
        if not all(str(run.get(dim)) in labels[dim] for dim in labels):
            continue
        if run.get("seed") not in seeds:
            continue
        key = (str(run["target"]), str(run["method"]), str(run["precision"]))
        for name in entry.get("metrics", []):
            found.setdefault(key, {})
            found[key][name] = found[key].get(name, 0) + 1
    return found


def contended_runs(runs: xr.Dataset) -> set[RunKey]:
    """The runs whose timing shared its CPU with other work in any seed (`contended`)."""
    if "contended" not in runs:
        return set()
    flagged = seed_estimates(runs["contended"].max("seed", skipna=True).expand_dims("seed"))
    return {key for key, estimate in flagged.items() if estimate.mean > 0}


# The error budget of "what to deploy".

BUDGET_BOUNDS = ("max_ratio_to_fp32", "min_ratio_to_fp32", "max_value", "min_value")

#: Used when a study gives none: errors at most 1.2 × FP32's, scores at least 0.99 × FP32's.
DEFAULT_BUDGET = (
    {"metric": "pressure_error_pct", "max_ratio_to_fp32": 1.2},
    {"metric": "flowrate_error_pct", "max_ratio_to_fp32": 1.2},
    {"metric": "accuracy", "min_ratio_to_fp32": 0.99},
)


@dataclass(frozen=True)
class Constraint:
    """One bound on one metric's mean over seeds: `{"metric": ..., <bound>: number}`."""

    metric: str
    bound: str
    limit: float

    def threshold(self, fp32: float) -> float:
        """The bound in the metric's own units (ratios scaled by the FP32 mean)."""
        return self.limit * fp32 if self.bound.endswith("_to_fp32") else self.limit

    def holds(self, value: float, threshold: float) -> bool:
        """Whether `value` is within `threshold` (from `threshold(fp32)`)."""
        return value <= threshold if self.bound.startswith("max") else value >= threshold

    @property
    def sign(self) -> str:
        return "≤" if self.bound.startswith("max") else "≥"

    def describe(self) -> str:
        scale = " × FP32" if self.bound.endswith("_to_fp32") else ""
        return f"{self.metric} {self.sign} {self.limit:g}{scale}"


def parse_budget(budget: dict[str, Any] | Sequence[dict[str, Any]] | None) -> list[Constraint]:
    """A budget (one constraint or a list, all must hold; None: `DEFAULT_BUDGET`) → constraints.

    A constraint is `{"metric": NAME, BOUND: NUMBER}` with BOUND one of `max_ratio_to_fp32`,
    `min_ratio_to_fp32` (relative to the FP32 mean of the target's FP32 graph, `fp32_target`,
    else the reference's), `max_value`, `min_value` (in the metric's units); several bounds may
    share one metric.
    """
    if budget is not None and not isinstance(budget, dict | list | tuple):
        raise SciquantError(
            f"error budget {budget!r}: give one constraint {{metric: NAME, BOUND: NUMBER}} or a "
            "list of them"
        )
    items = DEFAULT_BUDGET if budget is None else [budget] if isinstance(budget, dict) else budget
    constraints = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("metric"), str):
            raise SciquantError(f"error budget {item!r}: each entry needs a `metric` name")
        unknown = sorted(set(item) - {"metric", *BUDGET_BOUNDS})
        bounds = [key for key in BUDGET_BOUNDS if key in item]
        if unknown or not bounds:
            raise SciquantError(
                f"error budget {item!r}: give `metric` and one or more of "
                f"{', '.join(BUDGET_BOUNDS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        for key in bounds:
            if not isinstance(item[key], int | float) or isinstance(item[key], bool):
                raise SciquantError(f"error budget {item!r}: `{key}` must be a number")
            constraints.append(Constraint(item["metric"], key, float(item[key])))
    return constraints


@dataclass(frozen=True)
class Check:
    """A constraint, the chosen run's mean and the threshold it was held to (metric's units)."""

    constraint: Constraint
    value: float
    threshold: float


@dataclass(frozen=True)
class Deployment:
    """The choice for one target: the fastest (method, precision) within the budget, or None."""

    target: str
    method: str | None
    precision: str | None
    time: Estimate | None
    speedup: Estimate | None
    checks: tuple[Check, ...]
    reason: str


def check_budget_metrics(cube: xr.Dataset, constraints: Sequence[Constraint]) -> None:
    """SciquantError for a constraint on a metric no run of the cube has (a misspelt name would
    otherwise drop out of the budget without a word), naming the closest metrics it has."""
    import difflib

    metrics = sorted(
        name
        for name in cube.data_vars
        if name not in RESERVED_NAMES and tuple(cube[name].dims) == COORDINATES
    )
    for constraint in constraints:
        if constraint.metric in metrics:
            continue
        close = difflib.get_close_matches(constraint.metric, metrics, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else "check the name"
        raise SciquantError(
            f"error budget: no run has the metric {constraint.metric!r} ({hint}); budget "
            f"metrics are the names in metrics.json, e.g. {', '.join(metrics[:6])}"
        )


def applicable_constraints(runs: xr.Dataset, constraints: Sequence[Constraint]) -> list[Constraint]:
    """The constraints on metrics these runs have."""
    return [c for c in constraints if c.metric in runs and bool(runs[c.metric].notnull().any())]


def choose_deployments(runs: xr.Dataset, constraints: Sequence[Constraint]) -> list[Deployment]:
    """Per target: the fastest measured, non-simulated (method, precision) within every constraint.

    Values are means over seeds; where no run of the target was timed, the fewest bits wins.
    Constraints on metrics these runs do not have are left out (no deployments if none is left).
    A (method, precision) that diverged in any seed (`diverged_runs`) is never a candidate: the
    mean over its other seeds would hide that it can blow up.
    """
    applicable = applicable_constraints(runs, constraints)
    if not applicable:
        return []
    means = {c.metric: seed_estimates(runs[c.metric]) for c in applicable}
    time_name = time_metric(runs)
    times = seed_estimates(runs[time_name]) if time_name else {}
    gains = seed_estimates(speedups(runs)[0])
    # Simulated runs are not candidates: the target cannot run that precision natively.
    diverged = diverged_runs(runs)
    native = [
        key
        for key, e in seed_estimates(runs["simulated"]).items()
        if e.mean == 0 and key not in diverged
    ]
    deployments = []
    for target in map(str, runs["target"].values):
        thresholds = {}
        for c in applicable:
            found = fp32_baseline(runs, c.metric, target)
            thresholds[c] = c.threshold(float(found[0].mean()) if found else math.nan)
        if any(math.isnan(t) for t in thresholds.values()):
            reason = "no FP32 run to scale the budget by"
            deployments.append(Deployment(target, None, None, None, None, (), reason))
            continue
        # A target without an FP32 run of its own runs that of its FP32 graph (`fp32_graph`):
        # deploying FP32 there is deploying that run.
        twin = (fp32_graph(target), "none", "fp32")
        eligible = [
            key
            for key in native
            if (key[0] == target or key == twin)
            and all(key in means[c.metric] for c in applicable)
            and all(c.holds(means[c.metric][key].mean, thresholds[c]) for c in applicable)
        ]
        deployments.append(fastest(target, eligible, means, thresholds, times, gains))
    return deployments


def fastest(
    target: str,
    eligible: list[RunKey],
    means: dict[str, dict[RunKey, Estimate]],
    thresholds: dict[Constraint, float],
    times: dict[RunKey, Estimate],
    gains: dict[RunKey, Estimate],
) -> Deployment:
    """The eligible run of `target` with the largest paired speed-up over its FP32 (fewest bits
    where none was timed). Speed-ups, not times, are compared: each was measured beside the
    same FP32 in its own process, while two jobs' times met different loads."""
    if not eligible:
        return Deployment(target, None, None, None, None, (), "no measured run within the budget")
    timed = [key for key in eligible if key in gains]
    if timed:
        chosen = max(timed, key=lambda key: gains[key].mean)
        reason = "fastest within the budget (paired speed-up)"
    else:
        chosen = min(eligible, key=lambda key: sum(precision_bits(key[2])))
        reason = "fewest bits within the budget (no timings)"
    if chosen[0] != target:
        reason += f"; FP32 is {chosen[0]}'s FP32 run, the same graph on the same runtime"
    checks = tuple(
        Check(c, means[c.metric][chosen].mean, threshold) for c, threshold in thresholds.items()
    )
    return Deployment(
        target, chosen[1], chosen[2], times.get(chosen), gains.get(chosen), checks, reason
    )
