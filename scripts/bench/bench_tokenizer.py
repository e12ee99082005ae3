"""Tokenizer throughput in captions/s: word cache off / cold / warm, batch calls vs one caption per call,
and the cost of a 1 MB caption (the tokenizer's bounds on what it reads and on one word's length).

Captions are synthetic web captions of 5-30 words: Zipf-distributed words (a few hundred common ones and a
long tail of rare ones), some capitalised, with punctuation, numbers, the odd accent, curly quote or HTML
entity. The 1 MB captions are random lower-case letters (BPE's slowest input), as words of 3-9 letters,
as one word, and as accented words (which take the ftfy path). For scale: one data-loader worker needs
only a few thousand captions/s.

    python scripts/bench/bench_tokenizer.py [--captions 20000] [--batch-size 256] [--megabyte-captions 3]
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections.abc import Callable

from clip_train.tokenizer import Tokenizer, clean_text

COMMON = [
    "a",
    "the",
    "of",
    "and",
    "in",
    "on",
    "with",
    "for",
    "to",
    "at",
    "by",
    "from",
    "is",
    "are",
    "photo",
    "image",
    "picture",
    "view",
    "close",
    "up",
    "black",
    "white",
    "red",
    "blue",
    "green",
    "yellow",
    "small",
    "large",
    "big",
    "old",
    "new",
    "beautiful",
    "vintage",
    "modern",
    "man",
    "woman",
    "girl",
    "boy",
    "people",
    "family",
    "child",
    "dog",
    "cat",
    "bird",
    "horse",
    "car",
    "house",
    "street",
    "city",
    "beach",
    "sea",
    "sky",
    "sunset",
    "mountain",
    "tree",
    "flower",
    "garden",
    "table",
    "chair",
    "room",
    "kitchen",
    "wedding",
    "party",
    "dress",
    "shirt",
    "shoes",
    "bag",
    "gold",
    "silver",
    "wood",
    "wooden",
    "stock",
    "vector",
    "illustration",
    "background",
    "pattern",
    "icon",
    "logo",
    "design",
    "art",
    "painting",
    "drawing",
    "poster",
    "book",
    "cover",
    "map",
    "night",
    "day",
    "summer",
    "winter",
    "spring",
    "autumn",
    "christmas",
    "holiday",
    "food",
    "cake",
    "coffee",
    "water",
    "river",
    "lake",
    "park",
    "road",
    "bridge",
    "building",
    "church",
    "sale",
    "free",
    "best",
    "top",
    "new",
    "york",
    "london",
    "paris",
    "home",
    "decor",
    "living",
    "bedroom",
    "bathroom",
    "stainless",
    "steel",
    "leather",
]
EXTRAS = ["café", "naïve", "“quoted”", "it's", "&amp;", "don't", "3.5", "2024", "100%", "#1", "jalapeño", "–"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions of 5-30 words with a Zipf word distribution over ~20k distinct words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rare = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 11))) for _ in range(20_000)]
    vocab = COMMON + EXTRAS + rare
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))
    captions = []
    for _ in range(n):
        words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(5, 30))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        if rng.random() < 0.1:
            words = [w.upper() if rng.random() < 0.3 else w for w in words]
        captions.append(" ".join(words) + rng.choice(["", "", ".", "!", " - stock photo", " | Shop now"]))
    return captions


def megabyte_captions(n: int, kind: str, seed: int = 0) -> list[str]:
    """`n` distinct captions of 1,000,000 characters: "words" (3-9 random letters each), "one word" (random
    letters, no space) or "accented" (words of random letters and accented letters: cleaned by ftfy)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz" + ("éèàüöñç" if kind == "accented" else "")
    captions = []
    for _ in range(n):
        letters = "".join(rng.choices(alphabet, k=1_000_000))
        if kind == "one word":
            captions.append(letters)
            continue
        words, pos = [], 0
        while pos < len(letters):
            length = rng.randint(3, 9)
            words.append(letters[pos : pos + length])
            pos += length + 1  # the letter at pos + length becomes the space
        captions.append(" ".join(words)[:1_000_000])
    return captions


def run(fn: Callable[[], object], captions: int) -> tuple[float, float]:
    """(captions/s, µs/caption) of one call of `fn` that tokenizes `captions` captions."""
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return captions / seconds, seconds / captions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", type=int, default=20_000, help="captions per measured pass")
    parser.add_argument("--batch-size", type=int, default=256, help="captions per batch call")
    parser.add_argument("--megabyte-captions", type=int, default=3, help="1 MB captions per kind measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    captions = synthetic_captions(args.captions, args.seed)
    batches = [captions[i : i + args.batch_size] for i in range(0, len(captions), args.batch_size)]
    words = sum(len(c.split()) for c in captions)
    print(
        f"tokenizing {len(captions):,} synthetic captions ({words / len(captions):.1f} words on average) "
        f"to (B, 77), batches of {args.batch_size}, one pass per row"
    )

    def batch_calls(tok: Tokenizer) -> Callable[[], object]:
        return lambda: [tok(batch) for batch in batches]

    def single_calls_of(tok: Tokenizer, texts: list[str]) -> Callable[[], object]:
        return lambda: [tok(text) for text in texts]

    def single_calls(tok: Tokenizer) -> Callable[[], object]:
        return single_calls_of(tok, captions)

    rows = []
    uncached = Tokenizer(cache_size=0)
    rows.append(("no word cache, batch calls", *run(batch_calls(uncached), len(captions)), None))
    cold = Tokenizer()
    rows.append(("cold cache (first pass), batch calls", *run(batch_calls(cold), len(captions)), cold))
    warm = cold
    warm_info = warm.cache_info()
    rows.append(("warm cache, batch calls", *run(batch_calls(warm), len(captions)), warm))
    rows.append(("warm cache, one caption per call", *run(single_calls(warm), len(captions)), warm))
    rows.append(
        (
            "text cleaning only (ftfy etc.)",
            *run(lambda: [clean_text(c) for c in captions], len(captions)),
            None,
        )
    )
    megabyte_rows = []
    for kind in ("words", "one word", "accented"):
        big = megabyte_captions(args.megabyte_captions, kind, args.seed)
        tok = Tokenizer()  # a cold cache: each 1 MB caption is new
        rate, micros = run(single_calls_of(tok, big), len(big))
        megabyte_rows.append((f"1 MB caption, {kind}, one per call", rate, micros, tok))

    print(f"\n| {'mode':<38} | {'captions/s':>10} | {'µs/caption':>10} |")
    print(f"|{'-' * 40}|{'-' * 11}:|{'-' * 11}:|")
    for name, rate, micros, _ in rows + megabyte_rows:
        print(f"| {name:<38} | {rate:>10,.1f} | {micros:>10.1f} |")
    hit_rate = warm_info.hits / max(1, warm_info.hits + warm_info.misses)
    print(
        f"\nword cache after the cold pass: {warm_info.currsize:,} words cached (max {warm_info.maxsize:,}), "
        f"hit rate {hit_rate:.1%}"
    )
    slowest = min(rate for name, rate, _, _ in rows[:4])
    slowest_megabyte = max(micros for _, _, micros, _ in megabyte_rows) / 1e6
    print(
        f"summary: {len(captions):,} captions; slowest tokenizer mode {slowest:,.0f} captions/s, warm batch "
        f"{rows[2][1]:,.0f} captions/s (a data-loader worker needs a few thousand); a 1 MB caption takes at "
        f"most {slowest_megabyte:.3f} s"
    )


if __name__ == "__main__":
    main()
