"""Derive a query list from a text corpus the way the CLIP paper describes its 500,000 queries:
words occurring at least ``min_word_count`` times, bigrams with high pointwise mutual information,
titles (e.g. Wikipedia article titles) occurring in the corpus often enough, plus user-supplied lists
(e.g. WordNet synset names exported to a file), which are always kept.

Words are counted after ``matching.normalize_text``, so a query derived here matches what it counted.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .matching import QueryMatcher, normalize_text


@dataclass(frozen=True)
class BuilderConfig:
    min_word_count: int = 100
    min_bigram_count: int = 30
    min_pmi: float = 3.0  # natural log: the pair occurs e^3 ≈ 20× more often than by chance
    min_title_count: int = 1  # occurrences of a title (as whole words) in the corpus
    max_queries: int | None = None  # most frequent first within each source


@dataclass
class CorpusCounts:
    words: Counter[str] = field(default_factory=Counter)
    bigrams: Counter[tuple[str, str]] = field(default_factory=Counter)
    texts: int = 0


def count_corpus(texts: Iterable[str]) -> CorpusCounts:
    counts = CorpusCounts()
    for text in texts:
        words = normalize_text(text).split()
        counts.words.update(words)
        counts.bigrams.update(itertools.pairwise(words))
        counts.texts += 1
    return counts


def frequent_words(counts: CorpusCounts, min_count: int) -> list[str]:
    return [w for w, n in counts.words.most_common() if n >= min_count]


def pmi_bigrams(counts: CorpusCounts, min_count: int, min_pmi: float) -> list[str]:
    """Bigrams ``"a b"`` with count ≥ ``min_count`` and PMI = ln(p(a b) / (p(a) p(b))) ≥ ``min_pmi``,
    by descending PMI."""
    n_words = sum(counts.words.values()) or 1
    n_bigrams = sum(counts.bigrams.values()) or 1
    scored = []
    for (a, b), n in counts.bigrams.items():
        if n < min_count:
            continue
        pmi = math.log((n / n_bigrams) / ((counts.words[a] / n_words) * (counts.words[b] / n_words)))
        if pmi >= min_pmi:
            scored.append((-pmi, f"{a} {b}"))
    return [bigram for _, bigram in sorted(scored)]


def frequent_titles(titles: Iterable[str], texts: Iterable[str], min_count: int) -> list[str]:
    """Titles occurring (as whole words, the matching rule) in at least ``min_count`` corpus texts."""
    titles = list(titles)
    if min_count <= 0 or not titles:
        return titles
    matcher = QueryMatcher(titles)
    hits: Counter[int] = Counter()
    for text in texts:
        hits.update(matcher.match_ids(text))
    return [
        matcher.queries[i] for i, n in sorted(hits.items(), key=lambda x: (-x[1], x[0])) if n >= min_count
    ]


def build_queries(
    corpus: Iterable[str] | None,
    cfg: BuilderConfig,
    titles: Iterable[str] = (),
    user_lists: dict[str, list[str]] | None = None,
) -> tuple[list[str], dict[str, int]]:
    """The query list (unique after normalisation, user lists first) and how many each source added."""
    texts = list(corpus or [])
    counts = count_corpus(texts)
    sources: list[tuple[str, list[str]]] = [(name, qs) for name, qs in (user_lists or {}).items()]
    sources += [
        ("words", frequent_words(counts, cfg.min_word_count)),
        ("bigrams", pmi_bigrams(counts, cfg.min_bigram_count, cfg.min_pmi)),
        ("titles", frequent_titles(titles, texts, cfg.min_title_count)),
    ]
    seen: set[str] = set()
    out: list[str] = []
    added: dict[str, int] = {}
    for name, queries in sources:
        added[name] = 0
        for q in queries:
            norm = normalize_text(q)
            if not norm or norm in seen or "\n" in q:
                continue
            if cfg.max_queries is not None and len(out) >= cfg.max_queries:
                break
            seen.add(norm)
            out.append(" ".join(q.split()))
            added[name] += 1
    return out, added
