"""The demo's image website: an HTTP server on 127.0.0.1 that renders source scene i at /img/<i>.<fmt>.

Nothing is stored: the server computes row i of the source (`scenes.source_row(seed, i)`) from the path
and renders it, so a source of any size costs no disk and starts at once. The row's fault decides what a
crawler gets instead of the image (404, 500, an HTML page, a truncated JPEG, bytes that are not an image),
and robots.txt disallows /private/.

    python scripts/demo/serve.py --port 8000 --rows 40000    # browse http://127.0.0.1:8000/img/000000.jpg
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenes import body_for, source_row

ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"
_PATH = re.compile(r"^/(img|private)/(\d{6,})\.(jpg|png|webp)$")


class SceneServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, seed: int, rows: int, port: int = 0) -> None:
        self.seed, self.rows = seed, rows
        self.requests_served = 0
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # A crawler closing a keep-alive connection mid-read is routine, not a server fault: stay quiet
        # rather than print a traceback into the demo's output.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request path."""
        with self._lock:
            self.requests_served += 1
        if path == "/robots.txt":
            return 200, "text/plain", ROBOTS_TXT
        match = _PATH.match(path.split("?", 1)[0])
        if match is None:
            return 404, "text/plain", b"not found\n"
        index = int(match.group(2))
        if index >= self.rows:
            return 404, "text/plain", b"not found\n"
        row = source_row(self.seed, index)
        if row.path != match.group(0):  # right number, wrong folder or extension
            return 404, "text/plain", b"not found\n"
        return body_for(row)


class _Handler(BaseHTTPRequestHandler):
    server: SceneServer
    protocol_version = "HTTP/1.1"  # keep-alive, as a real image host

    def do_GET(self) -> None:
        status, mime, body = self.server.answer(self.path)
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        status, mime, body = self.server.answer(self.path)
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the crawler reports the outcome
        pass


@contextmanager
def serving(seed: int, rows: int, port: int = 0) -> Iterator[SceneServer]:
    """A running `SceneServer` in a background thread, shut down on exit."""
    server = SceneServer(seed, rows, port)
    thread = threading.Thread(target=server.serve_forever, name="scene-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="source seed (default: 0)")
    parser.add_argument("--rows", type=int, default=40_000, help="rows of the source (default: 40000)")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    server = SceneServer(args.seed, args.rows, args.port)
    print(f"serving {args.rows} scenes (seed {args.seed}) at {server.base_url}/img/000000.jpg; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"served {server.requests_served} requests")


if __name__ == "__main__":
    main()
