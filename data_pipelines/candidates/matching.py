"""Whole-word matching of texts against a query list (hash lookups of word n-grams).

Both queries and texts go through the same normalisation, which leaves words separated by single spaces; a
query of n words then matches a text exactly when it equals one of the text's n-word windows (the same as
" query " being a substring of " text "). Looking each window up in a dict of the queries touches a few
cache lines per word, where an Aho–Corasick automaton over 500,000 queries touches one scattered trie node
per character; on caption-like texts the lookups are about twice as fast (scripts/bench/bench_matching.py).
Windows of one and two words are looked up in bulk with C-level ``map``; longer queries are followed only
from the two-word windows that begin one of them. The rules (casing, Unicode, punctuation, scripts written
without spaces) are in README.md.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, count, islice
from pathlib import Path

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
for _cp in range(128):  # pre-filled so ASCII text takes CPython's fast translate path at once
    _TABLE[_cp]
# The same mapping for ASCII bytes, with lower-casing folded in: one bytes.translate does the whole job.
_ASCII_TABLE = bytes(ord(_TABLE[ord(chr(b).lower())]) for b in range(128)) + bytes(range(128, 256))


def normalize_text(text: str) -> str:
    """NFKC, case-folded, punctuation → spaces, words joined by single spaces, no outer spaces."""
    if text.isascii():
        text = text.lower().translate(_TABLE)
    else:
        text = unicodedata.normalize("NFKC", text).casefold()
        text = unicodedata.normalize("NFKC", text).translate(_TABLE)
    return " ".join(text.split())


def _words(text: str) -> list[bytes]:
    """The words of ``normalize_text(text)``, UTF-8 encoded.

    Bytes rather than str because ASCII text — nearly all captions — is then normalised by a single
    ``bytes.translate`` over a 256-entry table. After the translation every whitespace character has
    become a space (whitespace lies within categories Z and C), and UTF-8 never puts an ASCII byte inside
    a multi-byte character, so ``bytes.split`` cuts exactly where ``str.split`` would.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_TABLE).split()
    text = unicodedata.normalize("NFKC", text).casefold()
    return unicodedata.normalize("NFKC", text).translate(_TABLE).encode("utf-8").split()


class QueryMatcher:
    """A dict from normalised query (UTF-8, words joined by single spaces) to query id.

    ``queries[i]`` is the query's spelling as first given; queries whose normalised forms collide are
    merged into the first one, and queries that normalise to nothing are dropped (both counted in
    ``skipped``). The matcher holds only dicts, sets and ints, so it pickles, and forked workers share it.
    """

    def __init__(self, queries: Iterable[str]):
        self.skipped: Counter[str] = Counter()
        self.queries: list[str] = []
        ids: dict[bytes, int] = {}
        for query in queries:
            key = normalize_text(query).encode("utf-8")
            if not key:
                self.skipped["empty_after_normalisation"] += 1
                continue
            if key in ids:
                self.skipped["duplicate_after_normalisation"] += 1
                continue
            ids[key] = len(self.queries)
            self.queries.append(query.strip())
        if not self.queries:
            raise ValueError("the query list is empty (no query survives normalisation)")
        # Every proper prefix of two or more words of a longer query: the windows worth extending.
        prefixes: set[bytes] = set()
        max_words = 1
        for key in ids:
            words = key.split(b" ")
            max_words = max(max_words, len(words))
            prefixes.update(b" ".join(words[:n]) for n in range(2, len(words)))
        self._ids = ids
        self._prefixes = frozenset(prefixes)
        self._max_words = max_words

    def __len__(self) -> int:
        return len(self.queries)

    def match_ids(self, text: str) -> set[int]:
        """Ids (indices into ``queries``) of the queries occurring in ``text`` as whole words."""
        words = _words(text)
        get = self._ids.get
        found: set[int | None] = set(map(get, words))
        if self._max_words > 1:
            pairs = list(map(b" ".join, zip(words, islice(words, 1, None))))
            found.update(map(get, pairs))
            if self._max_words > 2 and not self._prefixes.isdisjoint(pairs):
                found.update(self._long_matches(words, pairs))
        found.discard(None)
        return found  # type: ignore[return-value]  # None was the only non-id

    def _long_matches(self, words: list[bytes], pairs: list[bytes]) -> Iterator[int]:
        """Ids of the matched queries of three or more words: each two-word window (``pairs[i]`` is
        words i, i + 1) that begins one is extended word by word, as long as it stays a prefix."""
        get, prefixes = self._ids.get, self._prefixes
        for i in compress(count(), map(prefixes.__contains__, pairs)):
            window = pairs[i]
            for word in islice(words, i + 2, i + self._max_words):
                window += b" " + word
                qid = get(window)
                if qid is not None:
                    yield qid
                if window not in prefixes:
                    break

    def match(self, text: str) -> list[str]:
        """The matched queries, sorted (their spellings as given)."""
        return sorted(self.queries[qid] for qid in self.match_ids(text))


def read_query_files(paths: Sequence[str | Path]) -> tuple[list[str], Counter[str]]:
    """Queries from plain files (one per line, UTF-8, blank lines ignored), in file then line order, and
    the lines dropped by reason: ``undecodable`` for a line that is not valid UTF-8 (it holds U+FFFD after
    decoding), which could never match what its author meant.

    Raises before any work: FileNotFoundError for a missing file, ValueError for an empty list.
    """
    if not paths:
        raise ValueError("no query file given")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"query file not found: {path}")
    queries: list[str] = []
    dropped: Counter[str] = Counter()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not (query := line.strip()):
                    continue
                if "\ufffd" in query:
                    dropped["undecodable"] += 1
                else:
                    queries.append(query)
    if not queries:
        raise ValueError(f"the query list is empty: {', '.join(map(str, paths))}")
    return queries, dropped


def load_queries(paths: Sequence[str | Path]) -> list[str]:
    """The queries of ``read_query_files``, without the drop counts."""
    return read_query_files(paths)[0]
