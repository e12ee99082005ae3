"""Query balancing: at most ``t`` pairs kept per query, deterministic under a seed.

The rule (README.md gives it in full):

1. Duplicates: pairs with the same URL collapse to one — the one with the smallest
   ``(h(seed, url, text), text, source)``.
2. Every (pair, query) match gets a priority key ``(h(seed, query, url), url)``; ``h`` is a keyed 64-bit
   BLAKE2b hash. After step 1 URLs are unique, so keys never tie.
3. Query q *selects* a pair when the pair's key for q is among the ``t`` smallest keys of all pairs
   matching q (so every pair of a query with ≤ t matches is selected).
4. A pair is kept when at least one of its queries selects it; it is kept for (counts against) the
   selecting query with the fewest matches, ties broken by the query string.

Each step depends only on the set of pairs, never on their order or on how they are partitioned; the
multi-pass version (``count_matches`` per partition → ``merge_counts`` → ``select`` per partition) gives
exactly what ``balance`` gives in one piece, provided each URL's copies share a partition (``url_bucket``).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

DEFAULT_MAX_PER_QUERY = 20_000


class MatchedPair(NamedTuple):
    url: str
    text: str
    source: str
    matched: tuple[str, ...]  # the queries the text matches, sorted


class KeptPair(NamedTuple):
    url: str
    text: str
    query: str  # the query the pair is kept for
    matched_queries: tuple[str, ...]
    source: str


Key = tuple[int, str]  # (priority, url)


def _hash64(seed: int, *parts: str) -> int:
    h = hashlib.blake2b(
        "\0".join(parts).encode("utf-8", "surrogatepass"),
        digest_size=8,
        key=seed.to_bytes(8, "little", signed=True),
    )
    return int.from_bytes(h.digest(), "little")


def priority(seed: int, query: str, url: str) -> Key:
    """The sort key of a (pair, query) match: smaller keys are kept first."""
    return _hash64(seed, query, url), url


def url_bucket(url: str, n_buckets: int) -> int:
    """Partition of a URL (independent of the seed): all copies of a URL land in one partition."""
    return (
        int.from_bytes(
            hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
        )
        % n_buckets
    )


def deduplicate(pairs: Iterable[MatchedPair], seed: int) -> tuple[list[MatchedPair], Counter[str]]:
    """One pair per URL, sorted by URL, and the drops: ``duplicate_pair`` (same URL and text as a kept
    or dropped row) and ``duplicate_url`` (same URL, another text)."""
    groups: dict[str, list[MatchedPair]] = defaultdict(list)
    for pair in pairs:
        groups[pair.url].append(pair)
    kept: list[MatchedPair] = []
    dropped: Counter[str] = Counter()
    for url in sorted(groups):
        group = groups[url]
        kept.append(min(group, key=lambda p: (_hash64(seed, p.url, p.text), p.text, p.source)))
        texts = len({p.text for p in group})
        dropped["duplicate_pair"] += len(group) - texts
        dropped["duplicate_url"] += texts - 1
    return kept, +dropped


@dataclass
class QueryCounts:
    """Per-query match counts and the ``t`` smallest keys of one partition (or of several, merged)."""

    matched: Counter[str] = field(default_factory=Counter)
    smallest: dict[str, list[Key]] = field(default_factory=dict)


def count_matches(pairs: Iterable[MatchedPair], t: int, seed: int) -> QueryCounts:
    """Counting pass over one partition of deduplicated pairs."""
    keys: dict[str, list[Key]] = defaultdict(list)
    for pair in pairs:
        for query in pair.matched:
            keys[query].append(priority(seed, query, pair.url))
    counts = QueryCounts()
    for query, ks in keys.items():
        counts.matched[query] = len(ks)
        counts.smallest[query] = heapq.nsmallest(t, ks)
    return counts


@dataclass
class Thresholds:
    t: int
    seed: int
    matched: Counter[str]  # global number of (deduplicated) pairs matching each query
    cutoff: dict[str, Key]  # the t-th smallest key, only for queries with more than t matches

    def selects(self, query: str, url: str) -> bool:
        cut = self.cutoff.get(query)
        return cut is None or priority(self.seed, query, url) <= cut


def merge_counts(parts: Iterable[QueryCounts], t: int, seed: int) -> Thresholds:
    """The global merge: summed counts and, for every query over ``t``, its cut-off key."""
    matched: Counter[str] = Counter()
    smallest: dict[str, list[Key]] = defaultdict(list)
    for part in parts:
        matched.update(part.matched)
        for query, keys in part.smallest.items():
            smallest[query].extend(keys)
    cutoff = {q: heapq.nsmallest(t, smallest[q])[-1] for q, n in matched.items() if n > t}
    return Thresholds(t=t, seed=seed, matched=matched, cutoff=cutoff)


def select(pairs: Iterable[MatchedPair], thresholds: Thresholds) -> list[KeptPair]:
    """Selection pass over one partition of deduplicated pairs; the kept pairs, in input order."""
    kept = []
    for pair in pairs:
        selecting = [q for q in pair.matched if thresholds.selects(q, pair.url)]
        if selecting:
            query = min(selecting, key=lambda q: (thresholds.matched[q], q))
            kept.append(KeptPair(pair.url, pair.text, query, pair.matched, pair.source))
    return kept


def balance(pairs: Sequence[MatchedPair], t: int = DEFAULT_MAX_PER_QUERY, seed: int = 0) -> list[KeptPair]:
    """The whole rule in memory: the kept pairs, sorted by URL."""
    unique, _ = deduplicate(pairs, seed)
    thresholds = merge_counts([count_matches(unique, t, seed)], t, seed)
    return select(unique, thresholds)
