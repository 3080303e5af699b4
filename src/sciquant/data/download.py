"""Download dataset files over HTTP(S), resuming, retrying and checking their sha256.

`fetch` is what `sciquant fetch` runs: for each `RemoteFile` it downloads into a destination
folder, verifies the sha256 over the whole file and, if asked, unpacks the archive there. A file
that is already present with the right hash is left alone without any network traffic, so
`fetch` can be rerun freely (for example as the first rule of a workflow).

A download is written to `<target>.part` and only moved to `<target>` by `os.replace` once its
hash is right, so a finished-looking file is always a verified one. An interrupted download
(dropped connection, timeout, killed job) keeps its `.part`, and the next attempt, or the next
run, asks the server for the rest with an HTTP `Range` header.

Every file of a dataset lives in one raw folder, under the name `local_name` derives from its
config entry; `fetch`, the config's duplicate-name check and `prepare md` all use that one
function. Archives are unpacked into the raw folder so that nothing is written outside it, even
through symlinks left there by an archive unpacked before, and no member replaces a file that
`fetch` itself is responsible for (a downloaded file, the manifest, a partial download).

Limits keep a wrong URL or a hostile server from filling the disk: a download may not exceed
`max_download_bytes` (checked against the size the server announces and while the bytes arrive),
and an archive is unpacked only if it has at most `max_archive_members` members, unpacks to at
most `max_unpacked_bytes` and, above 100 MiB unpacked, to at most `max_compression_ratio` times
its own size (archive bombs). Archives are checked on the sizes their headers declare, before
anything is unpacked. The defaults (`MAX_DOWNLOAD_BYTES` 100 GiB, `MAX_UNPACKED_BYTES` 200 GiB,
`MAX_ARCHIVE_MEMBERS` 100,000, `MAX_COMPRESSION_RATIO` 200) are far above the real data sets:
VMR and GPCRmd files are a few GiB at most, their archives hold at most thousands of files, and
simulation data compress far less than 200:1. Each limit is a keyword argument of `fetch`, to be
raised on purpose for a larger data set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from sciquant import __version__
from sciquant.errors import SciquantError

__all__ = [
    "MANIFEST_NAME",
    "MAX_ARCHIVE_MEMBERS",
    "MAX_COMPRESSION_RATIO",
    "MAX_DOWNLOAD_BYTES",
    "MAX_UNPACKED_BYTES",
    "RemoteFile",
    "check_local_names",
    "download",
    "extract_archive",
    "fetch",
    "local_name",
]

logger = logging.getLogger(__name__)

_SCHEMES = ("http", "https", "file")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CHUNK = 1 << 20
# 408/429 and 5xx say "not now" rather than "never"; every other status is final.
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 60.0
# A server asking for a longer pause than this is better answered by rerunning later.
_MAX_RETRY_AFTER_S = 300.0
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
#: The file `sciquant fetch` writes last into the raw folder, listing what it delivered
#: (`sciquant.data.manifest`); no dataset file or archive member may take its name.
MANIFEST_NAME = "manifest.json"
#: Default largest file `fetch` downloads, in bytes (100 GiB).
MAX_DOWNLOAD_BYTES = 100 * 2**30
#: Default largest total of the member sizes of one archive that `fetch` unpacks (200 GiB).
MAX_UNPACKED_BYTES = 200 * 2**30
#: Default largest number of members (files, folders, links) of one archive `fetch` unpacks.
MAX_ARCHIVE_MEMBERS = 100_000
#: Default largest ratio of an archive's unpacked size to its own size (checked above 100 MiB).
MAX_COMPRESSION_RATIO = 200.0
# An archive that unpacks to less than this is never refused for its compression ratio: small
# files of zeros or repeated text can compress very well and are harmless.
_RATIO_FREE_BYTES = 100 * 2**20
_WHERE_LIMITS = "a keyword argument of `sciquant.data.download.fetch`"


def local_name(url: str, name: str | None = None) -> str:
    """The file name a dataset file is saved under in the raw folder, from its config entry.

    `name` if the entry gives one, else the last part of the URL's path, percent-decoded and
    without query string or fragment: `https://h/r/my%20run.xtc?download=1` gives
    `my run.xtc`. `fetch` saves the file under this name, and the check for entries that would
    share a name and `prepare md` look it up under the same name. Raises `SciquantError` if the
    result is not a plain file name (empty, `.`, `..`, or with a slash, backslash or NUL
    character, as for a URL ending in `/`): such an entry needs a `name` in the config.
    """
    if name is None:
        # Not PurePosixPath(...).name: that would turn ".../dir/" into "dir".
        derived = unquote(urlsplit(url).path.rpartition("/")[2])
    elif isinstance(name, str):
        derived = name
    else:
        raise SciquantError(
            f"The `name` given for {url} is {name!r}, not a string. Set `name` to a plain file"
            " name in the config, or leave it out to use the URL's last part."
        )
    _check_name(derived, url)
    return derived


def check_local_names(
    entries: Iterable[RemoteFile | Mapping[str, Any]], key: str = "files"
) -> list[str]:
    """The local names of a dataset's file entries, in order, checked against each other.

    `entries` are `RemoteFile`s or config mappings (`url`, optional `name` and `extract`);
    `key` is the config key of the list, used in messages (`datasets.<name>.source.files`).
    Each entry needs, in the raw folder, its file (`local_name`), `<file>.part` while it
    downloads and, for an archive, the stamp `.<file>.extracted`. A `SciquantError` naming both
    entries is raised if two entries need the same name, and one naming the entry if it would
    be saved as `manifest.json`, which `sciquant fetch` writes over it. Nothing is downloaded:
    this is the check a config can get before any network access.
    """
    return _claims(entries, key)[1]


def _claims(
    entries: Iterable[RemoteFile | Mapping[str, Any]], key: str
) -> tuple[dict[str, str], list[str]]:
    """Every name in the raw folder that the entries need, mapped to who needs it and why, and
    the entries' local names; see `check_local_names`."""
    claims: dict[str, tuple[str, str]] = {}
    names: list[str] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, RemoteFile):
            url, name, extract = entry.url, entry.name, entry.extract
        else:
            url, name, extract = entry.get("url"), entry.get("name"), entry.get("extract", False)
            if not isinstance(url, str):
                raise SciquantError(
                    f"config key {key}.{i}.url: missing or not a string ({url!r}); give the"
                    " file's http(s) or file:// URL."
                )
        who = f"{key}.{i} ({url})"
        filename = local_name(url, name)
        if filename == MANIFEST_NAME:
            raise SciquantError(
                f"{who} would be saved as {MANIFEST_NAME!r}, the name of the list of files that"
                " `sciquant fetch` writes into the raw folder over it. Give this entry a"
                " different `name` in the config."
            )
        needs = {filename: "file", f"{filename}.part": "partial download"}
        if extract:
            needs[f".{filename}.extracted"] = "unpacking record"
        for needed, why in needs.items():
            if needed in claims:
                other, other_why = claims[needed]
                raise SciquantError(
                    f"Two dataset files clash in the raw folder: {other} needs {needed!r} for its"
                    f" {other_why} and {who} needs it for its {why}; one would overwrite the"
                    " other. Give one of them a different `name` in the config."
                )
            claims[needed] = (who, why)
        names.append(filename)
    return {n: f"the {why} of {who}" for n, (who, why) in claims.items()}, names


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it lives, its sha256, and what to do with it.

    `name` is the file name to save it under in the destination folder (default: the last part of
    the URL's path, percent-decoded, without query string; see `local_name`). `extract` unpacks
    a zip or tar archive into the destination folder after its hash has been checked. The URL
    scheme, the hash and the name are checked when the object is made, so a bad config fails
    before anything is downloaded.
    """

    url: str
    sha256: str
    name: str | None = None
    extract: bool = False

    def __post_init__(self) -> None:
        _check_url(self.url)
        _check_sha256(self.sha256, self.url)
        local_name(self.url, self.name)

    @property
    def filename(self) -> str:
        """The name the file is saved under: `local_name` of its URL and `name`."""
        return local_name(self.url, self.name)


def fetch(
    files: Sequence[RemoteFile],
    dest: Path,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
    max_download_bytes: int = MAX_DOWNLOAD_BYTES,
    max_archive_members: int = MAX_ARCHIVE_MEMBERS,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    max_compression_ratio: float = MAX_COMPRESSION_RATIO,
) -> list[Path]:
    """Download every file into `dest`, verify it, unpack archives; return the file paths.

    The returned list holds one path per `RemoteFile`, in order: the verified downloaded file
    (for an archive, the archive itself; its members are in `dest`). Files already in `dest` with
    the right sha256 are not downloaded again. An archive is unpacked again only if it changed or
    its top-level entries are gone from `dest` (a `.<name>.extracted` stamp records what was
    unpacked; delete it to force unpacking). See `download` for `retries`, `backoff_s`,
    `timeout_s` and `progress`. Run one `fetch` per `dest` at a time: two runs would write the
    same `.part` files.

    Before anything is downloaded the entries' names are checked (`check_local_names`): two
    entries that need one name, or an entry saved as `manifest.json`, fail at once. An archive
    member that would replace a file of any entry, its partial download or unpacking record, or
    `manifest.json`, fails its archive (see `extract_archive` for the other checks).

    Limits (see the module docstring for the defaults): a file larger than `max_download_bytes`
    is not downloaded (see `download`); an archive with more than `max_archive_members` members,
    whose members add up to more than `max_unpacked_bytes`, or, above 100 MiB, to more than
    `max_compression_ratio` times the archive's size, is not unpacked (see `extract_archive`).
    Each refusal is a `SciquantError` naming the file, the limit and the argument that raises it.
    """
    _check_limits(
        max_download_bytes=max_download_bytes,
        max_archive_members=max_archive_members,
        max_unpacked_bytes=max_unpacked_bytes,
        max_compression_ratio=max_compression_ratio,
    )
    archive_limits = {
        "max_archive_members": max_archive_members,
        "max_unpacked_bytes": max_unpacked_bytes,
        "max_compression_ratio": max_compression_ratio,
    }
    dest = Path(dest)
    # Two entries saved under one name would silently overwrite each other.
    claims, _ = _claims(files, "files")
    # What no archive member may replace, and what to do about it.
    protected = {
        name: f"{what}; give that entry a different `name` in the config"
        for name, what in claims.items()
    }
    protected[MANIFEST_NAME] = (
        "the list of delivered files that `sciquant fetch` writes there; set `extract: false`"
        " for this archive and unpack it by hand elsewhere"
    )
    _check_settings(retries, backoff_s, timeout_s)
    _mkdir(dest)

    paths: list[Path] = []
    with _new_session() as session:
        for remote in files:
            path = download(
                remote.url,
                dest / remote.filename,
                remote.sha256,
                retries=retries,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                progress=progress,
                session=session,
                max_download_bytes=max_download_bytes,
            )
            if remote.extract:
                _extract_once(
                    path,
                    dest,
                    _check_sha256(remote.sha256, remote.url),
                    protected,
                    archive_limits,
                )
            paths.append(path)
    return paths


def download(
    url: str,
    target: Path,
    sha256: str,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
    session: requests.Session | None = None,
    max_download_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download `url` to `target` and check its sha256; return `target`.

    If `target` already holds the right bytes nothing is downloaded. Otherwise the bytes go to
    `<target>.part`, resuming from what is there, and are moved to `target` once the sha256 over
    the whole file matches. A dropped connection, a timeout, HTTP 408, 429 or 5xx is retried up
    to `retries` times, waiting `backoff_s`, then twice as long each time (at most 60 s); other
    HTTP errors fail at once. `timeout_s` bounds connecting and each wait for data, not the
    whole download. `progress` shows a progress bar on stderr. `file://` URLs are copied.
    Proxies come from the usual HTTPS_PROXY / NO_PROXY variables.

    A file larger than `max_download_bytes` raises `SciquantError`: at once if the server
    announces the size (Content-Length, or Content-Range when resuming; a `.part` left by an
    earlier run is then kept), else as soon as more bytes arrive (the `.part` is deleted). A
    limit is not retried.
    """
    expected = _check_sha256(sha256, url)
    scheme = _check_url(url)
    _check_settings(retries, backoff_s, timeout_s)
    _check_limits(max_download_bytes=max_download_bytes)
    target = Path(target)
    part = target.with_name(target.name + ".part")

    if target.is_file():
        if sha256_of(target) == expected:
            return target
        logger.warning("%s does not have the expected sha256; downloading it again", target)
    _mkdir(target.parent)

    if scheme == "file":
        _copy_local(url, part, max_download_bytes)
        actual = sha256_of(part)
    else:
        own_session = session is None
        session = session or _new_session()
        try:
            transfer = _Transfer(
                url, part, session, retries, backoff_s, timeout_s, progress, max_download_bytes
            )
            from_earlier_run = part.is_file() and part.stat().st_size > 0
            transfer.run()
            actual = sha256_of(part)
            if actual != expected and from_earlier_run:
                # The .part may come from another version of the file (the URL or the file on the
                # server changed since the interrupted run); one clean download settles it.
                logger.warning(
                    "Resuming %s from %s gave the wrong sha256; downloading it from the start",
                    url,
                    part,
                )
                part.unlink()
                transfer.run()
                actual = sha256_of(part)
        finally:
            if own_session:
                session.close()

    if actual != expected:
        part.unlink(missing_ok=True)
        raise SciquantError(
            f"Checksum mismatch for {url}: expected sha256 {expected}, got {actual}. The download"
            " was deleted. Check that the sha256 in the config belongs to this URL (the file may"
            " have been updated upstream, or the URL may serve a different file or an error page)."
        )
    try:
        os.replace(part, target)
    except OSError as exc:
        raise SciquantError(f"Cannot move {part} to {target}: {exc}. Remove {target}.") from exc
    return target


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    protected: Mapping[str, str] | None = None,
    max_archive_members: int = MAX_ARCHIVE_MEMBERS,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    max_compression_ratio: float = MAX_COMPRESSION_RATIO,
) -> list[Path]:
    """Unpack a zip or tar archive (plain, gz, bz2, xz) into `dest`; return the unpacked paths.

    Every member is checked before anything is written: an absolute path, a `..` component, a
    link whose target is outside `dest`, a path through a link in the archive or a device / FIFO
    member rejects the whole archive with a `SciquantError` naming the archive and the member.
    The archive is unpacked into a temporary folder inside `dest` and its entries are then moved
    into place, merging into folders that already exist, so a failed or interrupted unpack
    leaves no half-written files in `dest`.

    Before the first move, every destination is checked against what `dest` holds now (links
    left by archives unpacked before included), on real paths: a symlink member that would
    resolve outside the real `dest`, a member that would be written through a symlink leading
    outside it, a folder member where a file or link exists (moving it in would delete that),
    a file member where a folder exists, or a top-level member named in `protected` (file name
    -> what that file is and what to do) rejects the whole archive. If placing this archive's
    links makes a symlink already in `dest` lead outside it, that symlink is removed and the
    unpack fails.

    Before anything is unpacked, the member headers are read and counted: more than
    `max_archive_members` members, declared sizes adding up to more than `max_unpacked_bytes`
    (a hard link counts as a copy of its target), or, once the total passes 100 MiB, to more
    than `max_compression_ratio` times the archive's size, reject the archive with a
    `SciquantError` naming it, the limit and the argument that raises it. Tar headers are
    counted as they are read, so a bomb is refused before the rest of its stream is
    decompressed. Member sizes are what is written: tarfile writes exactly the declared size
    and zipfile stops at it.
    """
    _check_limits(
        max_archive_members=max_archive_members,
        max_unpacked_bytes=max_unpacked_bytes,
        max_compression_ratio=max_compression_ratio,
    )
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise SciquantError(f"Cannot unpack {archive}: no such file. Fetch it first.")
    kind = _archive_kind(archive)
    _mkdir(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".unpacking", dir=dest))
    try:
        try:
            budget = _Budget(
                archive, max_archive_members, max_unpacked_bytes, max_compression_ratio
            )
            if kind == "zip":
                with zipfile.ZipFile(archive) as zf:
                    infos = zf.infolist()
                    for info in infos:
                        budget.add(info.file_size)
                    names = _checked_zip_members(zf, archive)
                    zf.extractall(staging)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    names = _checked_tar_members(_tar_members(tf, budget), archive)
                    # The data filter is a second line of defence (and drops setuid bits and
                    # unsafe permissions); it exists from Python 3.11.4.
                    if hasattr(tarfile, "data_filter"):
                        tf.extractall(staging, filter="data")
                    else:
                        tf.extractall(staging)
        except NotImplementedError as exc:
            # zipfile reads stored, deflate, bzip2 and lzma members, not e.g. deflate64.
            raise SciquantError(
                f"Cannot unpack {archive}: {exc}. Unpack it with `unzip` or 7-Zip and set"
                " `extract: false` for it in the config."
            ) from exc
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise SciquantError(
                f"Cannot unpack {archive} into {dest}: {exc}. Check free space and permissions"
                " there; if the archive is damaged, delete it and fetch it again."
            ) from exc
        except lzma.LZMAError as exc:
            raise SciquantError(
                f"Cannot unpack {archive}: {exc}. The archive is damaged; delete it and fetch"
                " it again."
            ) from exc
        _merge_into(staging, dest, archive, protected or {})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dest / name for name in names]


# --- the transfer itself -------------------------------------------------------------------


class _Transient(Exception):
    """A failed attempt worth repeating: dropped connection, timeout, 408, 429 or 5xx."""

    def __init__(
        self, reason: str, *, retry_after_s: float | None = None, restart: bool = False
    ) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        # A restart (the .part was discarded) needs no pause: the server did nothing wrong.
        self.restart = restart


@dataclass
class _Transfer:
    """Bring `part` to the full content of `url`, resuming and retrying."""

    url: str
    part: Path
    session: requests.Session
    retries: int
    backoff_s: float
    timeout_s: float
    progress: bool
    max_bytes: int = MAX_DOWNLOAD_BYTES

    def run(self) -> None:
        """Attempt until `part` holds all bytes the server has, or raise `SciquantError`."""
        attempt = 0
        while True:
            try:
                self._attempt()
                return
            except _Transient as exc:
                if attempt >= self.retries:
                    have = self.part.stat().st_size if self.part.exists() else 0
                    raise SciquantError(
                        f"Download of {self.url} failed after {attempt + 1} attempts; last error:"
                        f" {exc}. The {have} bytes received are kept in {self.part}; run the"
                        " command again to resume. Compute nodes often have no internet access:"
                        " fetch on a login node, or set HTTPS_PROXY."
                    ) from exc
                wait = 0.0 if exc.restart else min(self.backoff_s * 2**attempt, _MAX_BACKOFF_S)
                if exc.retry_after_s is not None:
                    wait = max(wait, min(exc.retry_after_s, _MAX_RETRY_AFTER_S))
                attempt += 1
                logger.warning(
                    "%s: %s; retrying in %.2f s (retry %d of %d)",
                    self.url,
                    exc,
                    wait,
                    attempt,
                    self.retries,
                )
                time.sleep(wait)

    def _attempt(self) -> None:
        offset = self.part.stat().st_size if self.part.exists() else 0
        # Byte ranges count bytes as sent; transparent compression would shift them.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = self.session.get(
                self.url, headers=headers, stream=True, timeout=self.timeout_s
            )
        except requests.exceptions.SSLError as exc:
            raise SciquantError(
                f"TLS certificate check failed for {self.url}: {exc}. Behind a site proxy that"
                " inspects TLS, set REQUESTS_CA_BUNDLE to the site's CA bundle."
            ) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        except requests.RequestException as exc:
            raise SciquantError(
                f"Cannot download {self.url}: {exc}. Check the URL in the config."
            ) from exc

        with response:
            status = response.status_code
            if status == 416 and offset:
                self._range_not_satisfiable(response, offset)
                return
            if status in _RETRY_STATUS:
                raise _Transient(
                    f"HTTP {status} {response.reason}",
                    retry_after_s=_retry_after(response.headers.get("Retry-After")),
                )
            if status not in (200, 206):
                raise SciquantError(_http_error_message(self.url, status, response.reason))

            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    self.part.unlink(missing_ok=True)
                    raise _Transient(
                        f"asked for bytes from {offset}, the server sent them from {start};"
                        " starting over",
                        restart=True,
                    )
                mode = "ab"
            else:
                # 200: the whole file, whether or not we asked for a range (a server without
                # range support simply ignores the header), so overwrite rather than append.
                if offset:
                    logger.info(
                        "%s does not support resuming; downloading from the start", self.url
                    )
                offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            if total is not None and total > self.max_bytes:
                raise SciquantError(
                    f"Refusing to download {self.url}: the server announces {total} bytes"
                    f" ({_size(total)}), above the limit max_download_bytes={self.max_bytes}"
                    f" ({_size(self.max_bytes)}). Nothing more was downloaded. Check that the URL"
                    " serves the intended file; to download a file this large on purpose, raise"
                    f" `max_download_bytes` ({_WHERE_LIMITS})."
                )
            self._receive(response, offset, total, mode)

    def _receive(
        self, response: requests.Response, offset: int, total: int | None, mode: str
    ) -> None:
        written = offset
        too_long = False
        try:
            with (
                open(self.part, mode) as out,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self.part.name.removesuffix(".part"),
                    file=sys.stderr,
                    disable=not self.progress,
                    # In a batch job's log every redraw is kept; one every 30 s is plenty there.
                    mininterval=0.1 if sys.stderr.isatty() else 30.0,
                ) as bar,
            ):
                # The raw stream gives the bytes as served: the sha256 is of the file as stored,
                # even where a server labels a .gz file with Content-Encoding: gzip.
                chunks = _raw_chunks(response.raw)
                while True:
                    try:
                        chunk = next(chunks, None)
                    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                        raise _Transient(f"connection lost after {written} bytes ({exc})") from exc
                    if chunk is None:
                        break
                    if written + len(chunk) > self.max_bytes:
                        too_long = True
                        break
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                # The data must be on disk before a rename can make it look finished.
                os.fsync(out.fileno())
        except OSError as exc:
            raise SciquantError(
                f"Cannot write {self.part}: {exc}. Check free space and permissions there."
            ) from exc
        if too_long:
            self.part.unlink(missing_ok=True)
            raise SciquantError(
                f"Refusing to download {self.url}: the server sent more than the limit"
                f" max_download_bytes={self.max_bytes} ({_size(self.max_bytes)}) and was cut"
                f" off; the partial download {self.part} was deleted. Check that the URL serves"
                " the intended file (a server that never ends its answer looks like this); to"
                f" download a file this large on purpose, raise `max_download_bytes`"
                f" ({_WHERE_LIMITS})."
            )
        if total is not None and written != total:
            raise _Transient(f"connection closed after {written} of {total} bytes")

    def _range_not_satisfiable(self, response: requests.Response, offset: int) -> None:
        """Handle 416: the .part is at least as long as the file on the server."""
        _, total = _content_range(response.headers.get("Content-Range"), unsatisfied=True)
        if total is None or total == offset:
            # Most likely complete (a run stopped between download and rename); the sha256
            # check that follows decides.
            return
        self.part.unlink()
        raise _Transient(
            f"{self.part} holds {offset} bytes but the file has {total}; starting over",
            restart=True,
        )


def _raw_chunks(raw: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The body's bytes as they arrive, undecoded."""
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3
        yield from raw.stream(_CHUNK, decode_content=False)
        return
    # read1 hands over whatever has arrived, where read(n) waits for n bytes: on a stalled
    # connection the bytes already received reach the .part instead of being lost.
    while chunk := read1(_CHUNK, decode_content=False):
        yield chunk


def _content_range(value: str | None, *, unsatisfied: bool = False) -> tuple[int, int | None]:
    """Parse `bytes START-END/TOTAL` (or `bytes */TOTAL` for 416) into (start, total)."""
    pattern = r"bytes \*/(\d+)" if unsatisfied else r"bytes (\d+)-\d+/(\d+|\*)"
    match = re.fullmatch(pattern, (value or "").strip())
    if match is None:
        # -1 never equals an offset, so a 206 without a usable Content-Range restarts cleanly.
        return -1, None
    if unsatisfied:
        return 0, int(match[1])
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; the HTTP-date form is ignored (backoff applies)."""
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _http_error_message(url: str, status: int, reason: str) -> str:
    if status in (404, 410):
        return (
            f"{url} answered HTTP {status} {reason}: the file may have moved or been withdrawn."
            " Find its current address on the dataset's page and set it in the config (with its"
            " sha256, if the file changed)."
        )
    if status in (401, 403):
        return (
            f"{url} answered HTTP {status} {reason}: the server refused access. The file may"
            " need a login or a different URL, or this node's network may be blocked (fetch on"
            " a login node, or set HTTPS_PROXY)."
        )
    return f"{url} answered HTTP {status} {reason}. Check the URL in the config."


def _new_session() -> requests.Session:
    session = requests.Session()
    # Some data repositories throttle or refuse the anonymous default user agent.
    session.headers["User-Agent"] = f"sciquant/{__version__} python-requests/{requests.__version__}"
    return session


def _copy_local(url: str, part: Path, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise SciquantError(
            f"{url} names a file on host {parts.netloc!r}; file:// URLs must be local"
            " (file:///path/to/file)."
        )
    source = Path(url2pathname(unquote(parts.path)))
    if not source.is_file():
        raise SciquantError(f"{url}: no such file {source}. Check the path in the config.")
    try:
        size = source.stat().st_size
    except OSError as exc:
        raise SciquantError(f"Cannot read {source}: {exc}.") from exc
    if size > max_bytes:
        raise SciquantError(
            f"Refusing to copy {url}: it has {size} bytes ({_size(size)}), above the limit"
            f" max_download_bytes={max_bytes} ({_size(max_bytes)}). To copy a file this large"
            f" on purpose, raise `max_download_bytes` ({_WHERE_LIMITS})."
        )
    try:
        shutil.copyfile(source, part)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise SciquantError(f"Cannot copy {source} to {part}: {exc}.") from exc


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file; SciquantError naming it if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise SciquantError(f"Cannot read {path}: {exc}.") from exc


# --- checks on the config ------------------------------------------------------------------


def _check_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise SciquantError(
            f"Cannot download {url!r}: the URL scheme must be http, https or file, not"
            f" {scheme or 'missing'!r}. Fix the URL in the config."
        )
    return scheme


def _check_sha256(sha256: str, url: str) -> str:
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256.strip()) is None:
        raise SciquantError(
            f"The sha256 given for {url} is {sha256!r}, not 64 hexadecimal digits. Put the"
            " file's sha256 (as printed by `sha256sum FILE`) in the config."
        )
    return sha256.strip().lower()


def _check_name(name: str, url: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise SciquantError(
            f"Cannot save {url} as {name!r}: it needs a plain file name. Set `name` for this"
            " file in the config."
        )


def _check_settings(retries: int, backoff_s: float, timeout_s: float) -> None:
    if retries < 0 or backoff_s < 0 or timeout_s <= 0:
        raise SciquantError(
            f"Download settings out of range: retries={retries}, backoff_s={backoff_s},"
            f" timeout_s={timeout_s}. Use retries >= 0, backoff_s >= 0 and timeout_s > 0."
        )


def _check_limits(**limits: float) -> None:
    """Each limit must be a positive number; the counts and byte sizes whole numbers."""
    for name, value in limits.items():
        whole = name != "max_compression_ratio"
        kinds = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
            need = "a whole number > 0" if whole else "a number > 0"
            raise SciquantError(f"Download limit out of range: {name}={value!r}; use {need}.")


def _size(n: float) -> str:
    """A byte count for people: 1.5 GiB, 20 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # unreachable


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SciquantError(f"Cannot create the folder {path}: {exc}.") from exc


# --- archives ------------------------------------------------------------------------------


class _Budget:
    """Counts an archive's members and declared sizes against its limits, one member at a
    time; raises `SciquantError` at the first member past a limit."""

    def __init__(self, archive: Path, max_members: int, max_bytes: int, max_ratio: float) -> None:
        self.archive = archive
        self.max_members, self.max_bytes, self.max_ratio = max_members, max_bytes, max_ratio
        try:
            self.archive_bytes = archive.stat().st_size
        except OSError as exc:
            raise SciquantError(f"Cannot read {archive}: {exc}.") from exc
        self.members = 0
        self.unpacked = 0

    def add(self, size: int) -> None:
        self.members += 1
        self.unpacked += max(int(size), 0)
        if self.members > self.max_members:
            self._refuse(
                f"it has more than {self.max_members} members",
                f"max_archive_members={self.max_members}",
                "max_archive_members",
            )
        if self.unpacked > self.max_bytes:
            self._refuse(
                f"its members add up to more than {self.max_bytes} bytes ({_size(self.max_bytes)})",
                f"max_unpacked_bytes={self.max_bytes}",
                "max_unpacked_bytes",
            )
        if (
            self.unpacked > _RATIO_FREE_BYTES
            and self.unpacked > self.max_ratio * self.archive_bytes
        ):
            self._refuse(
                f"its members add up to at least {_size(self.unpacked)},"
                f" {self.unpacked / max(self.archive_bytes, 1):.0f} times the archive's own"
                f" {_size(self.archive_bytes)} (data sets compress far less: this looks like an"
                " archive bomb)",
                f"max_compression_ratio={self.max_ratio:g}",
                "max_compression_ratio",
            )

    def _refuse(self, why: str, limit: str, argument: str) -> None:
        raise SciquantError(
            f"Refusing to unpack {self.archive}: {why}, past the limit {limit}. Nothing was"
            " unpacked. Check that the URL serves the intended archive; to unpack it on"
            f" purpose, raise `{argument}` ({_WHERE_LIMITS}), or set `extract: false` for it"
            " and unpack it by hand."
        )


def _tar_members(tf: tarfile.TarFile, budget: _Budget) -> list[tarfile.TarInfo]:
    """All members of `tf`, counted against `budget` as each header is read (a hard link
    counts as a copy of its target)."""
    members: list[tarfile.TarInfo] = []
    sizes: dict[str, int] = {}
    for member in tf:
        if member.isfile():
            size = member.size
        elif member.islnk():
            size = sizes.get(member.linkname, 0)
        else:
            size = 0
        sizes[member.name] = size
        budget.add(size)
        members.append(member)
    return members


def _archive_kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    # An unusual name (say a download saved without suffix): look at the content. Tar first,
    # because a tar whose last member is a zip can pass zipfile's end-of-file test.
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
        if zipfile.is_zipfile(archive):
            return "zip"
    except OSError as exc:
        raise SciquantError(f"Cannot read {archive}: {exc}.") from exc
    raise SciquantError(
        f"Cannot unpack {archive}: it is neither a zip nor a tar archive. Set `extract: false`"
        " for it in the config, or check that the URL serves the archive."
    )


def _member_parts(archive: Path, member: str) -> list[str]:
    """Split a member name into its parts, rejecting absolute paths and `..`."""
    if member.startswith("/") or re.match(r"[A-Za-z]:[/\\]", member):
        raise _unsafe(archive, member, "is an absolute path")
    parts = [p for p in member.split("/") if p not in ("", ".")]
    # Legitimate archives never need `..` in member names; tarfile and zipfile would also each
    # place such a member somewhere else.
    if ".." in parts:
        raise _unsafe(archive, member, "contains '..'")
    return parts


def _resolve(parts: Iterable[str], links: set[str]) -> str | None:
    """Resolve a path from the archive root as the OS would; None if it leaves the root.

    Raises `_ThroughLink` when the path continues past a member that is a symlink: the OS would
    follow that link and the lexical answer would be wrong (the chained-symlink escape).
    """
    stack: list[str] = []
    parts = [p for p in parts if p not in ("", ".")]
    for i, part in enumerate(parts):
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        if i < len(parts) - 1 and "/".join(stack) in links:
            raise _ThroughLink("/".join(stack))
    return "/".join(stack)


class _ThroughLink(Exception):
    """A path goes through a symlink member of the same archive."""


def _checked_tar_members(members: list[tarfile.TarInfo], archive: Path) -> list[str]:
    names = {m.name: "/".join(_member_parts(archive, m.name)) for m in members}
    links = {names[m.name] for m in members if m.issym()}
    checked: list[str] = []
    for m in members:
        name = names[m.name]
        if not name:
            # `tar -C dir -cf x.tar .` stores the root itself as "./"; nothing to place.
            if m.isdir():
                continue
            raise _unsafe(archive, m.name, "has an empty path")
        try:
            _resolve(name.split("/"), links)
            if m.issym():
                if m.linkname.startswith("/"):
                    raise _unsafe(
                        archive, m.name, f"is a symlink to the absolute path {m.linkname}"
                    )
                parent = name.split("/")[:-1]
                if _resolve([*parent, *m.linkname.split("/")], links) is None:
                    raise _unsafe(archive, m.name, f"is a symlink to {m.linkname}, outside")
            elif m.islnk():
                if m.linkname.startswith("/") or _resolve(m.linkname.split("/"), links) is None:
                    raise _unsafe(archive, m.name, f"is a hard link to {m.linkname}, outside")
            elif not (m.isfile() or m.isdir()):
                raise _unsafe(archive, m.name, "is a device or FIFO")
        except _ThroughLink as exc:
            raise _unsafe(
                archive, m.name, f"goes through the symlink {exc} in the archive"
            ) from None
        checked.append(name)
    return list(dict.fromkeys(checked))


def _checked_zip_members(zf: zipfile.ZipFile, archive: Path) -> list[str]:
    # zipfile writes symlink entries as small regular files, so only the names need checking.
    checked = []
    for info in zf.infolist():
        name = "/".join(_member_parts(archive, info.filename))
        if not name and not info.is_dir():
            raise _unsafe(archive, info.filename, "has an empty path")
        if name:
            checked.append(name)
    return list(dict.fromkeys(checked))


def _unsafe(archive: Path, member: str, why: str) -> SciquantError:
    return SciquantError(
        f"Refusing to unpack {archive}: member {member!r} {why}, which could write outside"
        " the destination folder. Nothing was unpacked. Check that the URL serves the intended"
        " archive, or unpack it by hand after inspecting it."
    )


def _merge_into(staging: Path, dest: Path, archive: Path, protected: Mapping[str, str]) -> None:
    """Move the unpacked tree from `staging` into `dest`, merging with folders already there.

    Merging (rather than replacing whole folders) lets datasets split over several archives
    that share a top-level folder unpack side by side. Each move is an atomic rename. Every move
    is checked first (`_plan_merge`), so a refused archive places nothing; afterwards the
    symlinks in `dest` are checked again if this archive placed or replaced one.
    """
    root = _real(dest)
    moves, links_change = _plan_merge(staging, dest, root, archive, protected)
    before = _links_leaving(dest, root) if links_change else set()
    for src, dst in moves:
        try:
            os.replace(src, dst)
        except OSError as exc:
            raise SciquantError(
                f"Cannot unpack {archive}: moving {src.name} to {dst} failed ({exc}). Check"
                f" permissions in {dest}, then fetch again."
            ) from exc
    if links_change:
        # A link placed now can change where an earlier one points (`E -> L/x/../..` once `L`
        # is re-pointed); such a link is removed rather than left to be followed.
        leaving = sorted(_links_leaving(dest, root) - before)
        for link in leaving:
            link.unlink(missing_ok=True)
        if leaving:
            raise SciquantError(
                f"Unpacking {archive} made the symlinks {', '.join(map(str, leaving))} lead"
                f" outside {dest} (a link in this archive changed where they point); they were"
                " removed. Check that the dataset's URLs serve the intended archives, then"
                f" delete {dest} and fetch again."
            )


def _plan_merge(
    staging: Path, dest: Path, root: str, archive: Path, protected: Mapping[str, str]
) -> tuple[list[tuple[Path, Path]], bool]:
    """The (source, destination) renames that merge `staging` into `dest`, all checked.

    `root` is the real path of `dest`. Returns the renames and whether they place or replace a
    symlink. Raises `SciquantError` (naming the archive, the member and what to do) before
    anything is moved if a destination is unsafe: see `extract_archive`.
    """
    moves: list[tuple[Path, Path]] = []
    links_change = False
    # Staging folders moved whole: their contents go with them and need only the link check.
    carried: set[Path] = set()
    for top, dirs, files in os.walk(staging):
        src_dir = Path(top)
        rel = src_dir.relative_to(staging)
        dst_dir = dest / rel
        inside_new = src_dir in carried
        # The folder the members land in, as the OS will find it (nonexistent parts lexically).
        real_dir = _real(dst_dir)
        if not _inside(real_dir, root):
            member = (rel / (dirs + files)[0]).as_posix() if dirs + files else rel.as_posix()
            link = _outward_link(dest, rel, root) or dst_dir
            raise SciquantError(
                f"Refusing to unpack {archive}: member {member!r} would be written through the"
                f" symlink {link}, which leads to {_real(link)}, outside {dest}."
                f" Nothing from this archive was unpacked. Remove {link} (links in the raw"
                " folder must stay inside it) and fetch again; check that the dataset's URLs"
                " serve the intended archives."
            )
        for name in [*dirs, *files]:
            src, dst = src_dir / name, dst_dir / name
            member = (rel / name).as_posix()
            is_link = src.is_symlink()
            if is_link:
                links_change = True
                target = os.readlink(src)
                resolved = _real(os.path.join(real_dir, target))
                if not _inside(resolved, root):
                    raise SciquantError(
                        f"Refusing to unpack {archive}: member {member!r} is a symlink to"
                        f" {target!r}, which in {dest} resolves to {resolved}, outside that"
                        " folder (following links already there, e.g. from archives unpacked"
                        " before). Nothing from this archive was unpacked. Check that the"
                        " dataset's URLs serve the intended archives; remove links in"
                        f" {dest} that lead elsewhere, or set `extract: false` for this archive"
                        " and unpack it by hand."
                    )
            is_folder = not is_link and src.is_dir()
            if inside_new:
                if is_folder:
                    carried.add(src)
                continue
            if not rel.parts and name in protected:
                raise SciquantError(
                    f"Refusing to unpack {archive}: member {member!r} would replace {dst},"
                    f" {protected[name]}. Nothing from this archive was unpacked."
                )
            if is_folder:
                if dst.is_dir():
                    continue  # an existing folder (or a link to one inside dest): merge into it
                if dst.exists() or dst.is_symlink():
                    raise SciquantError(
                        f"Refusing to unpack {archive}: member {member!r} is a folder, but"
                        f" {dst} exists and is not a folder; moving the folder in would delete"
                        f" it. Nothing from this archive was unpacked. Move {dst} away (or, if"
                        " another dataset file delivers it, fix the clash between the two) and"
                        " fetch again."
                    )
                carried.add(src)
            elif dst.is_dir() and not dst.is_symlink():
                raise SciquantError(
                    f"Cannot unpack {archive}: {dst} is a folder but the archive has a file"
                    f" there. Move {dst} away and fetch again."
                )
            links_change = links_change or dst.is_symlink()
            moves.append((src, dst))
    return moves, links_change


def _real(path: str | Path) -> str:
    """The path as the OS resolves it: symlinks followed, nonexistent parts and `..` after a
    symlink loop taken lexically (never an answer inside where the OS would go outside)."""
    return os.path.normpath(os.path.realpath(path))


def _inside(path: str, root: str) -> bool:
    """Whether the absolute, normalized `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _outward_link(dest: Path, rel: Path, root: str) -> Path | None:
    """The first symlink on the way from `dest` down `rel` that leads outside `root`."""
    path = dest
    for part in rel.parts:
        path = path / part
        if path.is_symlink() and not _inside(_real(path), root):
            return path
    return None


def _links_leaving(dest: Path, root: str) -> set[Path]:
    """Every symlink under `dest` whose real path is outside `root` (links are not followed;
    unpacking folders are skipped)."""
    found: set[Path] = set()
    pending = [dest]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if folder == dest and entry.name.startswith(".") and entry.name.endswith(".unpacking"):
                continue
            if entry.is_symlink():
                if not _inside(_real(entry.path), root):
                    found.add(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return found


def _extract_once(
    archive: Path,
    dest: Path,
    sha256: str,
    protected: Mapping[str, str] | None = None,
    limits: Mapping[str, Any] | None = None,
) -> None:
    """Unpack `archive` unless the stamp says this exact archive is already unpacked.

    `protected` and `limits` (keyword arguments `max_*`) go to `extract_archive`.
    """
    stamp = dest / f".{archive.name}.extracted"
    try:
        recorded = json.loads(stamp.read_text())
        if recorded["sha256"] == sha256 and all(
            (dest / top).exists() or (dest / top).is_symlink() for top in recorded["top"]
        ):
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no stamp, or an unreadable one: unpack
    unpacked = extract_archive(archive, dest, protected=protected, **(limits or {}))
    top = sorted({p.relative_to(dest).parts[0] for p in unpacked})
    tmp = stamp.with_name(stamp.name + ".part")
    tmp.write_text(json.dumps({"sha256": sha256, "top": top}))
    os.replace(tmp, stamp)
