"""Test support for the downloader: a loopback HTTP server with fault endpoints, test images, and a writer
of shards in img2dataset's layout (for the trainer's data-module tests).

    with FaultServer() as server:
        server.url("/img/3.jpg")             # a 64x48 JPEG, deterministic per seed
        server.url("/status/500")            # ... see FaultHandler for every endpoint

`write_img2dataset_shards(root, [5, 3])` writes 00000.tar (keys 000000000..), 00000.parquet and
00000_stats.json, like `img2dataset --output_format webdataset`.

`run_download_cli(args, ...)` runs `python -m data_pipelines.download` in a child process that meets file
permissions as a regular user does, even when the tests run as root, optionally under a file size limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

TEST_USER_AGENT = "clipbot/1.0 (+test)"
REPO = Path(__file__).resolve().parents[1]
_PR_CAPBSET_DROP = 24  # <linux/prctl.h>
_CAP_DAC_OVERRIDE = 1  # <linux/capability.h>: write and read whatever the permission bits say


# Looked up here, in the parent: the child between fork and exec only makes the call (no dlopen there,
# whose lock another thread of the parent may have held at the fork).
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux only


def _drop_permission_override() -> None:
    """Run in a child before exec: remove CAP_DAC_OVERRIDE from its bounding set. Root's program then
    starts without it, so a folder's missing write bit stops it as it stops any user."""
    if _prctl is None or _prctl(_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


@functools.lru_cache(maxsize=1)
def _can_drop_permission_override() -> bool:
    try:
        subprocess.run(["true"], preexec_fn=_drop_permission_override, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def run_download_cli(
    args: Sequence[str], *, file_size_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m data_pipelines.download ARGS` in a child process, its output captured as text.

    The child meets file permissions as a regular user does: a folder chmod'ed read-only refuses its
    writes. Tests run as root as well (containers, CI), and root ignores permission bits, so the child of
    root starts without CAP_DAC_OVERRIDE; where that cannot be done the test is skipped, saying why.
    file_size_limit: RLIMIT_FSIZE in bytes, so that a write past it fails with EFBIG (File too large), part
    way through the file, as a full disk fails one with ENOSPC.
    """
    steps: list[Callable[[], None]] = []
    if os.geteuid() == 0:
        if not _can_drop_permission_override():
            pytest.skip("runs as root, which ignores permission bits, and cannot drop CAP_DAC_OVERRIDE here")
        steps.append(_drop_permission_override)
    if file_size_limit is not None:
        steps.append(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit)))

    def before_exec() -> None:
        for step in steps:
            step()

    return subprocess.run(
        [sys.executable, "-m", "data_pipelines.download", *args],
        cwd=REPO,
        preexec_fn=before_exec,
        capture_output=True,
        text=True,
        timeout=120,
    )


@functools.lru_cache(maxsize=4096)
def jpeg_image(seed: int, width: int = 64, height: int = 48, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG (gradients plus noise), distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 215, 3)[None, None, :] + 40 * np.sin(
        xx[..., None] / (width / 5) + rng.uniform(0, 6, 3)
    )
    pixels = np.clip(
        base + 30 * np.cos(yy[..., None] / (height / 4)) + rng.normal(0, 6, (height, width, 3)), 0, 255
    )
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def png_rgba(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
    pixels[: size // 2, :, 3] = 0  # half transparent
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@functools.lru_cache(maxsize=1)
def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (0.4 gigapixel) that is only a few hundred kB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"


class FaultHandler(BaseHTTPRequestHandler):
    """Endpoints (GET):

    /robots.txt                   disallows /private/ (server.robots_mode "503": HTTP 503; "redirect":
                                  moved to /moved/robots.txt)
    /img/SEED.jpg?w=&h=           a JPEG; /png/SEED.png an RGBA PNG; /private/SEED.jpg (robots-disallowed)
    /slowimg/SEED.jpg             the JPEG of /img/SEED.jpg after server.delay_seconds; the server
                                  counts these requests in flight (server.peak_in_flight)
    /chunked/SEED.jpg?w=&h=       the JPEG of /img/SEED.jpg sent chunked (no Content-Length)
    /status/CODE                  an empty response with that status
    /switch/SEED.jpg              an empty response with status server.switch_status (404 until changed)
    /flaky/SEED.jpg               503 until server.flaky_ok is set, then the JPEG
    /slow-headers.jpg             waits server.slow_seconds before any byte (read timeout)
    /drip.jpg                     headers, then one byte every 0.1 s (total timeout)
    /reset.jpg                    the connection is reset (RST) before a response
    /truncated.jpg, /corrupt.jpg  half a JPEG; a JPEG header followed by garbage
    /text.jpg                     text/plain; /html.jpg HTML served as image/jpeg
    /bomb.png                     a 20000x20000 PNG (decompression bomb)
    /redirect-loop.jpg            redirects to itself; /redirect/N/SEED.jpg: N hops, then the JPEG
    /optout/noai.jpg, /optout/scoped.jpg, /optout/other-agent.jpg, /optout/slow-body.jpg
                                  X-Robots-Tag noai / "clipbot: noimageai" / "otherbot: noai" (allowed) /
                                  noai with a body that never finishes
    /dup/SEED.jpg                 the same bytes as /img/SEED.jpg
    """

    protocol_version = "HTTP/1.1"
    server: FaultServerHTTP

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(
        self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: Sequence = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_chunked(self, body: bytes, chunk: int = 1024) -> None:
        # Without a Content-Length only the body-size cap (not the header check) can stop a large body.
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(0, len(body), chunk):
                piece = body[i : i + chunk]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up once it had read enough to refuse the body
            self.close_connection = True

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        self.server.hits[path] += 1
        seg = path.strip("/").split("/")
        seed = int(seg[-1].split(".")[0]) if seg[-1].split(".")[0].isdigit() else 0
        if path == "/robots.txt" and self.server.robots_mode == "503":
            self._send(503, b"down", "text/plain")
        elif path == "/robots.txt" and self.server.robots_mode == "redirect":
            self._send(301, b"", "text/plain", [("Location", "/moved/robots.txt")])
        elif path in ("/robots.txt", "/moved/robots.txt"):
            self._send(200, ROBOTS_TXT, "text/plain")
        elif seg[0] in ("img", "private", "dup"):
            w, h = int(query.get("w", ["64"])[0]), int(query.get("h", ["48"])[0])
            self._send(200, jpeg_image(seed, w, h))
        elif seg[0] == "slowimg":
            with self.server.counting_in_flight():
                time.sleep(self.server.delay_seconds)
            self._send(200, jpeg_image(seed))
        elif seg[0] == "chunked":
            w, h = int(query.get("w", ["64"])[0]), int(query.get("h", ["48"])[0])
            self._send_chunked(jpeg_image(seed, w, h))
        elif seg[0] == "png":
            self._send(200, png_rgba(seed), "image/png")
        elif seg[0] == "status":
            self._send(int(seg[1]), b"", "text/plain")
        elif seg[0] == "switch":
            self._send(self.server.switch_status, b"", "text/plain")
        elif seg[0] == "flaky":
            if self.server.flaky_ok:
                self._send(200, jpeg_image(seed))
            else:
                self._send(503, b"busy", "text/plain")
        elif path == "/slow-headers.jpg":
            time.sleep(self.server.slow_seconds)
            self._send(200, jpeg_image(1))
        elif path == "/drip.jpg" or path == "/optout/slow-body.jpg":
            body = jpeg_image(2)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            if "optout" in path:
                self.send_header("X-Robots-Tag", "noai")
            self.end_headers()
            deadline = time.monotonic() + 10
            try:
                for b in body:
                    if time.monotonic() > deadline:
                        break
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            self.close_connection = True
        elif path == "/reset.jpg":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif path == "/truncated.jpg":
            data = jpeg_image(3, 200, 150)
            self._send(200, data[: len(data) // 2])
        elif path == "/corrupt.jpg":
            self._send(200, jpeg_image(4)[:20] + bytes(range(256)) * 8)
        elif path == "/text.jpg":
            self._send(200, b"just text", "text/plain")
        elif path == "/html.jpg":
            self._send(200, b"<!doctype html><html><body>not an image</body></html>", "image/jpeg")
        elif path == "/bomb.png":
            self._send(200, bomb_png(), "image/png")
        elif path == "/redirect-loop.jpg":
            self._send(302, b"", "text/plain", [("Location", "/redirect-loop.jpg")])
        elif seg[0] == "redirect":
            hops = int(seg[1])
            target = f"/redirect/{hops - 1}/{seed}.jpg" if hops > 1 else f"/img/{seed}.jpg"
            self._send(302, b"", "text/plain", [("Location", target)])
        elif seg[0] == "optout":
            tag = {
                "noai.jpg": "noai",
                "scoped.jpg": "clipbot: noimageai",
                "other-agent.jpg": "otherbot: noai",
            }
            # Seeds of their own: an allowed opt-out image must not be a duplicate of an /img/ one.
            image = jpeg_image(500 + seed)
            self._send(200, image, headers=[("X-Robots-Tag", tag.get(seg[1], "noai"))])
        else:
            self._send(404, b"not found", "text/plain")


class FaultServerHTTP(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self) -> None:
        bomb_png()  # built before serving, so the first request for it is not slow
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.hits: Counter[str] = Counter()
        self.flaky_ok = False
        self.switch_status = 404
        self.slow_seconds = 3.0
        self.delay_seconds = 0.05
        self.robots_mode = ""
        self.in_flight = 0
        self.peak_in_flight = 0
        self._in_flight_lock = threading.Lock()

    @contextlib.contextmanager
    def counting_in_flight(self) -> Iterator[None]:
        """Counts the requests inside this block at once; the peak shows the client's concurrency."""
        with self._in_flight_lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._in_flight_lock:
                self.in_flight -= 1

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on slow or faulty endpoints is what the tests do on purpose


class FaultServer:
    """The fault server in a background thread, and a black-hole port that never accepts (connect timeout)."""

    def __init__(self) -> None:
        self.httpd = FaultServerHTTP()
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._blackhole, self._fillers = _blackhole_socket()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def blackhole_url(self) -> str:
        return f"http://127.0.0.1:{self._blackhole.getsockname()[1]}/never.jpg"

    @property
    def hits(self) -> Counter[str]:
        return self.httpd.hits

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for s in [self._blackhole, *self._fillers]:
            s.close()


def _blackhole_socket() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: further SYNs are dropped, so connects time out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(listener.getsockname())
        fillers.append(s)
    time.sleep(0.05)
    return listener, fillers


def write_img2dataset_shards(root: Path, counts: Sequence[int], *, image_size: int = 32) -> list[Path]:
    """Shards in img2dataset's webdataset layout: {shard:05d}.tar with keys {shard:05d}{i:04d}, members
    .jpg/.txt/.json, and {shard:05d}.parquet and {shard:05d}_stats.json beside each. Returns the tar paths.
    """
    root.mkdir(parents=True, exist_ok=True)
    tars = []
    for shard, count in enumerate(counts):
        stem = f"{shard:05d}"
        rows = []
        with tarfile.open(root / f"{stem}.tar", "w") as tar:
            for i in range(count):
                key = f"{stem}{i:04d}"
                image = jpeg_image(shard * 10_007 + i, image_size, image_size)
                caption = f"img2dataset caption {key}"
                meta = {
                    "url": f"http://example.com/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": image_size,
                    "height": image_size,
                    "original_width": image_size * 2,
                    "original_height": image_size * 2,
                    "exif": None,
                    "sha256": None,
                }
                for ext, payload in (
                    ("jpg", image),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), root / f"{stem}.parquet")
        stats = {
            "count": count,
            "successes": count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": 1.0,
            "start_time": 0.0,
            "end_time": 1.0,
            "status_dict": {"success": count},
        }
        (root / f"{stem}_stats.json").write_text(json.dumps(stats, indent=4))
        tars.append(root / f"{stem}.tar")
    return tars
