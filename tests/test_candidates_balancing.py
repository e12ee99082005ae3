"""Balancing properties (hypothesis): the limit holds, the tail is kept whole, and the selection depends on
the seed only — not on input order, nor on how the input is partitioned across the passes."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.candidates.balancing import (
    MatchedPair,
    balance,
    count_matches,
    deduplicate,
    merge_counts,
    select,
    url_bucket,
)

QUERIES = [f"q{i}" for i in range(6)]

pair_sets = st.lists(
    st.tuples(
        st.integers(0, 60), st.integers(0, 3), st.sets(st.sampled_from(QUERIES), min_size=1, max_size=3)
    ),
    max_size=120,
).map(
    lambda rows: [
        MatchedPair(f"http://x.example.com/{u}.jpg", f"text {v}", f"row{i}", tuple(sorted(qs)))
        for i, (u, v, qs) in enumerate(rows)
    ]
)
SETTINGS = settings(max_examples=60, deadline=None)


def _unique_urls(pairs):
    seen, out = set(), []
    for p in pairs:
        if p.url not in seen:
            seen.add(p.url)
            out.append(p)
    return out


@SETTINGS
@given(pair_sets, st.integers(1, 8), st.integers(0, 2**31))
def test_no_query_exceeds_t_and_the_tail_is_kept(pairs, t, seed):
    kept = balance(pairs, t, seed)
    per_query = Counter(k.query for k in kept)
    assert all(n <= t for n in per_query.values())
    unique, _ = deduplicate(pairs, seed)
    matched = Counter(q for p in unique for q in p.matched)
    kept_urls = {k.url for k in kept}
    for q, n in matched.items():
        if n <= t:  # every pair of a query with at most t matches survives
            assert all(p.url in kept_urls for p in unique if q in p.matched)
    for k in kept:  # kept for one of its own queries, as the text really matched it
        assert k.query in k.matched_queries


@SETTINGS
@given(pair_sets, st.integers(1, 8), st.integers(0, 2**31), st.randoms(use_true_random=False))
def test_same_seed_same_selection_whatever_the_order(pairs, t, seed, rnd):
    shuffled = list(pairs)
    rnd.shuffle(shuffled)
    assert balance(pairs, t, seed) == balance(shuffled, t, seed)


@SETTINGS
@given(
    pair_sets, st.integers(1, 8), st.integers(0, 2**31), st.integers(1, 5), st.randoms(use_true_random=False)
)
def test_multi_pass_equals_in_memory_however_partitioned(pairs, t, seed, n_parts, rnd):
    unique, _ = deduplicate(pairs, seed)
    parts: list[list[MatchedPair]] = [[] for _ in range(n_parts)]
    for p in unique:  # an arbitrary partition of the deduplicated pairs
        parts[rnd.randrange(n_parts)].append(p)
    thresholds = merge_counts([count_matches(part, t, seed) for part in parts], t, seed)
    kept = sorted(k for part in parts for k in select(part, thresholds))
    assert kept == balance(pairs, t, seed)


@SETTINGS
@given(pair_sets, st.integers(1, 8), st.integers(0, 2**31), st.integers(1, 4))
def test_url_buckets_make_deduplication_global(pairs, t, seed, n_buckets):
    buckets: list[list[MatchedPair]] = [[] for _ in range(n_buckets)]
    for p in pairs:  # duplicates included: bucketing by URL keeps every URL's copies together
        buckets[url_bucket(p.url, n_buckets)].append(p)
    deduped = [deduplicate(b, seed)[0] for b in buckets]
    thresholds = merge_counts([count_matches(b, t, seed) for b in deduped], t, seed)
    assert sorted(k for b in deduped for k in select(b, thresholds)) == balance(pairs, t, seed)


def test_head_is_cut_to_t_and_seed_changes_the_sample():
    rnd = random.Random(0)
    pairs = [MatchedPair(f"http://x.example.com/{i}", "a dog", str(i), ("dog",)) for i in range(500)]
    pairs += [
        MatchedPair(f"http://y.example.com/{i}", "rare bird", str(i), ("bird", "dog")) for i in range(5)
    ]
    rnd.shuffle(pairs)
    kept = balance(pairs, t=50, seed=1)
    per_query = Counter(k.query for k in kept)
    assert per_query["bird"] == 5  # the rare query keeps all its pairs, and they count against it
    assert 45 <= per_query["dog"] <= 50  # dog selected 50; those that are bird pairs count against bird
    assert {k.url for k in kept} != {k.url for k in balance(pairs, t=50, seed=2)}


def test_duplicates_counted_by_kind():
    pairs = [
        MatchedPair("http://x.example.com/1", "a", "r0", ("a",)),
        MatchedPair("http://x.example.com/1", "a", "r1", ("a",)),
        MatchedPair("http://x.example.com/1", "a b", "r2", ("a",)),
        MatchedPair("http://x.example.com/2", "a", "r3", ("a",)),
    ]
    unique, dropped = deduplicate(pairs, 0)
    assert [p.url for p in unique] == ["http://x.example.com/1", "http://x.example.com/2"]
    assert dropped == {"duplicate_pair": 1, "duplicate_url": 1}
