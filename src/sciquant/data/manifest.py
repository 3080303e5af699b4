"""`manifest.json`: the list of raw files a source delivered, written last, as the stage's output.

Its presence means the raw folder is complete: a crash before it leaves no manifest, so the
workflow reruns the stage instead of reading half a dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sciquant.data.download import MANIFEST_NAME, sha256_of
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
