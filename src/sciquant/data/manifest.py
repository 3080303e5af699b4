"""`manifest.json`: the list of raw files a source delivered, written last, as the stage's output.

Its presence means the raw folder is complete: a crash before it leaves no manifest, so the
workflow reruns the stage instead of reading half a dataset.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sciquant.data.download import MANIFEST_NAME, sha256_of
from sciquant.errors import SciquantError
from sciquant.provenance import write_json

MANIFEST = MANIFEST_NAME


def write_manifest(raw: Path, source: dict[str, Any]) -> Path:
    """Record every file under `raw` (path, bytes, sha256) and where it came from."""
    files = [
        {
            "path": path.relative_to(raw).as_posix(),
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
        }
        for path in sorted(raw.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".part")
    ]
    return write_json(raw / MANIFEST, {"source": source, "files": files})


def _embedded_source(data: dict[str, Any]) -> bool:
    return isinstance(data.get("source"), dict) and "embedded" in data["source"]


def embedded_source(raw: Path) -> bool:
    """Whether `raw/manifest.json` records an embedded (synthesized) source; False where it is
    missing or unreadable (the reader that needs it says why)."""
    try:
        data = json.loads((raw / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and _embedded_source(data)


def clear_earlier_synthesis(
    out_dir: Path,
    own_file: re.Pattern[str],
    simulator: str,
    subfolders: tuple[str, ...] = (),
    checks: Mapping[str, Callable[[dict[str, Any]], bool]] | None = None,
) -> None:
    """Remove what an earlier synthesis left in `out_dir`, or refuse a folder it did not write.

    A missing or empty folder is fine. Otherwise every entry must be a regular file whose path
    relative to `out_dir` matches `own_file` (the simulator's files, the manifest and the
    temporary names an interrupted write leaves), or one of `subfolders` (not a link); each
    JSON file named in `checks` must pass its check (and `manifest.json` must record an
    embedded source, not a download). Anything else raises a `SciquantError` naming the folder
    and the entries, and nothing is removed. The manifest goes first, so a run stopped halfway
    leaves no folder that looks complete.
    """
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise SciquantError(
            f"{simulator}: {out_dir} exists and is not a folder; choose another --out"
        )
    own: list[Path] = []
    foreign: list[str] = []
    for top, dirs, files in os.walk(out_dir):
        here = Path(top)
        kept = []
        for name in sorted(dirs):
            rel = (here / name).relative_to(out_dir).as_posix()
            if rel in subfolders and not (here / name).is_symlink():
                kept.append(name)
            else:
                foreign.append(rel + "/")
        dirs[:] = kept
        for name in sorted(files):
            path = here / name
            rel = path.relative_to(out_dir).as_posix()
            if own_file.fullmatch(rel) and not path.is_symlink():
                own.append(path)
            else:
                foreign.append(rel)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise SciquantError(
            f"Refusing to synthesize into {out_dir}: it holds {shown}, which the {simulator} does"
            " not write, and synthesis replaces the folder's files; nothing was removed. Choose"
            " an empty or new --out (each data set has its own raw folder), or move those"
            " entries away."
        )
    for name, written_by_synthesis in {**(checks or {}), MANIFEST: _embedded_source}.items():
        path = out_dir / name
        if path not in own:
            continue
        try:
            data = json.loads(path.read_text())
            ours = isinstance(data, dict) and written_by_synthesis(data)
        except (OSError, ValueError) as error:
            raise SciquantError(
                f"{simulator}: cannot read {path} ({error}), so {out_dir} is not known to hold an"
                " earlier synthesis; nothing was removed. Choose another --out, or delete the"
                " folder if it is stale."
            ) from error
        if not ours:
            raise SciquantError(
                f"Refusing to synthesize into {out_dir}: its {name} was not written by the"
                f" {simulator} (a download or another source), and synthesis replaces the"
                " folder's files; nothing was removed. Choose another --out (each data set has"
                " its own raw folder), or delete the folder if that data is no longer needed."
            )
    manifest = out_dir / MANIFEST
    for path in sorted(own, key=lambda p: p != manifest):
        path.unlink()


def check_delivered(raw: Path) -> None:
    """Every file `raw/manifest.json` lists is still there, at the size it was delivered.

    A raw folder without a manifest (data a user laid out by hand) is not checked. A file that
    went missing or changed size since the fetch/synthesize stage (deleted, truncated, half
    copied) raises a `SciquantError` naming it, before anything is prepared from a folder that
    would silently hold fewer simulations, and so a different split. Sizes only: hashing a
    downloaded data set on every preparation would cost minutes.
    """
    path = raw / MANIFEST
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = [(str(f["path"]), int(f["bytes"])) for f in data["files"]]
    except (OSError, ValueError) as error:
        raise SciquantError(
            f"{path}: cannot be read ({error}); rerun the fetch/synthesize stage"
        ) from error
    except (KeyError, TypeError) as error:
        raise SciquantError(
            f"{path}: not a list of delivered files (no {error} in an entry of 'files'); "
            "rerun the fetch/synthesize stage"
        ) from error
    wrong: list[str] = []
    for name, size in files:
        file = raw / name
        if not file.is_file():
            wrong.append(f"{name} (missing)")
        elif file.stat().st_size != size:
            wrong.append(f"{name} ({file.stat().st_size} bytes, delivered {size})")
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise SciquantError(
            f"{raw}: {len(wrong)} of the {len(files)} files {MANIFEST} lists are not as delivered: "
            f"{shown}; nothing was prepared. Rerun the stage that delivered them "
            "(`snakemake --forcerun synthesize` or `--forcerun fetch`)"
        )
