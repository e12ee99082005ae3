"""The HTTP client of the downloader: asyncio + aiohttp, one session per worker process.

Policy, in the order a request meets it:

* only http and https URLs;
* hosts that resolve to private, loopback, link-local or otherwise non-global addresses are refused unless
  `allow_private_addresses` is set (checked on every redirect hop, at DNS-resolution time, so a public name
  cannot redirect or re-resolve the crawler onto its own network);
* robots.txt is fetched once per origin and cached; a disallowed URL is never requested;
* `X-Robots-Tag: noai` / `noimageai` (also scoped to an agent, `X-Robots-Tag: noindex, <token>: noai`) is
  checked on the response headers before any of the body is read;
* redirects are followed by hand (each hop goes through the checks above) up to `max_redirects`;
* the body must be declared as an image (or a generic binary type), be at most `max_bytes`, and start
  with the magic bytes of an image format we decode.

Transient failures (timeouts, connection errors, HTTP 408/425/429/5xx) are retried with exponential
back-off; everything else fails at once. Every outcome is a `FetchResult` with a status from `STATUSES`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import socket
from dataclasses import dataclass
from urllib.robotparser import RobotFileParser

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

OK = "success"
# Failure statuses of the network stage; the image stage adds its own (see images.py).
BAD_URL = "bad_url"
BLOCKED_ADDRESS = "blocked_address"
ROBOTS_DISALLOWED = "robots_disallowed"
OPTED_OUT = "opted_out"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_MANY_REDIRECTS = "too_many_redirects"
TOO_LARGE = "too_large"
BAD_CONTENT_TYPE = "bad_content_type"
NOT_AN_IMAGE = "not_an_image"
FETCH_STATUSES = (
    BAD_URL,
    BLOCKED_ADDRESS,
    ROBOTS_DISALLOWED,
    OPTED_OUT,
    HTTP_ERROR,
    TIMEOUT,
    CONNECTION_ERROR,
    TOO_MANY_REDIRECTS,
    TOO_LARGE,
    BAD_CONTENT_TYPE,
    NOT_AN_IMAGE,
)

TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_HTTP = frozenset({301, 302, 303, 307, 308})
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# X-Robots-Tag directives that carry a value after a colon; anything else before a colon is a user agent.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
# A user-agent product token. It must start with a letter so that the tail of a date value split at its
# comma ("unavailable_after: Friday, 25-Jun-10 15:00:00 GMT") is never taken for an agent prefix.
_AGENT_TOKEN = re.compile(r"\*|[a-z][a-z0-9_.-]*")
# Content types accepted before the magic-byte check decides: some servers label images generically.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary"})
_MAX_ROBOTS_BYTES = 512 * 1024

DEFAULT_USER_AGENT = "clip-train-downloader/0.1 (+https://github.com/clip-train/clip_train; research crawler)"


@dataclass(frozen=True)
class FetchConfig:
    """Network settings of one worker process. Times are in seconds, sizes in bytes."""

    user_agent: str = DEFAULT_USER_AGENT
    concurrency: int = 64  # requests in flight per process
    per_host: int = 16  # connections per host per process
    connect_timeout: float = 5.0
    read_timeout: float = 10.0  # longest wait for any single read (headers or a body chunk)
    total_timeout: float = 30.0  # one attempt, redirects included; bounds slow-drip bodies
    retries: int = 2  # extra attempts after a transient failure
    backoff: float = 0.5  # first retry waits about this long, then doubles
    max_redirects: int = 5
    max_bytes: int = 20 * 1024 * 1024
    allow_private_addresses: bool = False

    def __post_init__(self) -> None:
        # 0 would hang the run (a semaphore nobody can take) or, for aiohttp's per-host limit, silently
        # mean "no limit"; negative values fail deep inside asyncio. Refuse both here, before any work.
        for name, flag in (("concurrency", "--concurrency"), ("per_host", "--per-host")):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} ({flag}) must be at least 1, got {value}")
        # The limits below would otherwise fail every row (a timeout of 0 s or less times out at once,
        # --max-bytes 0 refuses every body, a negative --max-redirects follows no response at all) and
        # the run would end as if every server had failed, or quietly mean something else (negative
        # retries or back-off). Each check is negated so that NaN fails too.
        for name, flag in (
            ("connect_timeout", "--connect-timeout"),
            ("read_timeout", "--read-timeout"),
            ("total_timeout", "--total-timeout"),
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} ({flag}) must be above 0 seconds, got {value}")
        for name, flag, least in (
            ("retries", "--retries", 0),
            ("backoff", "--backoff", 0),
            ("max_redirects", "--max-redirects", 0),
            ("max_bytes", "--max-bytes", 1),
        ):
            value = getattr(self, name)
            if not value >= least:
                raise ValueError(f"{name} ({flag}) must be at least {least}, got {value}")

    @property
    def robots_token(self) -> str:
        """The product token robots.txt and scoped X-Robots-Tag rules name us by ("clip-train-downloader")."""
        return self.user_agent.split("/")[0].strip().lower()


@dataclass
class FetchResult:
    """The outcome of fetching one URL: `data` is set only when `status == "success"`."""

    status: str
    reason: str = ""
    data: bytes | None = None
    http_status: int | None = None
    attempts: int = 0
    transient: bool = False


class BlockedAddressError(OSError):
    """A host resolved only to addresses the address policy refuses."""


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses (not private, loopback, link-local, reserved...)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PolicyResolver(AbstractResolver):
    """DNS resolver that drops non-public addresses, so the policy holds for the address actually dialled."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results: list[ResolveResult] = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        public = [r for r in results if is_public_address(r["host"])]
        if not public:
            shown = ", ".join(sorted({r["host"] for r in results}))
            raise BlockedAddressError(f"{host} resolves only to non-public addresses ({shown})")
        return public

    async def close(self) -> None:
        await self._inner.close()


def opt_out_reason(header_values: list[str], robots_token: str) -> str | None:
    """The X-Robots-Tag value that opts this crawler out of AI use, or None.

    Each header holds comma-separated directives; `<agent>:` before a directive scopes it and the ones
    after it in the same header to that agent (`noindex, clipbot: noai, noimageai`), until another agent
    prefix. Directives before any prefix apply to every agent, as do those scoped to `*` or to our
    `robots_token`. Several headers may be present; any one opting us out is enough.
    """
    for value in header_values:
        scope: str | None = None  # a new header starts unscoped
        for item in value.split(","):
            directive = item.strip().lower()
            head, colon, rest = directive.partition(":")
            head = head.strip()
            if colon and head not in _VALUED_DIRECTIVES and _AGENT_TOKEN.fullmatch(head):
                scope, directive = head, rest.strip()
            if directive in OPT_OUT_DIRECTIVES and scope in (None, "*", robots_token):
                return f"X-Robots-Tag: {value.strip()}"
    return None


def sniff_image(head: bytes) -> str | None:
    """Image format named by the magic bytes at the start of a file, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _content_type_ok(content_type: str) -> bool:
    main = content_type.split(";")[0].strip().lower()
    return main.startswith("image/") or main in _GENERIC_TYPES


def _failure(
    status: str, reason: str, http_status: int | None = None, transient: bool = False
) -> FetchResult:
    return FetchResult(status=status, reason=reason, http_status=http_status, transient=transient)


def _classify_exception(exc: BaseException, total_timeout: float) -> FetchResult:
    """Map a client exception onto a status; only network-level trouble is marked transient."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, BlockedAddressError):
            return _failure(BLOCKED_ADDRESS, str(cause))
        cause = getattr(cause, "os_error", None) or cause.__cause__
    if isinstance(exc, aiohttp.TooManyRedirects):
        return _failure(TOO_MANY_REDIRECTS, str(exc))
    if isinstance(exc, aiohttp.InvalidURL | ValueError | UnicodeError):
        return _failure(BAD_URL, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _failure(CONNECTION_ERROR, f"DNS: {exc}", transient=False)
    if type(exc) in (asyncio.TimeoutError, TimeoutError):
        # aiohttp's total timeout and the attempt's own bound raise a bare TimeoutError with no message
        # (the connect and read timeouts raise subclasses that name themselves): say which limit it was.
        return _failure(TIMEOUT, f"total timeout: the attempt took over {total_timeout:g} s", transient=True)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return _failure(TIMEOUT, f"{type(exc).__name__} {exc}".strip(), transient=True)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return _failure(CONNECTION_ERROR, f"{type(exc).__name__}: {exc}".strip(), transient=True)
    return _failure(CONNECTION_ERROR, f"unexpected {type(exc).__name__}: {exc}")


class Fetcher:
    """Fetches image URLs under the policy above: `async with Fetcher(config) as f: await f.fetch(url)`."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._robots: dict[str, RobotFileParser] = {}
        self._robots_pending: dict[str, asyncio.Future[RobotFileParser]] = {}

    async def __aenter__(self) -> Fetcher:
        c = self.config
        connector = aiohttp.TCPConnector(
            limit=c.concurrency,
            limit_per_host=c.per_host,
            ttl_dns_cache=300,
            resolver=PolicyResolver(c.allow_private_addresses),
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(
            total=c.total_timeout, sock_connect=c.connect_timeout, sock_read=c.read_timeout
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": c.user_agent, "Accept": "image/*,*/*;q=0.5"},
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL with retries; never raises for network or policy trouble."""
        c = self.config
        attempt = 0
        while True:
            attempt += 1
            try:
                # One bound for the whole attempt: robots.txt, every redirect hop and the body.
                async with asyncio.timeout(c.total_timeout + c.connect_timeout):
                    result = await self._fetch_once(url)
            except Exception as exc:
                result = _classify_exception(exc, c.total_timeout)
            result.attempts = attempt
            if not result.transient or attempt > c.retries:
                return result
            await asyncio.sleep(c.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))

    async def _fetch_once(self, url: str) -> FetchResult:
        assert self._session is not None, "use Fetcher as an async context manager"
        c = self.config
        current = URL(url)
        for _hop in range(c.max_redirects + 1):
            if current.scheme not in ("http", "https") or not current.host:
                return _failure(BAD_URL, f"only http(s) URLs with a host are fetched: {str(current)[:200]}")
            if not self._host_allowed(current.host):
                return _failure(BLOCKED_ADDRESS, f"{current.host} is not a public address")
            if not await self._robots_allow(current):
                return _failure(ROBOTS_DISALLOWED, f"robots.txt disallows {current.path}")
            async with self._session.get(current, allow_redirects=False) as resp:
                optout = opt_out_reason(resp.headers.getall("X-Robots-Tag", []), c.robots_token)
                if optout:
                    return _failure(OPTED_OUT, optout, resp.status)
                if resp.status in REDIRECT_HTTP:
                    location = resp.headers.get("Location")
                    if not location:
                        return _failure(HTTP_ERROR, f"HTTP {resp.status} without Location", resp.status)
                    current = current.join(URL(location))
                    continue
                if resp.status != 200:
                    return _failure(
                        HTTP_ERROR,
                        f"HTTP {resp.status}",
                        resp.status,
                        transient=resp.status in TRANSIENT_HTTP,
                    )
                content_type = resp.headers.get("Content-Type", "")
                if not _content_type_ok(content_type):
                    return _failure(BAD_CONTENT_TYPE, f"Content-Type {content_type[:100]}", resp.status)
                if resp.content_length is not None and resp.content_length > c.max_bytes:
                    return _failure(TOO_LARGE, f"Content-Length {resp.content_length} > {c.max_bytes}", 200)
                data = await _read_capped(resp, c.max_bytes)
                if data is None:
                    return _failure(TOO_LARGE, f"body larger than {c.max_bytes} bytes", 200)
                if sniff_image(data[:16]) is None:
                    return _failure(NOT_AN_IMAGE, f"body starts with {data[:12]!r}", 200)
                return FetchResult(status=OK, data=data, http_status=200)
        return _failure(TOO_MANY_REDIRECTS, f"more than {c.max_redirects} redirects")

    async def _robots_allow(self, url: URL) -> bool:
        origin = f"{url.scheme}://{url.raw_authority}"
        parser = self._robots.get(origin)
        if parser is None:
            pending = self._robots_pending.get(origin)
            if pending is None:
                pending = asyncio.ensure_future(self._load_robots(origin))
                self._robots_pending[origin] = pending
            # shield: one caller timing out must not cancel the fetch the other callers wait for.
            parser = await asyncio.shield(pending)
            self._robots[origin] = parser
            self._robots_pending.pop(origin, None)
        return parser.can_fetch(self.config.robots_token, str(url))

    async def _load_robots(self, origin: str) -> RobotFileParser:
        """robots.txt per RFC 9309: up to 5 redirects (each hop under the address policy), 4xx means no
        rules, 5xx means disallow all; unreachable means no rules (the image request to the same host then
        records the real network error)."""
        assert self._session is not None
        parser = RobotFileParser()
        parser.allow_all = True
        url = URL(f"{origin}/robots.txt")
        try:
            async with asyncio.timeout(self.config.total_timeout):
                for _hop in range(6):
                    if url.scheme not in ("http", "https") or not self._host_allowed(url.host or ""):
                        break
                    async with self._session.get(url, allow_redirects=False) as resp:
                        if resp.status in REDIRECT_HTTP and resp.headers.get("Location"):
                            url = url.join(URL(resp.headers["Location"]))
                            continue
                        if resp.status >= 500:
                            parser.allow_all, parser.disallow_all = False, True
                        elif resp.status == 200:
                            body = await _read_capped(resp, _MAX_ROBOTS_BYTES) or b""
                            parser.allow_all = False
                            parser.parse(body.decode("utf-8", "replace").splitlines())
                        break
        except Exception:  # an unreachable robots.txt must not stop the crawl
            parser.allow_all, parser.disallow_all = True, False
        parser.modified()
        return parser

    def _host_allowed(self, host: str) -> bool:
        """False for an IP literal the address policy refuses (names are checked by PolicyResolver)."""
        return self.config.allow_private_addresses or not _is_ip_literal(host) or is_public_address(host)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
    """The body, or None as soon as it grows past max_bytes (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
