"""Tests of the dataset downloader against a real HTTP server on 127.0.0.1.

The server supports `Range` requests and can be told to misbehave for its first requests: drop
the connection halfway through the body, stall mid-body, answer an error status, or ignore
`Range`. Every test uses small retry / backoff / timeout values so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sciquant.data.download import RemoteFile, download, extract_archive, fetch
from sciquant.errors import SciquantError

FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 2.0, "progress": False}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# --- the test server -----------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    range: str | None


@dataclass
class Behaviour:
    """What the server serves and how it misbehaves (counted over all GET requests)."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_first: int = 0  # send half the body, then close the socket
    stall_first: int = 0  # send half the body, then go silent
    fail_first: int = 0  # answer `fail_status` with no body
    fail_status: int = 503
    ignore_range: bool = False
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        b = self.server.behaviour
        with b.lock:
            index = len(b.requests)
            b.requests.append(Seen(self.path, self.headers.get("Range")))
        body = b.files.get(self.path.lstrip("/"))
        if index < b.fail_first or body is None:
            status = b.fail_status if body is not None else 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return

        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested and not b.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()

        half = len(payload) // 2
        if index < b.drop_first:
            self.wfile.write(payload[:half])
            self.wfile.flush()
            # FIN rather than RST, so the client receives every byte sent before the drop.
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
            return
        if index < b.stall_first:
            self.wfile.write(payload[:half])
            self.wfile.flush()
            b.release.wait(5.0)
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output readable


class Server(ThreadingHTTPServer):
    behaviour: Behaviour

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up on a stalled handler is expected here


@dataclass
class Running:
    behaviour: Behaviour
    base: str

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def server() -> Iterator[Running]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Running(httpd.behaviour, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.behaviour.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --- downloading ---------------------------------------------------------------------------


def test_download_writes_verified_file_without_part(server: Running, tmp_path: Path) -> None:
    data = blob(100_000)
    server.behaviour.files["a.bin"] = data
    target = tmp_path / "a.bin"

    assert download(server.url("a.bin"), target, sha(data), **FAST) == target

    assert target.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert [r.range for r in server.behaviour.requests] == [None]


def test_resume_after_dropped_connection(server: Running, tmp_path: Path) -> None:
    data = blob(300_000)
    server.behaviour.files["big.bin"] = data
    server.behaviour.drop_first = 1
    target = tmp_path / "big.bin"

    download(server.url("big.bin"), target, sha(data), **FAST)

    seen = server.behaviour.requests
    assert len(seen) == 2
    assert seen[0].range is None
    # The first response delivered exactly half the body before the socket closed.
    assert seen[1].range == f"bytes={len(data) // 2}-"
    assert sha(target.read_bytes()) == sha(data)
    assert not (tmp_path / "big.bin.part").exists()


def test_resume_from_part_left_by_earlier_run(server: Running, tmp_path: Path) -> None:
    data = blob(50_000)
    server.behaviour.files["f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:12_345])

    download(server.url("f.bin"), tmp_path / "f.bin", sha(data), **FAST)

    assert [r.range for r in server.behaviour.requests] == ["bytes=12345-"]
    assert (tmp_path / "f.bin").read_bytes() == data


def test_read_timeout_is_retried_and_resumed(server: Running, tmp_path: Path) -> None:
    data = blob(80_000)
    server.behaviour.files["slow.bin"] = data
    server.behaviour.stall_first = 1
    settings = {**FAST, "timeout_s": 0.3}

    download(server.url("slow.bin"), tmp_path / "slow.bin", sha(data), **settings)

    assert [r.range for r in server.behaviour.requests] == [None, f"bytes={len(data) // 2}-"]
    assert (tmp_path / "slow.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server: Running, tmp_path: Path) -> None:
    data = blob(40_000)
    server.behaviour.files["f.bin"] = data
    server.behaviour.ignore_range = True
    # Bytes that must not survive: appending the 200 body after them would corrupt the file.
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)

    download(server.url("f.bin"), tmp_path / "f.bin", sha(data), **FAST)

    assert [r.range for r in server.behaviour.requests] == ["bytes=1000-"]
    assert (tmp_path / "f.bin").read_bytes() == data


def test_416_with_complete_part_finishes_without_body(server: Running, tmp_path: Path) -> None:
    data = blob(10_000)
    server.behaviour.files["f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)

    download(server.url("f.bin"), tmp_path / "f.bin", sha(data), **FAST)

    assert [r.range for r in server.behaviour.requests] == ["bytes=10000-"]
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()


def test_stale_part_is_discarded_and_downloaded_again(server: Running, tmp_path: Path) -> None:
    data = blob(20_000)
    server.behaviour.files["f.bin"] = data
    # A .part from another version of the file: resuming it gives a wrong hash once.
    (tmp_path / "f.bin.part").write_bytes(blob(5_000, seed=1))

    download(server.url("f.bin"), tmp_path / "f.bin", sha(data), **FAST)

    assert [r.range for r in server.behaviour.requests] == ["bytes=5000-", None]
    assert (tmp_path / "f.bin").read_bytes() == data


def test_wrong_checksum_rejected_and_nothing_left(server: Running, tmp_path: Path) -> None:
    data = blob(20_000)
    server.behaviour.files["f.bin"] = data
    url, wrong = server.url("f.bin"), "0" * 64

    with pytest.raises(SciquantError) as err:
        download(url, tmp_path / "f.bin", wrong, **FAST)

    message = str(err.value)
    assert url in message and wrong in message and sha(data) in message
    assert "sha256 in the config" in message
    assert list(tmp_path.iterdir()) == []


def test_existing_correct_file_makes_no_request(server: Running, tmp_path: Path) -> None:
    data = blob(5_000)
    server.behaviour.files["f.bin"] = data
    (tmp_path / "f.bin").write_bytes(data)

    paths = fetch([RemoteFile(server.url("f.bin"), sha(data))], tmp_path, **FAST)

    assert paths == [tmp_path / "f.bin"]
    assert server.behaviour.requests == []


def test_existing_wrong_file_is_replaced(server: Running, tmp_path: Path) -> None:
    data = blob(5_000)
    server.behaviour.files["f.bin"] = data
    (tmp_path / "f.bin").write_bytes(b"truncated")

    fetch([RemoteFile(server.url("f.bin"), sha(data))], tmp_path, **FAST)

    assert (tmp_path / "f.bin").read_bytes() == data
    assert len(server.behaviour.requests) == 1


def test_404_fails_fast_naming_url(server: Running, tmp_path: Path) -> None:
    url = server.url("moved.tar.gz")
    started = time.monotonic()

    with pytest.raises(SciquantError) as err:
        # With these settings a retried 404 would take over a second.
        download(url, tmp_path / "moved.tar.gz", "a" * 64, retries=3, backoff_s=0.5, progress=False)

    assert time.monotonic() - started < 0.5
    assert len(server.behaviour.requests) == 1
    message = str(err.value)
    assert url in message and "404" in message and "moved" in message
    assert list(tmp_path.iterdir()) == []


def test_5xx_is_retried(server: Running, tmp_path: Path) -> None:
    data = blob(5_000)
    server.behaviour.files["f.bin"] = data
    server.behaviour.fail_first = 2

    download(server.url("f.bin"), tmp_path / "f.bin", sha(data), **FAST)

    assert len(server.behaviour.requests) == 3
    assert (tmp_path / "f.bin").read_bytes() == data


def test_retries_are_bounded_and_part_is_kept(server: Running, tmp_path: Path) -> None:
    data = blob(64_000)
    server.behaviour.files["f.bin"] = data
    server.behaviour.drop_first = 100
    url = server.url("f.bin")

    with pytest.raises(SciquantError) as err:
        download(url, tmp_path / "f.bin", sha(data), **{**FAST, "retries": 2})

    assert len(server.behaviour.requests) == 3
    assert url in str(err.value) and "3 attempts" in str(err.value)
    part = tmp_path / "f.bin.part"
    assert part.stat().st_size > 0 and not (tmp_path / "f.bin").exists()

    # The next run picks up where this one stopped.
    server.behaviour.drop_first = 0
    have = part.stat().st_size
    download(url, tmp_path / "f.bin", sha(data), **FAST)
    assert server.behaviour.requests[-1].range == f"bytes={have}-"
    assert (tmp_path / "f.bin").read_bytes() == data


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    url = f"http://127.0.0.1:{port}/f.bin"

    with pytest.raises(SciquantError, match="failed after 2 attempts") as err:
        download(url, tmp_path / "f.bin", "a" * 64, **{**FAST, "retries": 1})

    assert url in str(err.value)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/f.bin", "s3://bucket/f.bin", "f.bin"])
def test_unsupported_scheme_rejected(url: str, tmp_path: Path) -> None:
    with pytest.raises(SciquantError, match="scheme") as err:
        download(url, tmp_path / "f.bin", "a" * 64, **FAST)
    assert url in str(err.value)
    with pytest.raises(SciquantError, match="scheme"):
        RemoteFile(url, "a" * 64)


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "a" * 63, "a" * 65])
def test_malformed_sha256_rejected(bad: str, tmp_path: Path) -> None:
    with pytest.raises(SciquantError, match="64 hexadecimal"):
        download("http://127.0.0.1:9/f.bin", tmp_path / "f.bin", bad, **FAST)
    with pytest.raises(SciquantError, match="64 hexadecimal"):
        RemoteFile("http://127.0.0.1:9/f.bin", bad)


def test_file_url_is_copied_and_verified(tmp_path: Path) -> None:
    data = blob(3_000)
    source = tmp_path / "src" / "f.bin"
    source.parent.mkdir()
    source.write_bytes(data)
    dest = tmp_path / "dest"

    (path,) = fetch([RemoteFile(source.as_uri(), sha(data))], dest, **FAST)

    assert path == dest / "f.bin" and path.read_bytes() == data
    with pytest.raises(SciquantError, match="Checksum mismatch"):
        download(source.as_uri(), dest / "g.bin", "0" * 64, **FAST)
    assert not (dest / "g.bin").exists() and not (dest / "g.bin.part").exists()


def test_remote_file_name_defaults_to_url_basename() -> None:
    remote = RemoteFile("https://example.org/records/1/files/cases%201.tar.gz?download=1", "a" * 64)
    assert remote.filename == "cases 1.tar.gz"
    assert RemoteFile("https://example.org/x", "a" * 64, name="y.zip").filename == "y.zip"
    with pytest.raises(SciquantError, match="plain file name"):
        RemoteFile("https://example.org/dir/", "a" * 64)
    with pytest.raises(SciquantError, match="plain file name"):
        RemoteFile("https://example.org/x", "a" * 64, name="../x")


def test_fetch_rejects_two_files_with_one_name(tmp_path: Path) -> None:
    files = [
        RemoteFile("https://a.example/data.zip", "a" * 64),
        RemoteFile("https://b.example/data.zip", "b" * 64),
    ]
    with pytest.raises(SciquantError, match="different `name`"):
        fetch(files, tmp_path, **FAST)


def test_progress_bar_goes_to_stderr(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = blob(5_000)
    server.behaviour.files["f.bin"] = data

    download(server.url("f.bin"), tmp_path / "f.bin", sha(data), **{**FAST, "progress": True})

    out, err = capsys.readouterr()
    assert out == "" and "f.bin" in err


# --- archives ------------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_fetch_extracts_good_tar_gz(server: Running, tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "cases.tar.gz",
        [
            file_member("cases/a.vtp", b"alpha"),
            file_member("cases/sub/b.vtp", b"beta"),
            link_member("cases/latest.vtp", "sub/b.vtp", tarfile.SYMTYPE),
        ],
    )
    server.behaviour.files["cases.tar.gz"] = archive.read_bytes()
    dest = tmp_path / "data"

    paths = fetch(
        [RemoteFile(server.url("cases.tar.gz"), sha(archive.read_bytes()), extract=True)],
        dest,
        **FAST,
    )

    assert paths == [dest / "cases.tar.gz"]
    assert (dest / "cases/a.vtp").read_bytes() == b"alpha"
    assert (dest / "cases/sub/b.vtp").read_bytes() == b"beta"
    assert (dest / "cases/latest.vtp").read_bytes() == b"beta"
    # No staging folder or other leftovers next to the data.
    assert sorted(p.name for p in dest.iterdir()) == [
        ".cases.tar.gz.extracted",
        "cases",
        "cases.tar.gz",
    ]


def test_fetch_extracts_good_zip(server: Running, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run/config.yaml", "lr: 0.001\n")
        zf.writestr("run/weights/model.pt", b"\x00\x01" * 500)
    server.behaviour.files["run.zip"] = buffer.getvalue()
    dest = tmp_path / "data"

    fetch([RemoteFile(server.url("run.zip"), sha(buffer.getvalue()), extract=True)], dest, **FAST)

    assert (dest / "run/config.yaml").read_text() == "lr: 0.001\n"
    assert (dest / "run/weights/model.pt").read_bytes() == b"\x00\x01" * 500


def test_fetch_unpacks_once_and_again_when_gone(server: Running, tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "d.tar", [file_member("d/x.txt", b"x")])
    remote = RemoteFile(server.url("d.tar"), sha(archive.read_bytes()), extract=True)
    server.behaviour.files["d.tar"] = archive.read_bytes()
    dest = tmp_path / "data"
    fetch([remote], dest, **FAST)

    (dest / "d/x.txt").write_bytes(b"edited")
    fetch([remote], dest, **FAST)
    assert (dest / "d/x.txt").read_bytes() == b"edited"  # not unpacked over

    (dest / "d/x.txt").unlink()
    (dest / "d").rmdir()
    fetch([remote], dest, **FAST)
    assert (dest / "d/x.txt").read_bytes() == b"x"
    assert len(server.behaviour.requests) == 1


def test_split_archives_merge_into_one_folder(tmp_path: Path) -> None:
    one = make_tar(tmp_path / "one.tar", [file_member("data/a.txt", b"a")])
    two = make_tar(tmp_path / "two.tar", [file_member("data/b.txt", b"b")])
    dest = tmp_path / "dest"

    extract_archive(one, dest)
    paths = extract_archive(two, dest)

    assert paths == [dest / "data/b.txt"]
    assert sorted(p.name for p in (dest / "data").iterdir()) == ["a.txt", "b.txt"]


def test_tar_of_dot_extracts(tmp_path: Path) -> None:
    root = tarfile.TarInfo(".")
    root.type = tarfile.DIRTYPE
    archive = make_tar(tmp_path / "dot.tgz", [(root, None), file_member("./x.txt", b"x")])

    assert extract_archive(archive, tmp_path / "dest") == [tmp_path / "dest/x.txt"]
    assert (tmp_path / "dest/x.txt").read_bytes() == b"x"


def evil_tar(case: str, outside: Path) -> tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]:
    """Members of an archive that tries to write to `outside` (in tmp_path), and the bad one."""
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    cases = {
        "dotdot": [file_member("../evil", b"pwned")],
        "absolute": [file_member(str(outside / "abs"), b"pwned")],
        "symlink-out": [
            link_member("escape", "../outside", tarfile.SYMTYPE),
            file_member("escape/evil", b"pwned"),
        ],
        "absolute-symlink": [link_member("abslink", str(outside), tarfile.SYMTYPE)],
        "hardlink-out": [link_member("hard", "../outside/target", tarfile.LNKTYPE)],
        # Each link looks harmless on its own; followed in turn, d/up is dest/.. .
        "chained-symlinks": [
            link_member("d", ".", tarfile.SYMTYPE),
            link_member("d/up", "..", tarfile.SYMTYPE),
        ],
        "fifo": [(fifo, None)],
    }
    bad = {
        "dotdot": "../evil",
        "absolute": str(outside / "abs"),
        "symlink-out": "escape",
        "absolute-symlink": "abslink",
        "hardlink-out": "hard",
        "chained-symlinks": "d/up",
        "fifo": "pipe",
    }
    return cases[case], bad[case]


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "absolute",
        "symlink-out",
        "absolute-symlink",
        "hardlink-out",
        "chained-symlinks",
        "fifo",
    ],
)
def test_unsafe_tar_rejected_with_nothing_extracted(case: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"secret")
    members, bad_member = evil_tar(case, outside)
    # A harmless member first: it must not be extracted either.
    archive = make_tar(tmp_path / "evil.tar", [file_member("ok.txt", b"ok"), *members])
    dest = tmp_path / "dest"

    with pytest.raises(SciquantError) as err:
        extract_archive(archive, dest)

    assert str(archive) in str(err.value) and repr(bad_member) in str(err.value)
    # Rejected by the up-front check, not halfway through by tarfile's own filter.
    assert str(err.value).startswith("Refusing to unpack")
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_bytes() == b"secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "evil.tar", "outside"]


@pytest.mark.parametrize("name", ["../evil", "/tmp/sciquant-test-evil", "a/../../evil"])
def test_unsafe_zip_rejected_with_nothing_extracted(name: str, tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr(zipfile.ZipInfo(name), "pwned")
    dest = tmp_path / "dest"

    with pytest.raises(SciquantError) as err:
        extract_archive(archive, dest)

    assert str(archive) in str(err.value) and repr(name) in str(err.value)
    assert str(err.value).startswith("Refusing to unpack")
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "evil.zip"]
    assert not Path("/tmp/sciquant-test-evil").exists()


def test_damaged_archive_gives_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b this is not really gzip")

    with pytest.raises(SciquantError, match="fetch it again") as err:
        extract_archive(archive, tmp_path / "dest")
    assert str(archive) in str(err.value)
    assert list((tmp_path / "dest").iterdir()) == []
