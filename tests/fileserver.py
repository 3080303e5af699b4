"""A small HTTP server on 127.0.0.1 that serves files from a dict, for the fetch tests.

    with serving() as served:             # or serving(MyHandler) for special paths
        remote = served.add("data.bin", b"...", extract=False)   # a pinned RemoteFile
        fetch([remote], raw)

A file is found by its decoded path (percent-escapes undone, the query string ignored), so a
URL such as ``run%201.xtc?download=1`` serves ``run 1.xtc``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from sciquant.data.download import RemoteFile


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileHandler(BaseHTTPRequestHandler):
    """Serves `server.files`; subclasses handle special paths before calling `serve_file`."""

    protocol_version = "HTTP/1.1"
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        self.server.requests.append(self.path)
        self.serve_file(self.name)

    @property
    def name(self) -> str:
        return unquote(urlsplit(self.path).path).lstrip("/")

    def serve_file(self, name: str) -> None:
        body = self.server.files.get(name)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output readable

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up on purpose is not an error here


class FileServer(ThreadingHTTPServer):
    files: dict[str, bytes]
    requests: list[str]
    sent: int  # bytes a streaming handler has sent


class Served:
    """The running server: `add` a file, get its pinned `RemoteFile`."""

    def __init__(self, httpd: FileServer) -> None:
        self.httpd = httpd
        self.base = f"http://127.0.0.1:{httpd.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def add(self, path: str, data: bytes, **kw: object) -> RemoteFile:
        """Serve `data` at `path` (decoded, no query string); `kw` goes to `RemoteFile`."""
        self.httpd.files[unquote(urlsplit(path).path)] = data
        return RemoteFile(f"{self.base}/{path}", sha(data), **kw)  # type: ignore[arg-type]


@contextmanager
def serving(handler: type[FileHandler] = FileHandler) -> Iterator[Served]:
    """A `FileServer` with `handler` on a free port of 127.0.0.1 while the block runs."""
    httpd = FileServer(("127.0.0.1", 0), handler)
    httpd.files, httpd.requests, httpd.sent = {}, [], 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Served(httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
