"""Tests of `fetch` against archives and configs that would write outside the raw folder,
overwrite or delete files the fetch is responsible for, or save a file under a name that
`prepare md` does not look up.

Every archive is built in the test, pinned by its sha256 and served by a small HTTP server on
127.0.0.1.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sciquant.data import download
from sciquant.data.download import RemoteFile, fetch
from sciquant.data.manifest import MANIFEST, write_manifest
from sciquant.errors import SciquantError
from sciquant.workloads.md import data as md
from tests.fileserver import Served, serving

FAST = {"retries": 1, "backoff_s": 0.01, "timeout_s": 2.0, "progress": False}


# --- a static file server (tests/fileserver.py) ---------------------------------------------


@pytest.fixture
def server() -> Iterator[Served]:
    with serving() as served:
        yield served


# --- tar members ----------------------------------------------------------------------------


def tar_bytes(*members: tuple[str, str, bytes | str | None]) -> bytes:
    """A tar archive of (kind, name, content) members: kind "file", "dir" or "link" (content
    is then the link's target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for kind, name, content in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(content, bytes)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                assert isinstance(content, str)
                info.type, info.linkname = tarfile.SYMTYPE, content
            tf.addfile(info)
    return buffer.getvalue()


def deep_raw(tmp_path: Path) -> Path:
    """A raw folder four levels below `tmp_path/top` (room for links that climb out)."""
    raw = tmp_path / "top" / "l2" / "l3" / "l4" / "raw"
    raw.parent.mkdir(parents=True)
    return raw


def written_outside(tmp_path: Path, raw: Path, name: str) -> list[Path]:
    """Files called `name` anywhere under `tmp_path` but not inside `raw`."""
    return [
        p
        for p in tmp_path.rglob(name)
        if not p.is_relative_to(raw) and not p.resolve().is_relative_to(raw.resolve())
    ]


# --- 1. links left by an earlier archive ----------------------------------------------------


def test_links_from_earlier_archives_cannot_lead_outside(server: Served, tmp_path: Path) -> None:
    # Every archive passes the per-archive check on its own; together they climb four levels.
    a = server.add("a.tar", tar_bytes(("link", "d", "."), ("link", "x", ".")), extract=True)
    b = server.add("b.tar", tar_bytes(("link", "up", "d/x/x/x/../../../..")), extract=True)
    c = server.add("c.tar", tar_bytes(("file", "up/PWNED.txt", b"pwned")), extract=True)
    raw = deep_raw(tmp_path)

    with pytest.raises(SciquantError) as err:
        fetch([a, b, c], raw, **FAST)

    message = str(err.value)
    assert str(raw / "b.tar") in message and "'up'" in message
    assert "outside" in message
    assert written_outside(tmp_path, raw, "PWNED.txt") == []
    # Nothing of the refused archive was placed.
    assert not (raw / "up").exists() and not (raw / "up").is_symlink()


def test_member_is_not_written_through_a_link_leading_outside(
    server: Served, tmp_path: Path
) -> None:
    raw = deep_raw(tmp_path)
    raw.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    # A link left in the raw folder (by hand, or by an older version of fetch).
    (raw / "up").symlink_to(os.path.relpath(outside, raw))
    c = server.add("c.tar", tar_bytes(("file", "up/PWNED.txt", b"pwned")), extract=True)

    with pytest.raises(SciquantError) as err:
        fetch([c], raw, **FAST)

    message = str(err.value)
    assert str(raw / "c.tar") in message and "'up/PWNED.txt'" in message
    assert str(raw / "up") in message and "outside" in message
    assert list(outside.iterdir()) == []


def test_link_turned_outward_by_a_later_archive_is_caught(server: Served, tmp_path: Path) -> None:
    # E -> L/x/../.. is inside while L -> a/b; C re-points L to ".", and E then leads to raw/..
    a = server.add(
        "a.tar",
        tar_bytes(("dir", "a/b/x", None), ("dir", "x", None), ("link", "L", "a/b")),
        extract=True,
    )
    b = server.add("b.tar", tar_bytes(("link", "E", "L/x/../..")), extract=True)
    c = server.add("c.tar", tar_bytes(("link", "L", ".")), extract=True)
    d = server.add("d.tar", tar_bytes(("file", "E/PWNED.txt", b"pwned")), extract=True)
    raw = deep_raw(tmp_path)

    with pytest.raises(SciquantError) as err:
        fetch([a, b, c, d], raw, **FAST)

    message = str(err.value)
    assert str(raw / "E") in message and "outside" in message
    assert written_outside(tmp_path, raw, "PWNED.txt") == []
    # The link that came to lead outside is not left behind.
    assert not (raw / "E").is_symlink()


def test_links_inside_the_raw_folder_still_work(server: Served, tmp_path: Path) -> None:
    a = server.add(
        "a.tar", tar_bytes(("dir", "data", None), ("link", "current", "data")), extract=True
    )
    b = server.add("b.tar", tar_bytes(("file", "current/f.txt", b"f")), extract=True)
    raw = tmp_path / "raw"

    fetch([a, b], raw, **FAST)

    assert (raw / "data/f.txt").read_bytes() == b"f"


def test_raw_folder_reached_through_a_symlink_still_unpacks(server: Served, tmp_path: Path) -> None:
    # A raw folder that is itself a link (say to scratch space) is the folder links are kept in.
    (tmp_path / "scratch").mkdir()
    (tmp_path / "raw").symlink_to(tmp_path / "scratch")
    a = server.add(
        "a.tar",
        tar_bytes(("file", "data/f.txt", b"f"), ("link", "current", "data"), ("link", "me", ".")),
        extract=True,
    )

    fetch([a], tmp_path / "raw", **FAST)

    assert (tmp_path / "scratch/current/f.txt").read_bytes() == b"f"


# --- 2. overwrites and deletes ------------------------------------------------------------------


@pytest.mark.parametrize("archive_first", [False, True])
def test_archive_member_cannot_replace_an_entrys_file(
    server: Served, tmp_path: Path, archive_first: bool
) -> None:
    plain = server.add("data.bin", b"verified")
    archive = server.add("t.tar", tar_bytes(("file", "data.bin", b"other")), extract=True)
    raw = tmp_path / "raw"

    with pytest.raises(SciquantError) as err:
        fetch([archive, plain] if archive_first else [plain, archive], raw, **FAST)

    message = str(err.value)
    assert str(raw / "t.tar") in message and "'data.bin'" in message
    assert plain.url in message and "`name`" in message
    if not archive_first:
        assert (raw / "data.bin").read_bytes() == b"verified"


def test_archive_member_cannot_replace_the_manifest(server: Served, tmp_path: Path) -> None:
    archive = server.add("t.tar", tar_bytes(("file", MANIFEST, b"{}")), extract=True)
    raw = tmp_path / "raw"

    with pytest.raises(SciquantError) as err:
        fetch([archive], raw, **FAST)

    assert str(raw / "t.tar") in str(err.value) and repr(MANIFEST) in str(err.value)
    assert not (raw / MANIFEST).exists()


def test_folder_member_does_not_delete_an_existing_file(server: Served, tmp_path: Path) -> None:
    a = server.add("a.tar", tar_bytes(("file", "res", b"result")), extract=True)
    b = server.add("b.tar", tar_bytes(("file", "res/inner.txt", b"inner")), extract=True)
    raw = tmp_path / "raw"

    with pytest.raises(SciquantError) as err:
        fetch([a, b], raw, **FAST)

    message = str(err.value)
    assert str(raw / "b.tar") in message and "'res'" in message and str(raw / "res") in message
    assert (raw / "res").read_bytes() == b"result"


@pytest.mark.parametrize("how", ["name", "url"])
def test_entry_named_like_the_manifest_is_refused_before_download(
    server: Served, tmp_path: Path, how: str
) -> None:
    entry = (
        server.add("listing.json", b"[]", name=MANIFEST)
        if how == "name"
        else server.add(MANIFEST, b"[]")
    )

    with pytest.raises(SciquantError) as err:
        fetch([entry], tmp_path / "raw", **FAST)

    assert entry.url in str(err.value) and "`name`" in str(err.value)
    assert server.requests == []


def test_entry_named_like_another_entrys_partial_download_is_refused(
    server: Served, tmp_path: Path
) -> None:
    # Downloading data.bin goes through data.bin.part: the other entry's verified file.
    first = server.add("x.bin", b"first", name="data.bin.part")
    second = server.add("data.bin", b"second")

    with pytest.raises(SciquantError) as err:
        fetch([first, second], tmp_path / "raw", **FAST)

    assert first.url in str(err.value) and second.url in str(err.value)
    assert server.requests == []


def test_config_collisions_name_both_entries() -> None:
    entries = [
        {"url": "https://a.example/run%201.xtc?download=1", "sha256": "a" * 64},
        {"url": "https://b.example/other.xtc", "sha256": "b" * 64, "name": "run 1.xtc"},
    ]
    with pytest.raises(SciquantError) as err:
        download.check_local_names(entries, key="datasets.md.source.files")

    message = str(err.value)
    assert "datasets.md.source.files.0" in message and "datasets.md.source.files.1" in message
    assert "'run 1.xtc'" in message and "`name`" in message
    # Names that only look alike are fine.
    assert download.check_local_names(
        entries[:1] + [{"url": "https://b.example/run%25201.xtc"}]
    ) == [
        "run 1.xtc",
        "run%201.xtc",
    ]


# --- 3. one local name for fetch and prepare ------------------------------------------------


def write_tiny_md(folder: Path) -> dict[str, bytes]:
    """A 12-atom, 4-residue topology and two 30-frame trajectories of two states, as bytes."""
    import mdtraj
    import numpy as np

    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for name in ("MET", "LYS", "TRP", "GLY"):
        residue = topology.add_residue(name, chain)
        for atom, element in (("N", "N"), ("CA", "C"), ("C", "C")):
            topology.add_atom(atom, mdtraj.element.get_by_symbol(element), residue)
    rng = np.random.default_rng(3)
    base = np.cumsum(rng.normal(0.0, 0.15, size=(topology.n_atoms, 3)), axis=0)
    mdtraj.Trajectory(base[None].astype(np.float32), topology).save_pdb(str(folder / "t.pdb"))
    files = {"top.pdb": (folder / "t.pdb").read_bytes()}
    for label in (0, 1):
        moved = base + 0.3 * label * np.sin(np.arange(topology.n_atoms))[:, None]
        xyz = moved + rng.normal(0.0, 0.02, size=(30, *base.shape))
        path = folder / f"s{label}.xtc"
        mdtraj.Trajectory(xyz.astype(np.float32), topology).save_xtc(str(path))
        files[f"s{label}.xtc"] = path.read_bytes()
    return files


def test_prepare_md_finds_files_where_fetch_saved_them(server: Served, tmp_path: Path) -> None:
    made = tmp_path / "made"
    made.mkdir()
    data = write_tiny_md(made)
    paths = {
        "top.pdb": "records/7/my%20top.pdb?download=1",
        "s0.xtc": "records/7/state%200.xtc?download=1",
        "s1.xtc": "records/7/state%201.xtc",
    }
    roles = {
        "top.pdb": ("topology", None),
        "s0.xtc": ("trajectory", 0),
        "s1.xtc": ("trajectory", 1),
    }
    specs = []
    for key, path in paths.items():
        remote = server.add(path, data[key])
        role, label = roles[key]
        specs.append({"url": remote.url, "sha256": remote.sha256, "role": role}
                     | ({} if label is None else {"label": label}))  # fmt: skip
    raw = tmp_path / "raw"

    saved = fetch([RemoteFile(url=s["url"], sha256=s["sha256"]) for s in specs], raw, **FAST)
    write_manifest(raw, source={"files": specs})

    assert [p.name for p in saved] == ["my top.pdb", "state 0.xtc", "state 1.xtc"]
    assert [download.local_name(s["url"]) for s in specs] == [p.name for p in saved]
    topology, trajectories = md.listing_from_manifest(raw)
    assert topology == saved[0] and trajectories == [(saved[1], 0), (saved[2], 1)]
    out = md.prepare_from_manifest(raw, tmp_path / "prepared", frames_per_trajectory=30, gap=1,
                                   progress=False)  # fmt: skip
    assert md.load_index(out)["topology"]["path"] == "my top.pdb"


def test_prepare_md_manifest_errors_name_the_file_and_key(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(SciquantError, match="rerun fetch") as err:
        md.listing_from_manifest(raw)
    assert str(raw / MANIFEST) in str(err.value)

    write_manifest(raw, source={"files": [{"url": "https://a.example/s.xtc", "sha256": "a" * 64,
                                           "role": "trajectory", "label": 0}]})  # fmt: skip
    with pytest.raises(SciquantError, match="role: topology") as err:
        md.listing_from_manifest(raw)
    assert str(raw / MANIFEST) in str(err.value)
