"""Build a query list from a text corpus (frequent words, high-PMI bigrams, titles) plus user lists.

    python -m data_pipelines.build_queries --corpus captions.txt --titles enwiki_titles.txt \\
        --lists wordnet_synsets.txt --min-word-count 100 --out queries.txt

Writes queries.txt (one query per line) and queries.txt.counts.json (queries added per source).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .candidates.query_builder import BuilderConfig, build_queries


def _lines(path: Path, desc: str | None = None):
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from (
            line.strip() for line in (tqdm(f, desc=desc, unit=" lines") if desc else f) if line.strip()
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.build_queries",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--corpus", nargs="*", default=[], help="text files, one text per line")
    p.add_argument("--titles", nargs="*", default=[], help="title files, one title per line")
    p.add_argument("--lists", nargs="*", default=[], help="user query lists, kept as they are (one per line)")
    p.add_argument(
        "--min-word-count",
        type=int,
        default=BuilderConfig.min_word_count,
        help=f"corpus occurrences a word needs to become a query (default {BuilderConfig.min_word_count})",
    )
    p.add_argument(
        "--min-bigram-count",
        type=int,
        default=BuilderConfig.min_bigram_count,
        help=f"corpus occurrences a two-word phrase needs (default {BuilderConfig.min_bigram_count})",
    )
    p.add_argument(
        "--min-pmi",
        type=float,
        default=BuilderConfig.min_pmi,
        help=f"natural-log PMI a two-word phrase needs (default {BuilderConfig.min_pmi:g}: its words "
        f"together about {math.exp(BuilderConfig.min_pmi):.0f} times more often than by chance)",
    )
    p.add_argument(
        "--min-title-count",
        type=int,
        default=BuilderConfig.min_title_count,
        help="corpus texts a title must occur in (0: keep every title; default "
        f"{BuilderConfig.min_title_count})",
    )
    p.add_argument(
        "--max-queries",
        type=int,
        default=None,
        help="at most this many queries in all: the lists' first, then words, phrases and titles, each "
        "most frequent first (default: no limit)",
    )
    p.add_argument("--out", required=True, help="output query list")
    args = p.parse_args(argv)

    start = time.perf_counter()
    paths = [*args.corpus, *args.titles, *args.lists]
    missing = [f for f in paths if not Path(f).is_file()]
    if not paths:
        print(
            "error: no input given: pass at least one of --corpus (texts to mine words and phrases from), "
            "--titles (title files) or --lists (query lists kept as they are), each a file with one entry "
            "per line",
            file=sys.stderr,
        )
        return 2
    if missing:
        print(f"error: file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(
        f"build_queries: {len(args.corpus)} corpus, {len(args.titles)} title, {len(args.lists)} list file(s) "
        f"→ {args.out}",
        file=sys.stderr,
    )
    corpus = [t for f in args.corpus for t in _lines(Path(f), desc=f"reading {Path(f).name}")]
    titles = [t for f in args.titles for t in _lines(Path(f))]
    user = {f"list:{Path(f).name}": list(_lines(Path(f))) for f in args.lists}
    cfg = BuilderConfig(
        args.min_word_count, args.min_bigram_count, args.min_pmi, args.min_title_count, args.max_queries
    )
    queries, added = build_queries(corpus, cfg, titles, user)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{q}\n" for q in queries), encoding="utf-8")
    Path(f"{out}.counts.json").write_text(json.dumps({"total": len(queries), "per_source": added}, indent=1))
    parts = ", ".join(f"{n:,} {name}" for name, n in added.items())
    print(
        f"wrote {len(queries):,} queries ({parts}) from {len(corpus):,} texts "
        f"in {time.perf_counter() - start:.1f} s → {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
