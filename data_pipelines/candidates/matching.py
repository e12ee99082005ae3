"""Whole-word matching of texts against a query list (Aho–Corasick over normalised, space-padded text).

Both queries and texts go through ``normalize_text``, which leaves words separated by single spaces; a
query then matches a text exactly when " query " is a substring of " text ". The automaton does all the
work and no boundary check is left for Python: that keeps the hot loop at one C call per text.
The rules (casing, Unicode, punctuation, scripts written without spaces) are in README.md.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from operator import itemgetter
from pathlib import Path

import ahocorasick

# Scripts written without spaces between words. Each of their characters becomes a word of its own, so
# a query in these scripts matches wherever its characters occur contiguously (no segmenter guesses).
_NO_SPACE_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3134F),  # CJK extensions B–G
)
_WORD_SEPARATING_FORMAT_CHARS = {0x200B}  # ZERO WIDTH SPACE separates words in Thai and Khmer text


def _is_no_space_script(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _NO_SPACE_RANGES)


class _CharTable(dict):
    """``str.translate`` table filled lazily: punctuation/symbols/separators/controls → space, format
    characters (soft hyphen, ZWJ, ZWNJ) → deleted, characters of space-less scripts → " c "."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat == "Cf" and cp not in _WORD_SEPARATING_FORMAT_CHARS:
            out = ""
        elif cat[0] in "PSZC":
            out = " "
        elif _is_no_space_script(cp):
            out = f" {ch} "
        else:
            out = ch
        self[cp] = out
        return out


_TABLE = _CharTable()
_second = itemgetter(1)  # (end index, query id) → query id, without a Python frame per match
for _cp in range(128):  # pre-filled so ASCII text takes CPython's fast translate path at once
    _TABLE[_cp]


def normalize_text(text: str) -> str:
    """NFKC, case-folded, punctuation → spaces, words joined by single spaces, no outer spaces."""
    if text.isascii():
        text = text.lower().translate(_TABLE)
    else:
        text = unicodedata.normalize("NFKC", text).casefold()
        text = unicodedata.normalize("NFKC", text).translate(_TABLE)
    return " ".join(text.split())


class QueryMatcher:
    """An Aho–Corasick automaton over " normalised query " keys.

    ``queries[i]`` is the query's spelling as first given; queries whose normalised forms collide are
    merged into the first one, and queries that normalise to nothing are dropped (both counted in
    ``skipped``).
    """

    def __init__(self, queries: Iterable[str]):
        self.skipped: Counter[str] = Counter()
        self.queries: list[str] = []
        automaton = ahocorasick.Automaton()
        for query in queries:
            norm = normalize_text(query)
            if not norm:
                self.skipped["empty_after_normalisation"] += 1
                continue
            key = f" {norm} "
            if key in automaton:
                self.skipped["duplicate_after_normalisation"] += 1
                continue
            automaton.add_word(key, len(self.queries))
            self.queries.append(query.strip())
        if not self.queries:
            raise ValueError("the query list is empty (no query survives normalisation)")
        automaton.make_automaton()
        self._automaton = automaton

    def __len__(self) -> int:
        return len(self.queries)

    def match_ids(self, text: str) -> set[int]:
        """Ids (indices into ``queries``) of the queries occurring in ``text`` as whole words."""
        return set(map(_second, self._automaton.iter(f" {normalize_text(text)} ")))

    def match(self, text: str) -> list[str]:
        """The matched queries, sorted (their spellings as given)."""
        return sorted(self.queries[qid] for qid in self.match_ids(text))


def load_queries(paths: Sequence[str | Path]) -> list[str]:
    """Queries from plain files (one per line, UTF-8, blank lines ignored), in file then line order.

    Raises before any work: FileNotFoundError for a missing file, ValueError for an empty list.
    """
    if not paths:
        raise ValueError("no query file given")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"query file not found: {path}")
    queries: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            queries.extend(q for line in f if (q := line.strip()) and "\ufffd" not in q)
    if not queries:
        raise ValueError(f"the query list is empty: {', '.join(map(str, paths))}")
    return queries
