"""Writes that cannot collide or vanish: unique temporary names, fsync before the rename."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from sciquant import provenance
from sciquant.provenance import atomic_path, write_csv, write_json
from sciquant.workloads.bloodflow.data import _save_npz


def test_a_leftover_of_the_old_fixed_temporary_name_does_not_block_a_write(tmp_path: Path) -> None:
    # A crashed writer, or a second job writing the same file, held `<name>.part`.
    (tmp_path / "metrics.json.part").mkdir()
    (tmp_path / "training_log.csv.part").mkdir()
    write_json(tmp_path / "metrics.json", {"a": 1})
    write_csv(tmp_path / "training_log.csv", [{"epoch": 1}], ("epoch",))
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}
    assert (tmp_path / "training_log.csv").read_text().splitlines() == ["epoch", "1"]


def test_two_writers_get_two_temporary_names(tmp_path: Path) -> None:
    target = tmp_path / "resume.pt"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.suffix == second.suffix == ".pt"  # writers that pick a format by suffix
        first.write_text("one")
        second.write_text("two")
    assert target.read_text() == "one"  # the outer writer finished last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]


def test_data_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        kind = "folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(descriptor)

    def replace(source, destination) -> None:  # noqa: ANN001
        events.append("replace")
        real_replace(source, destination)

    monkeypatch.setattr(provenance.os, "fsync", fsync)
    monkeypatch.setattr(provenance.os, "replace", replace)
    write_json(tmp_path / "metrics.json", {"b": 2})
    assert events == ["fsync file", "replace", "fsync folder"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sample.npz"
    _save_npz(target, {"x": np.arange(3)})

    class Broken:
        def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
            raise RuntimeError("the disk filled up")

    with pytest.raises(RuntimeError, match="disk"):
        _save_npz(target, {"x": np.arange(3), "bad": Broken()})
    with np.load(target) as arrays:
        np.testing.assert_array_equal(arrays["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.npz"]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "metrics.json", {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o640
