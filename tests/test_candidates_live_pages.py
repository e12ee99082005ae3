"""The live-page crawler against real pages served on 127.0.0.1: robots.txt, depth, same-site links,
per-host politeness delay and concurrency, the User-Agent, broken pages counted, bad settings refused."""

from __future__ import annotations

from collections import Counter

import pytest
from candidates_support import serve, serve_slowly

from data_pipelines.candidates.records import Candidate, Rejected, Skipped
from data_pipelines.candidates.sources.live_pages import CrawlConfig, iter_live_pages


def _site(root, off_site: str) -> None:
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (root / "index.html").write_text(
        '<img src="img/dog.jpg" alt="a dog">'
        '<img data-src="/img/cat.jpg" src="data:image/gif;base64,R0" alt="cat">'
        f'<a href="a.html">a</a><a href="/private/secret.html">s</a><a href="{off_site}">off</a>'
        '<a href="missing.html">404</a><a href="garbage.html">g</a>'
    )
    (root / "a.html").write_text('<img src="/img/bird.jpg" alt="bird"><a href="b.html">deeper</a>')
    (root / "b.html").write_text('<img src="/img/deep.jpg" alt="too deep">')
    (root / "garbage.html").write_bytes(b"\xff\xfe<<img src=\x00 alt=<<</html")
    (root / "private").mkdir()
    (root / "private" / "secret.html").write_text('<img src="/img/secret.jpg" alt="secret">')


DELAY_S = 0.2


def test_crawl_obeys_robots_depth_and_politeness(tmp_path):
    site, other = tmp_path / "site", tmp_path / "other"
    site.mkdir()
    other.mkdir()
    (other / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    (other / "elsewhere.html").write_text('<img src="/img/off.jpg" alt="off site">')
    # The off-site link points at a second loopback server: a site is (host, port), so 127.0.0.1 on
    # another port is another site, and a regression in same-site filtering shows up in its log
    # instead of sending traffic off the machine.
    with serve(other) as (off_base, off_log), serve(site) as (base, log):
        _site(site, f"{off_base}/elsewhere.html")
        cfg = CrawlConfig(max_depth=1, user_agent="test-agent/1.0", delay_s=DELAY_S, timeout_s=5)
        events = list(iter_live_pages([f"{base}/index.html"], cfg))
    candidates = [e for e in events if isinstance(e, Candidate)]
    skipped = Counter(e.reason for e in events if isinstance(e, Skipped))
    assert sorted(c.text for c in candidates) == ["a dog", "bird", "cat"]  # b.html is depth 2
    assert {c.url for c in candidates} >= {f"{base}/img/dog.jpg", f"{base}/img/cat.jpg"}
    assert skipped == {"robots_disallowed": 1, "http_404": 1}
    assert not [e for e in events if isinstance(e, Rejected)]
    paths = [p for _, p, _ in log]
    assert paths[0] == "/robots.txt"
    assert sorted(paths[1:]) == ["/a.html", "/garbage.html", "/index.html", "/missing.html"]
    assert off_log == []  # not a page, not even its robots.txt
    assert {ua for _, _, ua in log} == {"test-agent/1.0"}
    # The crawler starts requests to one host ≥ DELAY_S apart. A request arrives at the server later than
    # it started, by however long a busy machine takes, so single gaps between arrivals can be shorter
    # than DELAY_S. Arrival k ≥ start k ≥ start 0 + k·DELAY_S, so the first-to-last span is at least
    # (n - 1)·DELAY_S minus the first request's lateness; allowing that lateness a whole DELAY_S keeps
    # the check robust, while without the delay the span is a few milliseconds.
    arrivals = [t for t, _, _ in log]
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 2) * DELAY_S


def test_robots_disallow_all_and_unreachable_seed(tmp_path):
    (tmp_path / "robots.txt").write_text("User-agent: *\nDisallow: /\n")
    (tmp_path / "index.html").write_text('<img src="x.jpg" alt="x">')
    with serve(tmp_path) as (base, log):
        events = list(
            iter_live_pages([f"{base}/index.html", "http://127.0.0.1:9/none.html"], CrawlConfig(delay_s=0))
        )
    assert Counter(e.reason for e in events) == {"robots_disallowed": 2}  # unreachable robots.txt: disallow
    assert [p for _, p, _ in log] == ["/robots.txt"]


@pytest.mark.parametrize(("status", "allowed"), [(404, True), (403, True), (500, False), (503, False)])
def test_robots_txt_error_status(tmp_path, status, allowed):
    # RFC 9309: a robots.txt answered with a 4xx means there are no rules (crawl everything); a 5xx means
    # the server cannot say, so nothing may be crawled. The file on disk (disallowing everything) is never
    # served: the status alone must decide.
    (tmp_path / "robots.txt").write_text("User-agent: *\nDisallow: /\n")
    (tmp_path / "index.html").write_text('<img src="x.jpg" alt="x">')
    with serve(tmp_path, {"/robots.txt": status}) as (base, log):
        events = list(iter_live_pages([f"{base}/index.html"], CrawlConfig(delay_s=0, timeout_s=5)))
    paths = [p for _, p, _ in log]
    if allowed:
        assert events == [Candidate(f"{base}/x.jpg", "x", f"{base}/index.html#img0")]
        assert paths == ["/robots.txt", "/index.html"]
    else:
        assert events == [Skipped("robots_disallowed", f"{base}/index.html")]
        assert paths == ["/robots.txt"]


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        ("Disallow: //[\n", False),  # the standard parser raises on it: unreadable, so nothing is allowed
        ("Crawl-delay: ²\nDisallow: /private/\n", True),  # a bad delay is ignored, the rules still hold
    ],
)
def test_robots_txt_the_parser_cannot_read(tmp_path, rules, allowed):
    # Two seeds, so that one task waits for the other's robots.txt fetch: that wait used to last forever
    # when parsing robots.txt raised (the crawl hung).
    (tmp_path / "robots.txt").write_text(f"User-agent: *\n{rules}")
    (tmp_path / "index.html").write_text('<img src="x.jpg" alt="x">')
    (tmp_path / "two.html").write_text('<img src="y.jpg" alt="y">')
    with serve(tmp_path) as (base, log):
        seeds = [f"{base}/index.html", f"{base}/two.html"]
        events = list(iter_live_pages(seeds, CrawlConfig(delay_s=0, timeout_s=5)))
    if allowed:
        assert sorted(e.text for e in events) == ["x", "y"]
        assert sorted(p for _, p, _ in log) == ["/index.html", "/robots.txt", "/two.html"]
    else:
        assert sorted(events) == [Skipped("robots_disallowed", seed) for seed in seeds]
        assert [p for _, p, _ in log] == ["/robots.txt"]


@pytest.mark.parametrize(("value", "seconds"), [("1", 1.0), ("0.6", 0.6)])
def test_crawl_delay_stretches_the_gap(tmp_path, value, seconds):
    # Our own delay is 0, so only robots.txt's Crawl-delay (of the group for our User-Agent, not the
    # other bot's) can space the two page requests. The robots.txt fetch itself is spaced by our delay
    # only, as the Crawl-delay is not known before it. Arrival gaps can shrink by a busy machine's lateness
    # of the earlier request, hence the margin of half the delay; without the Crawl-delay the gap is a
    # few milliseconds.
    (tmp_path / "robots.txt").write_text(
        f"User-agent: other-bot\nCrawl-delay: 0\n\nUser-agent: *\nCrawl-delay: {value}\n"
    )
    (tmp_path / "index.html").write_text('<a href="p.html">p</a>')
    (tmp_path / "p.html").write_text('<img src="x.jpg" alt="x">')
    with serve(tmp_path) as (base, log):
        events = list(iter_live_pages([f"{base}/index.html"], CrawlConfig(delay_s=0, timeout_s=5)))
    assert events == [Candidate(f"{base}/x.jpg", "x", f"{base}/p.html#img0")]
    assert [p for _, p, _ in log] == ["/robots.txt", "/index.html", "/p.html"]
    assert log[2][0] - log[1][0] >= seconds / 2


def test_max_pages_caps_pages_fetched(tmp_path):
    # Three seeds on two sites, max_pages=4. The first seed is refused by robots.txt, so it fetches no
    # page and frees its place; the index then links six pages, of which only two fit. Site B's slow
    # robots.txt keeps its seed in flight, not yet fetched, while site A's links are queued: the cap must
    # count it all the same (it used to count only queued and fetched pages, and fetched five).
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (a / "index.html").write_text("".join(f'<a href="p{i}.html">{i}</a>' for i in range(6)))
    for i in range(6):
        (a / f"p{i}.html").write_text(f'<img src="/img/{i}.jpg" alt="a{i}">')
    (b / "index.html").write_text('<img src="/img/b.jpg" alt="b">')
    with serve(a) as (base_a, log_a), serve_slowly(b, 0.3) as (base_b, _):
        seeds = [f"{base_a}/private/x.html", f"{base_a}/index.html", f"{base_b}/index.html"]
        events = list(iter_live_pages(seeds, CrawlConfig(max_pages=4, delay_s=0, timeout_s=5)))
    assert sorted(e.text for e in events if isinstance(e, Candidate)) == ["a0", "a1", "b"]
    assert [e for e in events if not isinstance(e, Candidate)] == [
        Skipped("robots_disallowed", f"{base_a}/private/x.html")
    ]
    paths = [p for _, p, _ in log_a]
    assert paths[:2] == ["/robots.txt", "/index.html"] and sorted(paths[2:]) == ["/p0.html", "/p1.html"]


def test_non_html_pages_are_counted(tmp_path):
    # No robots.txt (a 404: everything allowed). A text/plain page that looks like markup, an image and
    # JSON are each one counted not_html skip, never parsed for images.
    (tmp_path / "index.html").write_text(
        '<a href="notes.txt">t</a><a href="photo.jpg">p</a><a href="data.json">d</a>'
    )
    (tmp_path / "notes.txt").write_text('<img src="x.jpg" alt="not markup">')
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    (tmp_path / "data.json").write_text('{"img": "<img src=x.jpg alt=json>"}')
    with serve(tmp_path) as (base, log):
        events = list(iter_live_pages([f"{base}/index.html"], CrawlConfig(delay_s=0, timeout_s=5)))
    assert sorted(events) == [
        Skipped("not_html", f"{base}/{name}") for name in ("data.json", "notes.txt", "photo.jpg")
    ]
    assert sorted(p for _, p, _ in log) == [
        "/data.json",
        "/index.html",
        "/notes.txt",
        "/photo.jpg",
        "/robots.txt",
    ]


@pytest.mark.parametrize("per_host", [1, 2, 3])
def test_per_host_concurrency_limit(tmp_path, per_host):
    # Six pages found on the seed, no delay, a slow server: 32 crawl workers want them at once, and the
    # host's limit alone decides how many requests overlap — exactly per_host, never more.
    (tmp_path / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    (tmp_path / "index.html").write_text("".join(f'<a href="p{i}.html">{i}</a>' for i in range(6)))
    for i in range(6):
        (tmp_path / f"p{i}.html").write_text(f'<img src="/img/{i}.jpg" alt="picture {i}">')
    with serve_slowly(tmp_path, 0.25) as (base, in_flight):
        cfg = CrawlConfig(max_depth=1, delay_s=0, per_host_concurrency=per_host, timeout_s=10)
        events = list(iter_live_pages([f"{base}/index.html"], cfg))
    assert sorted(e.text for e in events if isinstance(e, Candidate)) == [f"picture {i}" for i in range(6)]
    assert in_flight.peak == per_host


@pytest.mark.parametrize(
    "bad",
    [
        {"per_host_concurrency": 0},  # used to hang forever on the host's semaphore
        {"delay_s": -1.0},
        {"delay_s": float("nan")},
        {"max_pages": 0},
        {"max_depth": -1},
        {"total_concurrency": 0},
        {"timeout_s": 0},
    ],
)
def test_bad_crawl_settings_are_refused(bad):
    with pytest.raises(ValueError, match=f"CrawlConfig.{next(iter(bad))} must be"):
        CrawlConfig(**bad)
