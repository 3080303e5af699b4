"""`manifest.json`: the list of raw files a source delivered, written last, as the stage's output.

Its presence means the raw folder is complete: a crash before it leaves no manifest, so the
workflow reruns the stage instead of reading half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    target = raw / MANIFEST
    tmp = target.with_name(MANIFEST + ".part")
    tmp.write_text(json.dumps({"source": source, "files": files}, indent=1))
    os.replace(tmp, target)
    return target
