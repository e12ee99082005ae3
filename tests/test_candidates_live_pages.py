"""The live-page crawler against real pages served on 127.0.0.1: robots.txt, depth, same-site links,
per-host politeness delay and concurrency, the User-Agent, broken pages counted, bad settings refused."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from candidates_support import serve, serve_slowly

from data_pipelines.candidates.records import Candidate, Rejected, Skipped
from data_pipelines.candidates.sources.live_pages import CrawlConfig, iter_live_pages


def _site(root, off_site: str = "http://203.0.113.9/elsewhere.html"):
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


def test_crawl_obeys_robots_depth_and_politeness(tmp_path):
    _site(tmp_path)
    with serve(tmp_path) as (base, log):
        cfg = CrawlConfig(max_depth=1, user_agent="test-agent/1.0", delay_s=0.1, timeout_s=5)
        events = list(iter_live_pages([f"{base}/index.html"], cfg))
    candidates = [e for e in events if isinstance(e, Candidate)]
    skipped = Counter(e.reason for e in events if isinstance(e, Skipped))
    assert sorted(c.text for c in candidates) == ["a dog", "bird", "cat"]  # b.html is depth 2
    assert {c.url for c in candidates} >= {f"{base}/img/dog.jpg", f"{base}/img/cat.jpg"}
    assert skipped == {"robots_disallowed": 1, "http_404": 1}
    assert not [e for e in events if isinstance(e, Rejected)]
    paths = [p for _, p, _ in log]
    assert paths[0] == "/robots.txt" and "/private/secret.html" not in paths and "/b.html" not in paths
    assert {ua for _, _, ua in log} == {"test-agent/1.0"}
    starts = [t for t, _, _ in log]
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(starts))  # one host: requests ≥ delay apart


def test_robots_disallow_all_and_unreachable_seed(tmp_path):
    (tmp_path / "robots.txt").write_text("User-agent: *\nDisallow: /\n")
    (tmp_path / "index.html").write_text('<img src="x.jpg" alt="x">')
    with serve(tmp_path) as (base, log):
        events = list(
            iter_live_pages([f"{base}/index.html", "http://127.0.0.1:9/none.html"], CrawlConfig(delay_s=0))
        )
    assert Counter(e.reason for e in events) == {"robots_disallowed": 2}  # unreachable robots.txt: disallow
    assert [p for _, p, _ in log] == ["/robots.txt"]


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
