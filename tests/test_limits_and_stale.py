"""Limits on downloads and archives, synthesis owning its output folder, and two messages of
the blood-flow training and quantize stages.

- `fetch` refuses a download larger than `max_download_bytes` (announced by the server or
  streamed past it) and an archive with too many members, too many unpacked bytes or a
  compression ratio no dataset has; every file is served by a small HTTP server on 127.0.0.1
  and every archive is built in the test.
- The embedded simulators leave exactly their own files in the output folder and refuse a
  folder that holds anything else.
- A corrupt `quantized.pt` points to the quantize stage; a resume with another torch thread
  count says that the result is not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sciquant.data.download import RemoteFile, fetch
from sciquant.data.manifest import MANIFEST, write_manifest
from sciquant.errors import SciquantError
from sciquant.workloads.bloodflow import sim as bloodflow_sim
from sciquant.workloads.md import sim as md_sim
from tests.fileserver import FileHandler, Served, serving, sha
from tests.test_train_bloodflow import tiny_prepared

FAST = {"retries": 1, "backoff_s": 0.01, "timeout_s": 5.0, "progress": False}
MIB = 1 << 20


# --- a server that serves files, streams forever or announces a huge file -------------------

#: What the endless stream sends at most before giving up (far above the limits tested).
STREAM_CAP = 64 * MIB


class _Handler(FileHandler):
    """Serves files, and two special paths: `endless.bin` streams until the client hangs up
    (at most `STREAM_CAP` bytes), `huge.bin` announces a petabyte and sends a kilobyte."""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        self.server.requests.append(self.path)
        if self.name == "endless.bin":
            # No Content-Length: the body ends when the connection closes, i.e. never.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"\0" * (64 * 1024)
            try:
                while self.server.sent < STREAM_CAP:
                    self.wfile.write(chunk)
                    self.server.sent += len(chunk)
            except OSError:
                pass  # the client hung up
            self.close_connection = True
            return
        if self.name == "huge.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(10**15))
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(b"\0" * 1024)
            except OSError:
                pass
            self.close_connection = True
            return
        self.serve_file(self.name)


@pytest.fixture
def server() -> Iterator[Served]:
    with serving(_Handler) as served:
        yield served


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def only_the_archive(raw: Path, name: str) -> None:
    """Nothing of a refused archive is in `raw`: no member, no unpacking folder, no stamp."""
    assert sorted(p.name for p in raw.iterdir()) == [name]


# --- 8. download size -----------------------------------------------------------------------


def test_endless_download_stops_at_the_limit(server: Served, tmp_path: Path) -> None:
    remote = RemoteFile(f"{server.base}/endless.bin", sha(b"anything"))

    with pytest.raises(SciquantError) as err:
        fetch([remote], tmp_path, max_download_bytes=2 * MIB, **FAST)

    message = str(err.value)
    assert "endless.bin" in message and f"max_download_bytes={2 * MIB}" in message
    # The bytes received are not kept, and the transfer stopped long before the server's cap.
    assert not (tmp_path / "endless.bin.part").exists()
    assert not (tmp_path / "endless.bin").exists()
    assert server.httpd.sent < STREAM_CAP
    # A limit is not a transient failure: no retry.
    assert server.httpd.requests == ["/endless.bin"]


def test_announced_size_above_the_limit_is_refused_before_reading(
    server: Served, tmp_path: Path
) -> None:
    remote = RemoteFile(f"{server.base}/huge.bin", sha(b"anything"))

    with pytest.raises(SciquantError) as err:
        fetch([remote], tmp_path, max_download_bytes=10 * MIB, **FAST)

    message = str(err.value)
    assert "huge.bin" in message and str(10**15) in message
    assert f"max_download_bytes={10 * MIB}" in message
    assert not (tmp_path / "huge.bin.part").exists()
    assert server.httpd.requests == ["/huge.bin"]


def test_default_download_limit_refuses_a_petabyte(server: Served, tmp_path: Path) -> None:
    remote = RemoteFile(f"{server.base}/huge.bin", sha(b"anything"))
    with pytest.raises(SciquantError, match="max_download_bytes"):
        fetch([remote], tmp_path, **FAST)


def test_file_within_the_limit_is_fetched(server: Served, tmp_path: Path) -> None:
    data = b"x" * 4096
    remote = server.add("ok.bin", data)
    (path,) = fetch([remote], tmp_path, max_download_bytes=len(data), **FAST)
    assert path.read_bytes() == data


# --- 8. archive limits ----------------------------------------------------------------------


def test_zip_bomb_is_refused_by_the_default_ratio_limit(server: Served, tmp_path: Path) -> None:
    # 160 MiB of zeros deflate to about 160 KiB: a ratio of about 1000.
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("zeros.bin", "w", force_zip64=True) as member,
    ):
        block = b"\0" * MIB
        for _ in range(160):
            member.write(block)
    remote = server.add("bomb.zip", buffer.getvalue(), extract=True)

    with pytest.raises(SciquantError) as err:
        fetch([remote], tmp_path, **FAST)

    message = str(err.value)
    assert str(tmp_path / "bomb.zip") in message
    assert "max_compression_ratio=200" in message
    only_the_archive(tmp_path, "bomb.zip")


def test_tar_gz_unpacking_to_too_many_bytes_is_refused(server: Served, tmp_path: Path) -> None:
    members = {"a.bin": b"\0" * (6 * MIB), "b.bin": b"\0" * (6 * MIB), "c.bin": b"c"}
    remote = server.add("big.tar.gz", tar_bytes(members, "w:gz"), extract=True)

    with pytest.raises(SciquantError) as err:
        fetch([remote], tmp_path, max_unpacked_bytes=10 * MIB, **FAST)

    message = str(err.value)
    assert str(tmp_path / "big.tar.gz") in message
    assert f"max_unpacked_bytes={10 * MIB}" in message
    only_the_archive(tmp_path, "big.tar.gz")


def test_zip_unpacking_to_too_many_bytes_is_refused(server: Served, tmp_path: Path) -> None:
    remote = server.add("big.zip", zip_bytes({"a.bin": b"\0" * (2 * MIB)}), extract=True)
    with pytest.raises(SciquantError, match=f"max_unpacked_bytes={MIB}"):
        fetch([remote], tmp_path, max_unpacked_bytes=MIB, **FAST)
    only_the_archive(tmp_path, "big.zip")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_with_too_many_members_is_refused(
    server: Served, tmp_path: Path, kind: str
) -> None:
    members = {f"f{i:03d}.txt": b"x" for i in range(21)}
    data = zip_bytes(members) if kind == "zip" else tar_bytes(members)
    remote = server.add(f"many.{kind}", data, extract=True)

    with pytest.raises(SciquantError) as err:
        fetch([remote], tmp_path / "raw", max_archive_members=20, **FAST)

    message = str(err.value)
    assert str(tmp_path / "raw" / f"many.{kind}") in message
    assert "max_archive_members=20" in message
    only_the_archive(tmp_path / "raw", f"many.{kind}")
    # At the limit it unpacks.
    fetch([remote], tmp_path / "raw", max_archive_members=21, **FAST)
    assert (tmp_path / "raw" / "f020.txt").read_bytes() == b"x"


@pytest.mark.parametrize(
    "setting",
    [{"max_download_bytes": 0}, {"max_archive_members": -1}, {"max_unpacked_bytes": 1.5},
     {"max_compression_ratio": 0}, {"max_archive_members": True}],
)  # fmt: skip
def test_limits_out_of_range_are_refused(tmp_path: Path, setting: dict[str, object]) -> None:
    with pytest.raises(SciquantError, match=next(iter(setting))):
        fetch([], tmp_path, **setting, **FAST)  # type: ignore[arg-type]


# --- 5. synthesis owns its output folder ---------------------------------------------------


def synthesize_bloodflow(out: Path, n: int) -> list[str]:
    """What `sciquant synthesize bloodflow` does: the simulations, then the manifest."""
    params = bloodflow_sim.SimulationParams(model="linear")
    names = bloodflow_sim.synthesize(out, n, 0, params, progress=False)
    write_manifest(out, source={"embedded": {"n_simulations": n, "seed": 0}})
    return names


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_fewer_bloodflow_simulations_leave_no_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    synthesize_bloodflow(out, 3)
    assert (out / "vtps" / "sim_002.vtp").is_file()
    # A stray temporary file of an interrupted earlier write belongs to synthesis too.
    (out / "vtps" / ".sim_001.k2j3h4.vtp").write_bytes(b"partial")

    names = bloodflow_sim.synthesize(
        out, 1, 0, bloodflow_sim.SimulationParams(model="linear"), progress=False
    )

    assert names == ["sim_000"]
    # Exactly its own files; the old manifest is gone too (the command writes a new one).
    assert files_under(out) == ["vtps/dataset_info.json", "vtps/sim_000.vtp"]
    info = json.loads((out / "vtps" / "dataset_info.json").read_text())
    assert list(info) == ["sim_000"]


def test_bloodflow_synthesis_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    (out / "vtps").mkdir(parents=True)
    (out / "vtps" / "0063_1001.vtp").write_bytes(b"a real model")
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(SciquantError) as err:
        bloodflow_sim.synthesize(out, 1, 0, progress=False)

    message = str(err.value)
    assert str(out) in message and "0063_1001.vtp" in message
    assert files_under(out) == ["notes.txt", "vtps/0063_1001.vtp"]


def test_bloodflow_synthesis_refuses_a_downloaded_folder(tmp_path: Path) -> None:
    """Files named like simulations, but the manifest says they were downloaded."""
    out = tmp_path / "raw"
    (out / "vtps").mkdir(parents=True)
    (out / "vtps" / "sim_000.vtp").write_bytes(b"downloaded")
    write_manifest(out, source={"files": [{"url": "https://example.org/sim_000.vtp"}]})

    with pytest.raises(SciquantError) as err:
        bloodflow_sim.synthesize(out, 1, 0, progress=False)

    assert MANIFEST in str(err.value) and str(out) in str(err.value)
    assert files_under(out) == [MANIFEST, "vtps/sim_000.vtp"]


MD_SMALL = {"n_beads": 60, "frames": 3, "stride": 5, "equilibration_steps": 10}
MD_FILES = [
    "dataset_info.json", "state0.dcd", "state0.xtc", "state1.dcd", "state1.xtc", "topology.pdb",
]  # fmt: skip


def test_md_synthesis_leaves_exactly_its_own_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    md_sim.synthesize(raw, seed=0, progress=False, **MD_SMALL)
    write_manifest(raw, source={"embedded": {"seed": 0}})
    # Leftovers of an interrupted earlier write (atomic temporary names).
    (raw / ".state0.x8y9z0.xtc").write_bytes(b"partial")
    (raw / ".manifest.a1b2c3.json").write_text("{")

    md_sim.synthesize(raw, seed=1, progress=False, **MD_SMALL)

    assert files_under(raw) == MD_FILES
    assert json.loads((raw / "dataset_info.json").read_text())["seed"] == 1


def test_md_synthesis_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "10166_trj_8.xtc").write_bytes(b"a GPCRmd trajectory")
    (raw / "topology.pdb").write_text("a downloaded topology")

    with pytest.raises(SciquantError) as err:
        md_sim.synthesize(raw, progress=False, **MD_SMALL)

    message = str(err.value)
    assert str(raw) in message and "10166_trj_8.xtc" in message
    assert files_under(raw) == ["10166_trj_8.xtc", "topology.pdb"]
    assert (raw / "topology.pdb").read_text() == "a downloaded topology"


def test_md_synthesis_refuses_a_foreign_dataset_info(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_info.json").write_text(json.dumps({"format": "something else"}))

    with pytest.raises(SciquantError, match="dataset_info.json"):
        md_sim.synthesize(raw, progress=False, **MD_SMALL)
    assert files_under(raw) == ["dataset_info.json"]


# --- 10. the quantize stage's message and the thread count on resume ------------------------


def test_corrupt_quantized_checkpoint_points_to_the_quantize_stage(tmp_path: Path) -> None:
    from sciquant.workloads.bloodflow.evaluate import load_step
    from sciquant.workloads.bloodflow.quantize import load_quantized

    corrupt = tmp_path / "quantized.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    for load in (load_quantized, lambda path: load_step(path, None, None)):
        with pytest.raises(SciquantError) as err:
            load(corrupt)
        message = str(err.value)
        assert str(corrupt) in message and "rerun the quantize stage" in message
        assert "train stage" not in message
    with pytest.raises(SciquantError, match="run the quantize stage first"):
        load_quantized(tmp_path / "missing" / "quantized.pt")


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prepared(tmp_path_factory.mktemp("flow"))


TINY = {
    "hidden": 8,
    "processor_size": 2,
    "mlp_hidden_layers": 1,
    "train": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "rollout_steps": 2},
}


def test_resume_with_another_thread_count_says_it_is_not_bit_identical(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], torch_threads: None
) -> None:
    from sciquant.workloads.bloodflow import train as train_bloodflow

    out = tmp_path / "fp32"
    train_bloodflow.run(prepared, out, TINY, seed=0, threads=1, progress=False)
    assert torch.load(out / "resume.pt", weights_only=True)["torch_threads"] == 1
    capsys.readouterr()

    # Same thread count: resumed without a note.
    train_bloodflow.run(prepared, out, TINY, seed=0, threads=1, progress=False)
    same = capsys.readouterr().out
    assert "resuming from" in same and "bit-identical" not in same

    # Another thread count: still resumed, with a note naming both counts.
    train_bloodflow.run(prepared, out, TINY, seed=0, threads=2, progress=False)
    other = capsys.readouterr().out
    assert "resuming from" in other
    assert "not be bit-identical" in other
    assert "1 torch thread" in other and "2 torch threads" in other


def test_fetch_command_takes_the_configs_limits(
    server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sciquant fetch --limits` (what the workflow passes from the config's `limits:`) reaches
    the download: a lowered limit refuses a file the defaults take; unknown limits are named."""
    import json

    from sciquant import cli

    remote = server.add("data.bin", b"x" * 4096)
    files = json.dumps([{"url": remote.url, "sha256": remote.sha256}])
    out = tmp_path / "raw"
    code = cli.main(["fetch", "--files", files, "--limits", '{"max_download_bytes": 1000}',
                     "--out", str(out)])  # fmt: skip
    assert code == 2 and "max_download_bytes" in capsys.readouterr().err
    assert not (out / "data.bin").exists()
    code = cli.main(["fetch", "--files", files, "--limits", '{"max_bytes": 1}', "--out", str(out)])
    assert code == 2 and "unknown max_bytes" in capsys.readouterr().err
    assert cli.main(["fetch", "--files", files, "--out", str(out)]) == 0
    assert (out / "data.bin").read_bytes() == b"x" * 4096
