"""Learn a CLIP-style byte-level BPE vocabulary from a caption corpus.

For training from scratch on other corpora or languages. Text goes through the tokenizer's own cleaning and
pre-tokenizer, so the learned merges apply exactly as they were learned. The output has the format of the
standard `bpe_simple_vocab_16e6.txt.gz` (gzip text, a header line, one merge "a b" per line, best first),
and `clip_train.tokenizer.Tokenizer(bpe_path=...)` loads it; its vocabulary is the 256 byte symbols, their
"</w>" (word-end) forms, one token per merge and the two special tokens.

    python -m clip_train.bpe_trainer captions.txt more_captions.txt.gz --vocab-size 32000 --output bpe.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import itertools
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from clip_train.tokenizer import (
    EOT_TEXT,
    NUM_BASE_TOKENS,
    SOT_TEXT,
    WORD_END,
    byte_encode,
    bytes_to_unicode,
    clean_text,
    pretokenize,
)

HEADER = "#version: 0.2 clip_train.bpe_trainer"

Pair = tuple[str, str]


def count_words(lines: Iterable[str], *, show_progress: bool = False) -> Counter[str]:
    """How often each pre-tokenized word occurs in the cleaned lines (special-token literals excluded)."""
    counts: Counter[str] = Counter()
    for i, line in enumerate(tqdm(lines, desc="counting words", unit=" lines", disable=not show_progress)):
        if not isinstance(line, str):
            raise TypeError(f"line {i} is {type(line).__name__}, expected str")
        counts.update(pretokenize(clean_text(line)))
    counts.pop(SOT_TEXT, None)
    counts.pop(EOT_TEXT, None)
    return counts


def learn_merges(
    word_counts: dict[str, int], num_merges: int, *, min_frequency: int = 2, show_progress: bool = False
) -> list[Pair]:
    """The `num_merges` most frequent symbol pairs, merged greedily; fewer if no pair reaches `min_frequency`.

    Words start as their byte symbols with "</w>" on the last one. Each step merges the most frequent adjacent
    pair (ties: the smallest pair in string order, so the result is deterministic) in every word. Only the
    words that hold the merged pair are rewritten, and pair counts are updated incrementally; a heap with
    lazy deletion finds the best pair. A pair whose merged string already is a token (e.g. "a"+"bc" after
    "ab"+"c") is skipped: merging it would add a second id for the same string that is never emitted.
    """
    words: list[list[str]] = []
    freqs: list[int] = []
    for word, count in word_counts.items():
        symbols = list(byte_encode(word))
        symbols[-1] += WORD_END
        words.append(symbols)
        freqs.append(count)

    pair_counts: defaultdict[Pair, int] = defaultdict(int)
    pair_words: defaultdict[Pair, set[int]] = defaultdict(set)  # may also name words that lost the pair
    for wi, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += freq
            pair_words[pair].add(wi)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    tokens = set(bytes_to_unicode().values())
    tokens |= {s + WORD_END for s in tokens}
    merges: list[Pair] = []
    progress = tqdm(total=num_merges, desc="learning merges", unit=" merges", disable=not show_progress)
    while heap and len(merges) < num_merges:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:
            # Stale entry: counts of existing pairs only ever go down, so re-queue with the current value.
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break
        new_token = pair[0] + pair[1]
        if new_token in tokens:
            continue  # never merged; its count can only decrease, so it is not queued again
        tokens.add(new_token)
        merges.append(pair)
        progress.update(1)

        # Pairs that contain the new token are new; all others only lose counts (picked up lazily above).
        new_pairs: set[Pair] = set()
        for wi in pair_words.pop(pair):
            old = words[wi]
            new = _merge_pair(old, pair, new_token)
            if len(new) == len(old):
                continue
            freq = freqs[wi]
            for p in itertools.pairwise(old):
                pair_counts[p] -= freq
            for p in itertools.pairwise(new):
                pair_counts[p] += freq
                pair_words[p].add(wi)
                if new_token in p:
                    new_pairs.add(p)
            words[wi] = new
        del pair_counts[pair]
        for p in new_pairs:
            heapq.heappush(heap, (-pair_counts[p], p))
    progress.close()
    return merges


def _merge_pair(symbols: list[str], pair: Pair, merged: str) -> list[str]:
    """`symbols` with each occurrence of `pair` replaced by `merged`, left to right, as the tokenizer does."""
    first, second = pair
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(
    lines: Iterable[str], vocab_size: int, *, min_frequency: int = 2, show_progress: bool = False
) -> list[Pair]:
    """Learn BPE merges from captions (one text per item) for a vocabulary of at most `vocab_size` tokens.

    The vocabulary is 514 base tokens (256 byte symbols, their word-end forms, start and end of text) plus one
    per merge, so `vocab_size - 514` merges are learned, or fewer when no remaining pair occurs at least
    `min_frequency` times. Returns the merges, best first; save them with `write_merges`.
    """
    if not isinstance(vocab_size, int) or vocab_size < NUM_BASE_TOKENS:
        raise ValueError(
            f"vocab_size must be an int >= {NUM_BASE_TOKENS} (256 byte symbols, their word-end forms and the "
            f"2 special tokens), got {vocab_size!r}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    if isinstance(lines, str):
        raise TypeError("lines must be an iterable of captions, not one str")
    word_counts = count_words(lines, show_progress=show_progress)
    return learn_merges(
        word_counts, vocab_size - NUM_BASE_TOKENS, min_frequency=min_frequency, show_progress=show_progress
    )


def write_merges(merges: Iterable[Pair], path: str | os.PathLike) -> Path:
    """Write merges in the standard format (gzip text, a header line, one "a b" per line); returns path."""
    path = Path(path)
    body = []
    for i, (first, second) in enumerate(merges):
        if not first or not second or any(c.isspace() for c in first + second):
            raise ValueError(f"merge {i} ({first!r}, {second!r}) is empty or contains whitespace")
        body.append(f"{first} {second}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # No name or time in the gzip header: the same merges always give the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        f.write(("\n".join([HEADER, *body]) + "\n").encode("utf-8"))
    return path


def read_lines(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Non-empty lines of text files (gzip if the name ends in .gz), without their line ends."""
    for path in paths:
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.bpe_trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="text files, one caption per line (.gz ok)")
    parser.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size (>= 514)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="merges file to write (.txt.gz)")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="stop when no pair occurs this often (default 2)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        parser.error(f"input file(s) not found: {', '.join(missing)}")
    if args.vocab_size < NUM_BASE_TOKENS:
        parser.error(f"--vocab-size must be >= {NUM_BASE_TOKENS}, got {args.vocab_size}")
    print(
        f"learning up to {args.vocab_size - NUM_BASE_TOKENS:,} merges (vocab {args.vocab_size:,}) from "
        f"{len(args.inputs)} file(s), min frequency {args.min_frequency} -> {args.output}"
    )
    start = time.perf_counter()
    lines = _CountingIterator(read_lines(args.inputs))
    merges = train_bpe(lines, args.vocab_size, min_frequency=args.min_frequency, show_progress=not args.quiet)
    write_merges(merges, args.output)
    vocab = NUM_BASE_TOKENS + len(merges)
    short = (
        ""
        if vocab == args.vocab_size
        else f" (fewer than {args.vocab_size:,}: no pair left >= min frequency)"
    )
    print(
        f"learned {len(merges):,} merges, vocab size {vocab:,}{short}, from {lines.count:,} captions in "
        f"{time.perf_counter() - start:.1f} s -> {args.output}"
    )
    return 0


class _CountingIterator:
    """Passes items through and counts them, for the summary line."""

    def __init__(self, items: Iterator[str]) -> None:
        self._items = items
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            self.count += 1
            yield item


if __name__ == "__main__":
    sys.exit(main())
