"""Live pages: fetch seed URLs, extract their images, follow same-site links up to a depth limit.

Polite by construction: robots.txt is fetched once per host and obeyed (RFC 9309: a 4xx robots.txt
allows everything, a 5xx, unreachable or unreadable one forbids everything), requests to one host start
at least ``delay_s`` apart (longer if robots.txt asks for a Crawl-delay, fractional ones included) with at
most ``per_host_concurrency`` in flight, and every request carries the configured User-Agent.

``iter_live_pages`` runs the asyncio crawl in a background thread and streams its events, so a crawl is
just another source for the extraction step.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urlsplit
from urllib.robotparser import RobotFileParser

import aiohttp

from ..records import Skipped, SourceEvent
from .html_images import extract_images, page_events

_HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass(frozen=True)
class CrawlConfig:
    max_depth: int = 1  # seeds are depth 0; links found on a depth-d page are depth d + 1
    max_pages: int = 1000
    user_agent: str = "clip-train-candidates/0.1"
    delay_s: float = 1.0  # minimum gap between request starts to one host
    per_host_concurrency: int = 1
    total_concurrency: int = 32
    timeout_s: float = 30.0
    max_bytes: int = 5 << 20

    def __post_init__(self) -> None:
        # Checked here, not only in the CLI: a concurrency of 0 makes every request wait forever on its
        # host's semaphore (the crawl hangs), and a negative delay would silently mean "no delay".
        lowest = {
            "max_depth": 0,
            "max_pages": 1,
            "delay_s": 0,
            "per_host_concurrency": 1,
            "total_concurrency": 1,
            "max_bytes": 1,
        }
        for name, low in lowest.items():
            value = getattr(self, name)
            if not (value >= low and math.isfinite(value)):  # written so that NaN fails too
                raise ValueError(f"CrawlConfig.{name} must be a finite number ≥ {low}, got {value}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"CrawlConfig.timeout_s must be a finite number > 0, got {self.timeout_s}")


DEFAULT_CRAWL = CrawlConfig()


def _site(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    host = (parts.hostname or "").removeprefix("www.")
    return host, str(parts.port or {"http": 80, "https": 443}.get(parts.scheme, ""))


@dataclass
class _Host:
    slots: asyncio.Semaphore
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_start: float = 0.0
    robots: RobotFileParser | None = None
    delay_s: float = 0.0


class _Crawl:
    def __init__(self, seeds: Sequence[str], cfg: CrawlConfig, emit):
        self.cfg, self.emit = cfg, emit
        self.sites = {_site(s) for s in seeds}
        self.hosts: dict[str, _Host] = {}
        self.seen: set[str] = set()
        # Pages queued, being visited or fetched, less those robots.txt refused. Counting only fetched
        # and queued pages missed those a worker had taken but not fetched yet (waiting for robots.txt),
        # and the crawl went past max_pages.
        self.admitted = 0
        self.todo: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        for seed in seeds:
            self._enqueue(seed, 0)

    def _enqueue(self, url: str, depth: int) -> None:
        url = urldefrag(url)[0]
        if url in self.seen or urlsplit(url).scheme not in ("http", "https"):
            return
        if self.admitted >= self.cfg.max_pages:
            return
        self.admitted += 1
        self.seen.add(url)
        self.todo.put_nowait((url, depth))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        headers = {"User-Agent": self.cfg.user_agent}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as self.session:
            workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.total_concurrency)]
            await self.todo.join()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            url, depth = await self.todo.get()
            try:
                await self._visit(url, depth)
            except Exception as e:  # one bad page never stops the crawl
                self.emit(Skipped("fetch_error", f"{url}: {type(e).__name__}"))
            finally:
                self.todo.task_done()

    async def _host(self, url: str) -> _Host:
        netloc = urlsplit(url).netloc.lower()
        host = self.hosts.get(netloc)
        if host is None:
            host = self.hosts[netloc] = _Host(asyncio.Semaphore(self.cfg.per_host_concurrency))
            host.delay_s = self.cfg.delay_s
            robots_url = f"{urlsplit(url).scheme}://{netloc}/robots.txt"
            rp = RobotFileParser(robots_url)
            try:
                status, body, _ = await self._get(host, robots_url)
            except Exception:
                status, body = 503, ""
            crawl_delay = 0.0
            if status >= 500:
                rp.disallow_all = True
            elif status >= 400:
                rp.allow_all = True
            else:
                try:
                    crawl_delay = _parse_robots(rp, body, self.cfg.user_agent)
                except Exception:
                    # The standard parser raises on some rules (e.g. "Disallow: //[" is an invalid URL to
                    # it). Unreadable rules forbid everything, as an unreachable robots.txt does; and the
                    # host must get its rules either way, or every other task for it waits forever.
                    rp.disallow_all = True
            host.robots = rp
            host.delay_s = max(self.cfg.delay_s, crawl_delay)
        while host.robots is None:  # another task is still fetching this host's robots.txt
            await asyncio.sleep(0.01)
        return host

    async def _get(self, host: _Host, url: str) -> tuple[int, str, str]:
        async with host.slots:
            async with host.lock:
                loop = asyncio.get_running_loop()
                wait = host.next_start - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                host.next_start = loop.time() + host.delay_s
            async with self.session.get(url, allow_redirects=True) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if resp.status >= 400 or not ctype.lower().startswith((*_HTML_TYPES, "text/plain")):
                    return resp.status, "", ctype
                body = await resp.content.read(self.cfg.max_bytes)
                return (
                    resp.status,
                    body.decode(resp.get_encoding() if resp.charset else "utf-8", "replace"),
                    ctype,
                )

    async def _visit(self, url: str, depth: int) -> None:
        host = await self._host(url)
        if not host.robots.can_fetch(self.cfg.user_agent, url):
            self.admitted -= 1  # fetches nothing: its place under max_pages is free again
            self.emit(Skipped("robots_disallowed", url))
            return
        status, html, ctype = await self._get(host, url)
        if status >= 400:
            self.emit(Skipped(f"http_{status}", url))
            return
        if not ctype.lower().startswith(_HTML_TYPES):
            self.emit(Skipped("not_html", url))
            return
        for event in page_events(html, url, url):
            self.emit(event)
        if depth < self.cfg.max_depth:
            try:
                links = extract_images(html, url).links
            except Exception:
                return
            for link in links:
                if _site(link) in self.sites:
                    self._enqueue(link, depth + 1)


def _parse_robots(rp: RobotFileParser, text: str, user_agent: str) -> float:
    """Parse robots.txt ``text`` into ``rp``; return the Crawl-delay (seconds) that applies to
    ``user_agent``, 0 if none.

    The standard library keeps only whole-number Crawl-delays and silently drops e.g. "Crawl-delay: 0.5"
    (so a site asking for half a second got no delay at all). Each valid value is therefore replaced by
    its index in a list, a whole number the library keeps, while the library still decides which
    User-agent group applies to us. An invalid value (not a finite number ≥ 0) is replaced by a word the
    library ignores: some digits it would try to read itself, and fail (int("²"))."""
    delays: list[float] = []
    lines = []
    for line in text.splitlines():
        name, colon, value = line.split("#", 1)[0].partition(":")
        if colon and name.strip().lower() == "crawl-delay":
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if math.isfinite(seconds) and seconds >= 0:
                line = f"Crawl-delay: {len(delays)}"
                delays.append(seconds)
            else:
                line = "Crawl-delay: invalid"
        lines.append(line)
    rp.parse(lines)
    index = rp.crawl_delay(user_agent)
    return 0.0 if index is None else delays[index]


def iter_live_pages(seeds: Sequence[str], cfg: CrawlConfig = DEFAULT_CRAWL) -> Iterator[SourceEvent]:
    """Stream the events of a crawl from ``seeds`` (provenance: the page URL + "#img<i>")."""
    events: queue.Queue = queue.Queue(maxsize=10_000)
    done = object()
    failure: list[BaseException] = []

    def crawl() -> None:
        try:
            asyncio.run(_Crawl(list(seeds), cfg, events.put).run())
        except BaseException as e:
            failure.append(e)
        finally:
            events.put(done)

    thread = threading.Thread(target=crawl, name="live-pages-crawl", daemon=True)
    thread.start()
    while (event := events.get()) is not done:
        yield event
    thread.join()
    if failure:
        raise failure[0]


def read_seeds(path: str) -> list[str]:
    """Seed URLs, one per line (blank lines and lines starting with "#" ignored). Raises ValueError
    for a file without seeds or a line that is not an absolute http(s) URL: the crawl would skip such a
    seed without a trace."""
    seeds = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not (seed := line.strip()) or seed.startswith("#"):
                continue
            try:
                parts = urlsplit(seed)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)  # scheme: lowercased
            except ValueError:  # e.g. an unterminated IPv6 literal
                ok = False
            if not ok:
                raise ValueError(f"{path}:{number}: not an absolute http(s) URL: {seed!r}")
            seeds.append(seed)
    if not seeds:
        raise ValueError(f"no seed URL in {path}")
    return seeds
