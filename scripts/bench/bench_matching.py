"""Whole-word query matching: automaton build time, texts/s per core, scaling from 1 to 2 processes.

    python scripts/bench/bench_matching.py            # 500,000 queries × 1,000,000 captions
    python scripts/bench/bench_matching.py --quick    # 50,000 × 100,000

Synthetic data: a Zipf-distributed vocabulary of pronounceable words; queries are single words and
bigrams, captions 6–14 words (≈ 60 characters, caption-like) with some punctuation and capitals.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time

from data_pipelines.candidates.matching import QueryMatcher

_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
_MATCHER: QueryMatcher | None = None


def make_data(n_queries: int, n_texts: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rnd = random.Random(seed)
    vocab = list(
        dict.fromkeys("".join(rnd.choices(_SYLLABLES, k=rnd.randint(1, 4))) for _ in range(n_queries))
    )
    cum, total = [], 0.0
    for r in range(len(vocab)):  # Zipf: a few head words, a long tail
        total += 1 / (r + 1)
        cum.append(total)
    singles = vocab[: int(0.7 * n_queries)]
    bigrams = {
        f"{a} {b}"
        for a, b in zip(rnd.choices(vocab, cum_weights=cum, k=n_queries), rnd.choices(vocab, k=n_queries))
    }
    queries = singles + list(bigrams)[: n_queries - len(singles)]
    texts = []
    for _ in range(n_texts):
        words = rnd.choices(vocab, cum_weights=cum, k=rnd.randint(6, 14))
        words[0] = words[0].capitalize()
        texts.append(" ".join(words) + rnd.choice([".", "!", "", " - photo", ", 2019"]))
    return queries, texts


def _count_matches(texts: list[str]) -> int:
    return sum(len(_MATCHER.match_ids(t)) for t in texts)


def run(n_queries: int, n_texts: int) -> list[tuple[str, str]]:
    global _MATCHER
    queries, texts = make_data(n_queries, n_texts)
    t0 = time.perf_counter()
    _MATCHER = QueryMatcher(queries)
    build_s = time.perf_counter() - t0
    rows = [
        ("queries", f"{len(_MATCHER):,}"),
        ("texts", f"{len(texts):,}"),
        ("automaton build", f"{build_s:.2f} s"),
    ]
    rows.append(("mean text length", f"{sum(map(len, texts)) / len(texts):.0f} chars"))
    t0 = time.perf_counter()
    matches = _count_matches(texts)
    one = len(texts) / (time.perf_counter() - t0)
    rows += [("matches per text", f"{matches / len(texts):.2f}"), ("1 process", f"{one:,.0f} texts/s")]
    ctx = mp.get_context("fork")  # the automaton is shared copy-on-write, as in the extract jobs' pool
    chunks = [texts[i : i + 20_000] for i in range(0, len(texts), 20_000)]
    with ctx.Pool(2) as pool:
        pool.map(_count_matches, [texts[:100]] * 2)  # start-up outside the timing
        t0 = time.perf_counter()
        assert sum(pool.map(_count_matches, chunks)) == matches
        two = len(texts) / (time.perf_counter() - t0)
    rows += [("2 processes", f"{two:,.0f} texts/s"), ("scaling 1 → 2", f"{two / one:.2f}×")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=500_000)
    p.add_argument("--texts", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="50,000 queries × 100,000 texts")
    args = p.parse_args()
    n_q, n_t = (50_000, 100_000) if args.quick else (args.queries, args.texts)
    print(f"matching benchmark: {n_q:,} queries × {n_t:,} texts (cores: {mp.cpu_count()})")
    rows = run(n_q, n_t)
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    main()
