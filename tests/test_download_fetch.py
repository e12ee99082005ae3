"""The downloader's HTTP client against a loopback server with fault endpoints."""

from __future__ import annotations

import asyncio

import pytest
from download_support import TEST_USER_AGENT, FaultServer, jpeg_image

from data_pipelines.download.fetch import (
    FetchConfig,
    Fetcher,
    is_public_address,
    opt_out_reason,
    sniff_image,
)


def fast_config(**overrides: object) -> FetchConfig:
    settings = dict(
        user_agent=TEST_USER_AGENT,
        connect_timeout=0.5,
        read_timeout=0.5,
        total_timeout=2.0,
        retries=1,
        backoff=0.05,
        allow_private_addresses=True,
    )
    settings.update(overrides)
    return FetchConfig(**settings)


def fetch_all(config: FetchConfig, urls: list[str]) -> list:
    async def run() -> list:
        async with Fetcher(config) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(u) for u in urls))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


@pytest.mark.parametrize(
    ("headers", "opted_out"),
    [
        (["noai"], True),
        (["noindex, NoImageAI"], True),
        (["clipbot: noai"], True),
        (["ClipBot:noimageai"], True),
        (["*: noimageai"], True),
        # An agent prefix after unscoped directives scopes only what follows it.
        (["noindex, clipbot: noai"], True),
        (["noindex, otherbot: noai"], False),
        # A prefix scopes every directive after it in the header, up to the next prefix.
        (["clipbot: nofollow, noai"], True),
        (["otherbot: noai, noimageai"], False),
        (["otherbot: noai"], False),
        (["otherbot: noai, clipbot: noindex"], False),
        (["otherbot: noindex, clipbot: noimageai"], True),
        (["clipbotx: noai"], False),
        # Each header starts unscoped; any one opting us out is enough.
        (["otherbot: nofollow", "noimageai"], True),
        (["otherbot: noindex", "otherbot: noai"], False),
        (["noindex", "nofollow"], False),
        ([], False),
        # Directives with a value are not agent prefixes, even when a date's comma splits them.
        (["unavailable_after: 25 Jun 2030 15:00:00 PST"], False),
        (["unavailable_after: Friday, 25-Jun-30 15:00:00 GMT, noai"], True),
        (["max-image-preview: large, noai"], True),
        (["otherbot: max-snippet: 20, noai"], False),
    ],
)
def test_opt_out_header_forms(headers: list[str], opted_out: bool) -> None:
    reason = opt_out_reason(headers, "clipbot")
    assert (reason is not None) == opted_out
    if opted_out:
        assert reason in {f"X-Robots-Tag: {h}" for h in headers}


def test_address_policy_and_magic_bytes() -> None:
    for private in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:10.0.0.1",
    ):
        assert not is_public_address(private), private
    assert is_public_address("93.184.216.34") and is_public_address("2606:4700::1111")
    assert sniff_image(jpeg_image(0)[:16]) == "jpeg"
    assert sniff_image(b"<!doctype html>") is None


# About 4 s normally (the drip's total timeout, twice); the marker turns a hang into a failure.
@pytest.mark.timeout(60)
def test_fault_endpoints_get_their_reasons(server: FaultServer) -> None:
    expected = {
        "/img/1.jpg": "success",
        "/png/1.png": "success",
        "/redirect/3/2.jpg": "success",
        "/optout/other-agent.jpg": "success",
        "/status/404": "http_error",
        "/status/500": "http_error",
        "/slow-headers.jpg": "timeout",
        "/drip.jpg": "timeout",
        "/reset.jpg": "connection_error",
        "/text.jpg": "bad_content_type",
        "/html.jpg": "not_an_image",
        "/redirect-loop.jpg": "too_many_redirects",
        "/optout/noai.jpg": "opted_out",
        "/optout/scoped.jpg": "opted_out",
        "/optout/slow-body.jpg": "opted_out",
        "/private/1.jpg": "robots_disallowed",
    }
    urls = [server.url(p) for p in expected] + [server.blackhole_url, "ftp://example.com/a.jpg"]
    results = fetch_all(fast_config(), urls)
    got = {p: r.status for p, r in zip([*expected, "blackhole", "ftp"], results)}
    assert got == {**expected, "blackhole": "timeout", "ftp": "bad_url"}
    by_path = dict(zip([*expected, "blackhole", "ftp"], results))
    assert by_path["/img/1.jpg"].data == jpeg_image(1)
    # Transient failures are retried once, permanent ones are not.
    assert by_path["/status/500"].attempts == 2 and by_path["/status/404"].attempts == 1
    assert by_path["/reset.jpg"].attempts == 2 and by_path["blackhole"].attempts == 2
    # Opt-out is decided on the headers: the never-ending body was not waited for, robots.txt was obeyed.
    assert by_path["/optout/slow-body.jpg"].reason == "X-Robots-Tag: noai"
    assert server.hits["/private/1.jpg"] == 0 and server.hits["/robots.txt"] == 1
    # Each timeout is ended by the limit meant for it, and retried once only. The drip would otherwise run
    # until the server gives up after 10 s (a connection_error), the silent server answers after 3 s.
    timeouts = {
        "/slow-headers.jpg": "reading data",
        "/drip.jpg": "total timeout",
        "blackhole": "connection timeout",
    }
    for name, limit in timeouts.items():
        assert limit in by_path[name].reason.lower() and by_path[name].attempts == 2, by_path[name]
    assert by_path["/drip.jpg"].reason == "total timeout: the attempt took over 2 s"


def test_private_addresses_refused_by_default(server: FaultServer) -> None:
    port = server.port
    urls = [server.url("/img/1.jpg"), f"http://localhost:{port}/img/1.jpg", f"http://[::1]:{port}/img/1.jpg"]
    before = server.hits["/img/1.jpg"]
    results = fetch_all(fast_config(allow_private_addresses=False), urls)
    assert [r.status for r in results] == ["blocked_address"] * 3
    assert server.hits["/img/1.jpg"] == before  # never connected


def test_body_size_limit(server: FaultServer) -> None:
    (result,) = fetch_all(fast_config(max_bytes=500), [server.url("/img/1.jpg?w=300&h=300")])
    assert result.status == "too_large"


@pytest.mark.parametrize(
    ("mode", "expected"), [("redirect", "robots_disallowed"), ("503", "robots_disallowed")]
)
def test_robots_redirect_followed_and_5xx_disallows_all(
    server: FaultServer, mode: str, expected: str
) -> None:
    server.httpd.robots_mode = mode
    try:
        private, public = fetch_all(fast_config(), [server.url("/private/9.jpg"), server.url("/img/9.jpg")])
    finally:
        server.httpd.robots_mode = ""
    assert private.status == expected
    # A redirected robots.txt still only disallows /private/; a failing one (5xx) disallows everything.
    assert public.status == ("success" if mode == "redirect" else "robots_disallowed")


def test_body_cap_holds_without_content_length(server: FaultServer) -> None:
    url = server.url("/chunked/7.jpg?w=300&h=300")
    (capped,) = fetch_all(fast_config(max_bytes=2000), [url])
    (whole,) = fetch_all(fast_config(), [url])
    # The chunked body has no Content-Length to refuse up front, so the cap on the bytes read must stop it.
    assert capped.status == "too_large" and capped.reason.startswith("body larger than 2000")
    assert whole.status == "success" and whole.data == jpeg_image(7, 300, 300)
    assert len(whole.data) > 2000


@pytest.mark.parametrize("per_host", [2, 4])
def test_per_host_limit_caps_requests_in_flight(server: FaultServer, per_host: int) -> None:
    server.httpd.delay_seconds, server.httpd.peak_in_flight = 0.2, 0
    try:
        config = fast_config(per_host=per_host, concurrency=64, read_timeout=5.0, total_timeout=10.0)
        results = fetch_all(config, [server.url(f"/slowimg/{i}.jpg") for i in range(8)])
    finally:
        server.httpd.delay_seconds = 0.05
    assert [r.status for r in results] == ["success"] * 8
    # Equal, not just at most: the limit is reached, so requests do overlap up to it and no further.
    assert server.httpd.peak_in_flight == per_host


@pytest.mark.timeout(30)  # a hang (no limit at all) fails here instead of at the suite's 600 s
@pytest.mark.parametrize(("target", "reason"), [("blackhole", "connection timeout"), ("slow", "reading")])
def test_connect_and_read_timeouts_end_long_before_the_total(
    server: FaultServer, target: str, reason: str
) -> None:
    # The server sends nothing for 3 s. Without the connect (read) timeout the black hole would end on the
    # 10 s total, whose reason names the total, and the silent server would answer: a success.
    url = server.blackhole_url if target == "blackhole" else server.url("/slow-headers.jpg")
    config = fast_config(connect_timeout=0.3, read_timeout=0.3, total_timeout=10.0, retries=0)
    (result,) = fetch_all(config, [url])
    assert result.status == "timeout" and reason in result.reason.lower(), result
    assert "total" not in result.reason and result.attempts == 1
