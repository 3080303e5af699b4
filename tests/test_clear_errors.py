"""Bad input files give a `SciquantError` naming the file (and key) and the fix, not a traceback.

Blood-flow raw data (`dataset_info.json` with an unusable period or time step, a simulation with
one stored time step, a file that is not UTF-8), prepared data (a truncated sample, an unreadable
`index.json`), and the report's inputs (a truncated cube, a metric name the cube cannot hold).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sciquant import cli
from sciquant.data.manifest import write_manifest
from sciquant.errors import SciquantError
from sciquant.provenance import write_json
from sciquant.report.cube import aggregate, load_cube
from sciquant.report.html import build_report
from sciquant.workloads.bloodflow import data as bloodflow
from sciquant.workloads.bloodflow.sim import SimulationParams, synthesize
from sciquant.workloads.bloodflow.vtp import read_centerline, write_centerline

SETTINGS = {"time_offsets": 1, "split": {"train": 0.67, "valid": 0.0, "test": 0.33}}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic simulations in the VMR layout (`vtps/*.vtp` + dataset_info.json)."""
    root = tmp_path_factory.mktemp("raw")
    params = SimulationParams(model="linear", branch_count_range=(3, 3))
    synthesize(root / "raw", 3, seed=5, params=params, progress=False)
    return root / "raw"


@pytest.fixture()
def raw(synthesized: Path, tmp_path: Path) -> Path:
    """A copy of the synthesized raw data this test may break."""
    return Path(shutil.copytree(synthesized, tmp_path / "raw"))


def set_entry(key: str, value: object) -> Callable[[Path], None]:
    """Set one key of the first simulation's `dataset_info.json` entry."""

    def change(vtps: Path) -> None:
        path = vtps / "dataset_info.json"
        info = json.loads(path.read_text())
        info["sim_000"][key] = value
        path.write_text(json.dumps(info))

    return change


def one_time_step(vtps: Path) -> None:
    """Keep only the first stored time step of the first simulation."""
    path = vtps / "sim_000.vtp"
    centerline = read_centerline(path)
    for name in list(centerline.point_data):
        if name.startswith(("pressure_", "flow_")) and name.rsplit("_", 1)[1] != "0":
            del centerline.point_data[name]
    write_centerline(path, centerline)


def latin1(vtps: Path) -> None:
    """Rewrite dataset_info.json in Latin-1 with a non-ASCII character (not UTF-8)."""
    path = vtps / "dataset_info.json"
    info = json.loads(path.read_text())
    info["sim_000"]["note"] = "Gefäß"
    path.write_bytes(json.dumps(info, ensure_ascii=False).encode("latin-1"))


def entry_not_a_mapping(vtps: Path) -> None:
    path = vtps / "dataset_info.json"
    info = json.loads(path.read_text())
    info["sim_000"] = [0.005, 1.0]
    path.write_text(json.dumps(info))


def info_not_a_mapping(vtps: Path) -> None:
    (vtps / "dataset_info.json").write_text(json.dumps(["sim_000", "sim_001", "sim_002"]))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (set_entry("T", 0), r"dataset_info\.json: 'sim_000': 'T' is 0.*> 0"),
        (set_entry("T", -0.8), r"dataset_info\.json: 'sim_000': 'T' is -0\.8.*> 0"),
        (set_entry("dt", 0), r"dataset_info\.json: 'sim_000': 'dt' is 0.*> 0"),
        (set_entry("dt", -0.005), r"dataset_info\.json: 'sim_000': 'dt' is -0\.005.*> 0"),
        (set_entry("T", "one second"), r"dataset_info\.json: 'sim_000': 'T' is 'one second'"),
        (set_entry("T", None), r"dataset_info\.json: 'sim_000': 'T' is None"),
        (set_entry("T", float("nan")), r"dataset_info\.json: 'sim_000': 'T' is nan"),
        (set_entry("T", 0.004), r"dataset_info\.json: 'sim_000': 'T' is 0\.004.*prepare"),
        (one_time_step, r"sim_000\.vtp: 1 stored time step.*dataset_info\.json"),
        (latin1, r"dataset_info\.json: not UTF-8"),
        (entry_not_a_mapping, r"dataset_info\.json: 'sim_000' is not an object"),
        (info_not_a_mapping, r"dataset_info\.json: not an object"),
    ],
    ids=[
        "T-zero", "T-negative", "dt-zero", "dt-negative", "T-text", "T-null", "T-nan",
        "T-under-three-prepare-steps", "one-time-step", "not-utf8", "entry-a-list", "info-a-list",
    ],
)  # fmt: skip
def test_unusable_raw_bloodflow_data_is_named(
    raw: Path, tmp_path: Path, change: Callable[[Path], None], pattern: str
) -> None:
    change(raw / "vtps")
    with pytest.raises(SciquantError, match=pattern):
        bloodflow.prepare(raw, tmp_path / "prepared", bloodflow.PrepareSettings(**SETTINGS))


def test_the_cli_prints_one_line_for_bad_raw_data(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    set_entry("dt", 0)(raw / "vtps")
    argv = ["prepare", "bloodflow", "--raw", str(raw), "--out", str(tmp_path / "prepared"),
            "--settings", json.dumps(SETTINGS)]  # fmt: skip
    assert cli.main(argv) == 2
    stderr = capsys.readouterr().err  # also holds the progress bar
    (error,) = [line for line in stderr.splitlines() if "error:" in line]
    assert "Traceback" not in stderr
    assert error.startswith("sciquant prepare: error: ") and "dataset_info.json" in error


def test_a_delivered_file_that_went_missing_or_shrank_stops_prepare(
    raw: Path, tmp_path: Path
) -> None:
    """A raw folder that no longer holds what its manifest lists would prepare fewer
    simulations, and so a different split: prepare refuses it, naming the files."""
    write_manifest(raw, source={"embedded": {"n_simulations": 3}})
    (raw / "vtps" / "sim_001.vtp").unlink()
    data = (raw / "vtps" / "sim_002.vtp").read_bytes()
    (raw / "vtps" / "sim_002.vtp").write_bytes(data[: len(data) // 2])
    out = tmp_path / "prepared"
    pattern = (
        r"2 of the 4 files manifest\.json lists are not as delivered: vtps/sim_001\.vtp "
        r"\(missing\), vtps/sim_002\.vtp \(\d+ bytes, delivered \d+\).*--forcerun synthesize"
    )
    with pytest.raises(SciquantError, match=pattern):
        bloodflow.prepare(raw, out, bloodflow.PrepareSettings(**SETTINGS))
    assert not out.exists()


def test_simulations_listed_without_a_file_are_named_on_stderr(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without a manifest (a folder laid out by hand), a dataset_info.json entry with no .vtp is
    named beside the simulations that are prepared."""
    path = raw / "vtps" / "dataset_info.json"
    info = json.loads(path.read_text())
    info["sim_007"] = info["sim_000"]
    path.write_text(json.dumps(info))
    bloodflow.prepare(raw, tmp_path / "prepared", bloodflow.PrepareSettings(**SETTINGS))
    err = capsys.readouterr().err
    assert "lists 1 simulation without a .vtp file (sim_007); preparing the 3 present" in err


@pytest.fixture()
def prepared_sample(tmp_path: Path) -> tuple[Path, Path]:
    """A prepared folder with one sample file, as `prepare` writes it."""
    graphs = tmp_path / "prepared" / "graphs"
    graphs.mkdir(parents=True)
    sample = graphs / "sim_000_o0.npz"
    rng = np.random.default_rng(0)
    np.savez(sample, pressure=rng.random((200, 50)), flowrate=rng.random((200, 50)))
    return tmp_path / "prepared", sample


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.1])
def test_truncated_sample_is_named(prepared_sample: tuple[Path, Path], keep: float) -> None:
    prepared, sample = prepared_sample
    data = sample.read_bytes()
    sample.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(SciquantError, match=rf"{sample}: .*rerun the prepare stage"):
        bloodflow.load_sample(prepared, "sim_000_o0")


def test_sample_with_damaged_array_bytes_is_named(prepared_sample: tuple[Path, Path]) -> None:
    """The archive's directory is intact, but an array's bytes are not (a damaged copy)."""
    prepared, sample = prepared_sample
    data = bytearray(sample.read_bytes())
    start = data.index(b"NUMPY") + 200  # inside the first array's values
    data[start : start + 50] = b"x" * 50
    sample.write_bytes(bytes(data))
    with pytest.raises(SciquantError, match=rf"{sample}: .*rerun the prepare stage"):
        bloodflow.load_sample(prepared, "sim_000_o0")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(b"\xff\xfe{}", "not UTF-8"), (b"[1, 2]", "not an object")],
)
def test_unreadable_index_is_named(tmp_path: Path, content: bytes, pattern: str) -> None:
    (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(SciquantError, match=rf"index\.json: .*{pattern}.*rerun the prepare stage"):
        bloodflow.load_index(tmp_path)


def run_payload(seed: int, metrics: dict[str, float] | None = None) -> dict:
    coordinates = {"dataset": "bloodflow", "model": "meshgraphnet", "seed": seed,
                   "target": "reference", "method": "none", "precision": "fp32"}  # fmt: skip
    return {"coordinates": coordinates, "study": "errors", "simulated": False,
            "metrics": {"pressure_error_pct": 1.0, **(metrics or {})}}  # fmt: skip


@pytest.fixture()
def cube_file(tmp_path: Path) -> Path:
    paths = [write_json(tmp_path / f"seed{s}/metrics.json", run_payload(s)) for s in (0, 1)]
    aggregate(paths, tmp_path / "summary/metrics.nc", tmp_path / "summary/metrics.csv", {})
    return tmp_path / "summary/metrics.nc"


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.0])
def test_truncated_cube_is_named_by_the_report(
    cube_file: Path, tmp_path: Path, keep: float
) -> None:
    data = cube_file.read_bytes()
    cube_file.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(SciquantError, match=rf"{cube_file}: .*sciquant aggregate"):
        build_report(cube_file, tmp_path / "index.html")
    assert not (tmp_path / "index.html").exists()


def test_a_file_that_is_not_a_cube_is_named(tmp_path: Path) -> None:
    import xarray as xr

    other = tmp_path / "other.nc"
    xr.Dataset({"x": ("t", np.arange(3.0))}).to_netcdf(other, engine="h5netcdf")
    with pytest.raises(SciquantError, match=rf"{other}: not a result cube.*sciquant aggregate"):
        load_cube(other)


def test_the_cli_prints_one_line_for_a_truncated_cube(
    cube_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cube_file.write_bytes(cube_file.read_bytes()[:100])
    assert cli.main(["report", "--cube", str(cube_file), "--out", str(tmp_path / "i.html")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("sciquant report: error: ")
    assert str(cube_file) in error


@pytest.mark.parametrize("name", ["pressure/error_pct", "seed", "simulated", "diverged"])
def test_a_metric_name_the_cube_cannot_hold_is_named(tmp_path: Path, name: str) -> None:
    good = write_json(tmp_path / "seed0/metrics.json", run_payload(0))
    bad = write_json(tmp_path / "seed1/metrics.json", run_payload(1, {name: 2.0}))
    out = tmp_path / "summary"
    with pytest.raises(SciquantError, match=rf"{bad}: metric {name!r} .*rename it"):
        aggregate([good, bad], out / "metrics.nc", out / "metrics.csv", {})
    # No cube, table or partial file is left behind (the parse cache may be).
    assert sorted(p.name for p in out.iterdir() if p.name != "metrics.cache.json") == []


def test_a_folder_or_another_file_given_as_metrics_or_cube(tmp_path: Path) -> None:
    """The report's inputs mistaken for one another: each error says what to pass instead."""
    (tmp_path / "cube.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SciquantError, match=r"a folder, not a metrics file.*metrics\.json"):
        aggregate([tmp_path], tmp_path / "m.nc", tmp_path / "m.csv", {})
    with pytest.raises(SciquantError, match=r"a folder, not a result cube; pass the NetCDF"):
        load_cube(tmp_path)
    with pytest.raises(SciquantError, match=r"cube\.csv: not a result cube \(OSError\); pass"):
        load_cube(tmp_path / "cube.csv")
    assert (tmp_path / "cube.csv").read_text() == "a,b\n1,2\n"


def test_overview_arguments_and_unreadable_pixel_maps(
    synthesized: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["overview", "bloodflow", "--raw", str(synthesized), "--out", str(tmp_path / "o.png")]
    for count in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--simulations", count])
        assert "a simulation count is a whole number ≥ 1" in capsys.readouterr().err
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "pixelmaps.npz").write_bytes(b"PK\x03\x04 truncated")
    md_argv = ["overview", "md", "--raw", str(tmp_path), "--prepared", str(tmp_path / "md"),
               "--out", str(tmp_path / "md.png")]  # fmt: skip
    assert cli.main(md_argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "prepare" in err and str(tmp_path / "md") in err
