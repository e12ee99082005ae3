"""CLIP's byte-level BPE tokenizer (Radford et al., 2021).

Text is cleaned (ftfy, HTML unescaping, whitespace collapsing, lower-casing), split by CLIP's pre-tokenizer
regex into words, and each word's UTF-8 bytes are merged by BPE rank. With the standard merges file the ids
are identical to the original release's (up to the two bounds below, which no realistic caption reaches), so
OpenAI checkpoints see the ids they were trained on.

The merges file is gzip text: one header line, then one merge "a b" per line, best (earliest) first. The
vocabulary is laid out as: the 256 byte symbols, the same 256 with the word-end marker "</w>", one token per
merge, then <|startoftext|> and <|endoftext|>. `clip_train.bpe_trainer` writes files in the same format.

Two bounds keep the cost of one text small whatever its length (a data-loader worker must not stall on a
megabyte of caption): a word longer than `MAX_WORD_CHARS` characters is cut to its first `MAX_WORD_CHARS`
before BPE, and a call that truncates reads at most `TEXT_CHARS_PER_TOKEN` characters per token of the context
and stops encoding once the context is full. Neither changes the ids of a realistic caption.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex

if TYPE_CHECKING:
    import torch

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
WORD_END = "</w>"
DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_CACHE_SIZE = 65_536
VOCAB_ENV_VAR = "CLIP_TRAIN_BPE_VOCAB"
DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# A longer word is cut to its first MAX_WORD_CHARS characters before BPE (it ends there, word-end marker and
# all; the rest of it gives no ids). BPE's cost grows with the square of a word's length, so this bounds the
# cost of one word (scripts/bench/bench_tokenizer.py measures it). Realistic words are far shorter: the
# longest are runs of CJK or Thai letters between punctuation, tens to a few hundred characters, whose first
# 75 tokens come from their first hundred or so characters.
MAX_WORD_CHARS = 1000
# `Tokenizer.__call__` with truncation reads at most this many characters per token of the context (9,856 for
# 77 tokens): 75 tokens of realistic text span a few hundred characters, whitespace and HTML entities
# included, and cleaning (ftfy) costs time in proportion to the characters it reads.
TEXT_CHARS_PER_TOKEN = 128

# 256 byte symbols + their word-end forms + the two special tokens.
NUM_BASE_TOKENS = 2 * 256 + 2

# The standard file holds 262,144 merges, but CLIP uses only the first 48,894 of them: the released models'
# 49,408-token vocabulary is 49,152 - 256 - 2 merges + 512 byte symbols + 2 specials. The file is recognised
# by its header line ('"bpe_simple_vocab_16e6.txt#version: 0.2'); any other file (e.g. one written by the
# trainer) is used whole.
_STANDARD_HEADER_MARK = "bpe_simple_vocab_16e6.txt#"
_STANDARD_NUM_MERGES = 49_152 - 256 - 2

# The pre-tokenizer of the original release; reproduced verbatim because the ids depend on it. The special
# tokens come first so that a literal "<|endoftext|>" in a text maps to its id, as in the reference.
_PRETOKENIZER = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Python's `re` rather than `regex`: the reference collapses whitespace with `re`'s definition of \s.
_WHITESPACE = re.compile(r"\s+")
# Printable ASCII without "&", plus tab/newline/carriage return. On such text ftfy and HTML unescaping change
# nothing that the whitespace collapsing would not erase (no mojibake, entities or control characters are
# possible), so they can be skipped: ftfy is ~20 µs a caption, most of the cost of encoding one.
_PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character, so BPE can work on strings.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to U+0100 and
    up, in byte order. The dict's insertion order is the order of the vocabulary's first 256 entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes as the string of their byte symbols (see `bytes_to_unicode`)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in word.encode("utf-8"))


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, HTML unescaping (twice), whitespace collapsing, lower-casing."""
    if not (text.isascii() and _PLAIN_ASCII.fullmatch(text)):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text).strip().lower()


def pretokenize(cleaned: str) -> list[str]:
    """Split cleaned text (see `clean_text`) into the words that BPE works on."""
    return _PRETOKENIZER.findall(cleaned)


def resolve_bpe_path(bpe_path: str | os.PathLike | None) -> Path:
    """The merges file to load: `bpe_path`, else $CLIP_TRAIN_BPE_VOCAB, else the installed default."""
    if bpe_path is not None:
        path = Path(bpe_path)
        if not path.is_file():
            raise FileNotFoundError(f"BPE merges file not found: {path}")
        return path
    env = os.environ.get(VOCAB_ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"BPE merges file not found: {path} (from ${VOCAB_ENV_VAR})")
        return path
    if not DEFAULT_BPE_PATH.is_file():
        raise FileNotFoundError(
            f"the default CLIP BPE vocabulary is missing: {DEFAULT_BPE_PATH}. Run `make setup` (it installs "
            f"the file), or pass Tokenizer(bpe_path=...), or set ${VOCAB_ENV_VAR} to a merges file "
            "(e.g. bpe_simple_vocab_16e6.txt.gz)."
        )
    return DEFAULT_BPE_PATH


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a merges file (gzip or plain): a header line, then one merge "a b" per line, in rank order."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    header, body = lines[0], lines[1:]
    while body and not body[-1].strip():
        body.pop()
    if _STANDARD_HEADER_MARK in header:
        body = body[:_STANDARD_NUM_MERGES]
    merges = []
    for lineno, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    """CLIP's byte-level BPE tokenizer.

    Args:
        bpe_path: merges file; default $CLIP_TRAIN_BPE_VOCAB, else the standard vocabulary that `make setup`
            installs in clip_train/assets/. The vocabulary size follows from the number of merges.
        context_length: tokens per row of `__call__`'s output, start and end tokens included (>= 2).
        cache_size: most words whose BPE result is kept (least recently used are dropped); 0 disables it.
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._context_length = _check_context_length(context_length)
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.bpe_path = resolve_bpe_path(bpe_path)
        merges = read_merges(self.bpe_path)

        byte_symbols = list(bytes_to_unicode().values())
        vocab = [*byte_symbols, *(s + WORD_END for s in byte_symbols), *("".join(m) for m in merges)]
        vocab += [SOT_TEXT, EOT_TEXT]
        # A later duplicate wins, as in the reference (the standard file has none; the trainer writes none).
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        # Decoding works on bytes: a word-end token contributes its bytes and a space, specials nothing.
        self._token_bytes = [self._token_to_bytes(token) for token in vocab[:-2]] + [b"", b""]
        self._sot = self._encoder[SOT_TEXT]
        self._eot = self._encoder[EOT_TEXT]
        self._vocab_size = len(vocab)
        self._cache_size = cache_size
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def sot_token_id(self) -> int:
        return self._sot

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def context_length(self) -> int:
        return self._context_length

    def __repr__(self) -> str:
        return (
            f"Tokenizer(bpe_path='{self.bpe_path}', vocab_size={self._vocab_size}, "
            f"context_length={self._context_length})"
        )

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenized word: merge its byte symbols, lowest merge rank first."""
        if word in (SOT_TEXT, EOT_TEXT):
            return (self._encoder[word],)
        symbols = list(byte_encode(word))
        symbols[-1] += WORD_END
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, len(ranks)
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self._encoder[s] for s in symbols)

    def _encode(self, text: str, enough: int | None = None) -> list[int]:
        """Ids of `text`, word by word; with `enough`, stop after the word that brings them to `enough`."""
        ids: list[int] = []
        word_ids = self._word_ids
        for word in _PRETOKENIZER.findall(clean_text(text)):
            # Cut before the cache as well as before BPE: a cache key is then never longer than the bound.
            ids.extend(word_ids(word[:MAX_WORD_CHARS]))
            if enough is not None and len(ids) >= enough:
                break
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without length limit.

        The whole text is read. A word (see `pretokenize`) longer than `MAX_WORD_CHARS` characters is cut to
        its first `MAX_WORD_CHARS` before BPE: its ids are those of that prefix as a word of its own.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode(text)

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: bool = True,
    ) -> torch.LongTensor:
        """Token ids of a batch of texts: (B, context_length) int64, rows `SOT ids EOT 0 0 ...`.

        A text longer than the context is cut so that EOT stays last (truncate=True), or raises (False).
        A single str gives a batch of one.

        With truncate=True only the first `TEXT_CHARS_PER_TOKEN * context_length` characters of a text are
        read (9,856 for 77 tokens), and encoding stops at the word that fills the context: a row's ids are
        exactly `encode(text[:TEXT_CHARS_PER_TOKEN * context_length])[:context_length - 2]`, so a caption of
        any length costs no more than one of that many characters. With truncate=False the whole text is
        read, as by `encode`, so that the error can say how long it is.
        """
        import torch  # here, not at module level, so the BPE trainer's CLI starts without loading torch

        length = self._context_length if context_length is None else _check_context_length(context_length)
        batch = _as_text_list(texts)
        out = np.zeros((len(batch), length), dtype=np.int64)
        for i, text in enumerate(batch):
            if truncate:
                ids = self._encode(text[: TEXT_CHARS_PER_TOKEN * length], enough=length - 2)[: length - 2]
            else:
                ids = self._encode(text)
                if len(ids) + 2 > length:
                    raise ValueError(
                        f"text {i} is {len(ids) + 2} tokens long with start/end tokens "
                        f"({len(text)} characters), more than context_length={length}; "
                        "shorten it or pass truncate=True"
                    )
            out[i, 0] = self._sot
            out[i, 1 : len(ids) + 1] = ids
            out[i, len(ids) + 1] = self._eot
        return torch.from_numpy(out)

    def _token_to_bytes(self, token: str) -> bytes:
        if token.endswith(WORD_END):
            return bytes(self._byte_decoder[c] for c in token[: -len(WORD_END)]) + b" "
        return bytes(self._byte_decoder[c] for c in token)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor/array such as one row of `__call__`'s output).

        Start tokens are skipped and everything from the first end token on (the padding) is dropped; without
        an end token every id is decoded, so the output of `encode` (where 0 is "!") round-trips. The text is
        the cleaned, lower-cased one, with a space after each word.
        """
        if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
            if getattr(ids, "ndim", 1) != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        for pos, token in enumerate(ids):
            if not isinstance(token, (int, np.integer)) or isinstance(token, bool):
                raise TypeError(f"token id at position {pos} is {type(token).__name__}, expected int")
            if not 0 <= token < self._vocab_size:
                raise ValueError(
                    f"token id {token} at position {pos} is out of range [0, {self._vocab_size})"
                )
        if self._eot in ids:
            ids = ids[: ids.index(self._eot)]
        text = b"".join(self._token_bytes[t] for t in ids).decode("utf-8", errors="replace")
        return text[:-1] if text.endswith(" ") else text

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses, current and maximum size of the word -> ids cache."""
        return self._word_ids.cache_info()

    def clear_cache(self) -> None:
        self._word_ids.cache_clear()

    # The cache wraps a bound method and cannot be pickled; data-loader workers get a fresh (empty) one.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_word_ids"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._word_ids = functools.lru_cache(maxsize=self._cache_size)(self._bpe)


def _check_context_length(context_length: int) -> int:
    if not isinstance(context_length, (int, np.integer)) or isinstance(context_length, bool):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(
            f"context_length must be >= 2 (room for the start and end tokens), got {context_length}"
        )
    return int(context_length)


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"expected a str or a sequence of str, got {type(texts).__name__}")
    batch = list(texts)
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, expected str")
    return batch
