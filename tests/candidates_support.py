"""Helpers for the candidate-pipeline tests: real input files and a real HTTP site on 127.0.0.1."""

from __future__ import annotations

import gzip
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


def write_warc(path: Path, pages: list[tuple[str, str]], extra_image_record: bool = True) -> Path:
    """A gzipped WARC with one HTML response record per (page URL, html)."""
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, html in pages:
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
            )
            writer.write_record(
                writer.create_warc_record(
                    url, "response", payload=io.BytesIO(html.encode()), http_headers=headers
                )
            )
        if extra_image_record:  # not a page: must produce no rows and no rejections
            headers = StatusAndHeaders("200 OK", [("Content-Type", "image/jpeg")], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(
                    "http://site.example.com/x.jpg",
                    "response",
                    payload=io.BytesIO(b"\xff\xd8"),
                    http_headers=headers,
                )
            )
    return path


def write_gzip_csv(path: Path, text: str) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogateescape"))
    return path


class _Handler(SimpleHTTPRequestHandler):
    log: list[tuple[float, str, str]]  # (time, path, user agent), set per server
    statuses: dict[str, int]  # path → HTTP error status answered instead of the file, set per server

    def do_GET(self) -> None:
        self.log.append((time.monotonic(), self.path, self.headers.get("User-Agent", "")))
        if (status := self.statuses.get(self.path)) is not None:
            self.send_error(status)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class InFlight:
    """Requests being served at this moment, and the most there ever were at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self._lock = threading.Lock()  # handler threads update it concurrently

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


class _SlowHandler(_Handler):
    slow_s: float
    in_flight: InFlight

    def do_GET(self) -> None:
        # Counted until the response starts, not until the handler returns: once the client has the
        # body it may free its slot and send the next request while this thread is still unwinding,
        # and counting that tail would see one request too many.
        with self.in_flight:
            time.sleep(self.slow_s)
        super().do_GET()


@contextmanager
def _server(root: Path, handler: type[SimpleHTTPRequestHandler]) -> Iterator[str]:
    def factory(*args, **kwargs):
        return handler(*args, directory=str(root), **kwargs)

    server = ThreadingHTTPServer(("127.0.0.1", 0), factory)  # a thread per request: requests can overlap
    # shutdown() waits for serve_forever to look at its flag, by default every 0.5 s: check more often
    # so that every test's server stops at once.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve(
    root: Path, statuses: dict[str, int] | None = None
) -> Iterator[tuple[str, list[tuple[float, str, str]]]]:
    """Serve ``root`` on 127.0.0.1 (a free port), answering the paths in ``statuses`` with that error
    status (e.g. a failing robots.txt); yields (base URL, request log)."""
    log: list[tuple[float, str, str]] = []
    handler = type("Handler", (_Handler,), {"log": log, "statuses": dict(statuses or {})})
    with _server(root, handler) as base:
        yield base, log


@contextmanager
def serve_slowly(root: Path, seconds: float) -> Iterator[tuple[str, InFlight]]:
    """Serve ``root`` on 127.0.0.1, each response taking ``seconds`` longer; yields (base URL, the
    counter of requests in flight)."""
    in_flight = InFlight()
    handler = type(
        "SlowHandler", (_SlowHandler,), {"log": [], "statuses": {}, "slow_s": seconds, "in_flight": in_flight}
    )
    with _server(root, handler) as base:
        yield base, in_flight
