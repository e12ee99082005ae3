"""CLIP BPE tokenizer: reference ids, special tokens, truncation, decoding, the cache, and bad input."""

from __future__ import annotations

import html
import itertools
import json
import pickle
import random
import re
import string

import ftfy
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip_train import tokenizer as tokenizer_module
from clip_train.tokenizer import VOCAB_ENV_VAR, Tokenizer, clean_text


@pytest.fixture(scope="module")
def reference(fixtures_dir) -> list[dict]:
    with open(fixtures_dir / "tokenizer_reference.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tok(fixtures_dir) -> Tokenizer:
    return Tokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz")


def test_standard_vocabulary_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.context_length == 77


def test_ids_equal_reference_for_every_fixture_line(tok, reference):
    assert len(reference) >= 20
    batch = tok([row["text"] for row in reference])
    assert batch.dtype == torch.int64 and batch.shape == (len(reference), 77)
    for row, ids in zip(reference, batch):
        assert ids.tolist() == row["ids"], row["text"]
    # One at a time gives the same rows as the batch call.
    for row in reference:
        assert tok(row["text"])[0].tolist() == row["ids"], row["text"]


def test_default_vocabulary_is_the_installed_standard_one(tok, monkeypatch):
    monkeypatch.delenv(VOCAB_ENV_VAR, raising=False)
    default = Tokenizer()
    assert default.bpe_path == tokenizer_module.DEFAULT_BPE_PATH
    assert default.vocab_size == 49408
    assert default.encode("a photo of a cat") == tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_missing_default_vocabulary_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(VOCAB_ENV_VAR, raising=False)
    monkeypatch.setattr(tokenizer_module, "DEFAULT_BPE_PATH", tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(FileNotFoundError, match=r"make setup.*bpe_path.*CLIP_TRAIN_BPE_VOCAB"):
        Tokenizer()


def test_env_var_points_to_the_vocabulary(fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "DEFAULT_BPE_PATH", tmp_path / "missing.txt.gz")
    monkeypatch.setenv(VOCAB_ENV_VAR, str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"))
    assert Tokenizer().vocab_size == 49408
    monkeypatch.setenv(VOCAB_ENV_VAR, str(tmp_path / "nowhere.txt.gz"))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt\.gz.*CLIP_TRAIN_BPE_VOCAB"):
        Tokenizer()
    with pytest.raises(FileNotFoundError, match=r"not_here\.gz"):
        Tokenizer(tmp_path / "not_here.gz")


def test_encode_has_no_special_tokens_and_call_adds_them(tok):
    ids = tok.encode("Two dogs")
    assert tok.sot_token_id not in ids and tok.eot_token_id not in ids
    row = tok("Two dogs")[0].tolist()
    assert row[: len(ids) + 2] == [tok.sot_token_id, *ids, tok.eot_token_id]
    assert row[len(ids) + 2 :] == [0] * (77 - len(ids) - 2)


def test_truncation_keeps_end_token_last(tok):
    long_text = " ".join(["tree"] * 200)
    out = tok(["short", long_text], context_length=16)
    assert out.shape == (2, 16)
    assert out[1, 0] == tok.sot_token_id and out[1, -1] == tok.eot_token_id
    assert out[1, 1:-1].tolist() == tok.encode(long_text)[:14]
    # Exactly filling the context is not truncation.
    fits = " ".join(["tree"] * 14)
    assert tok(fits, context_length=16, truncate=False)[0, -1] == tok.eot_token_id


def test_too_long_without_truncation_names_text_and_length(tok):
    with pytest.raises(ValueError, match=r"text 1 is 202 tokens long .*context_length=77"):
        tok(["fine", " ".join(["tree"] * 200)], truncate=False)


def test_context_length_is_configurable_and_checked(fixtures_dir, tok):
    short = Tokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz", context_length=8)
    assert short.context_length == 8 and short("a cat").shape == (1, 8)
    assert tok(["a", "b", "c"], context_length=2).tolist() == [[49406, 49407]] * 3
    for bad in (1, 0, -5):
        with pytest.raises(ValueError, match="context_length must be >= 2"):
            Tokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz", context_length=bad)
        with pytest.raises(ValueError, match="context_length must be >= 2"):
            tok("a cat", context_length=bad)
    with pytest.raises(TypeError, match="context_length must be an int"):
        tok("a cat", context_length=7.5)


def test_non_string_inputs_are_rejected(tok):
    with pytest.raises(TypeError, match="text 1 is NoneType"):
        tok(["a cat", None])
    with pytest.raises(TypeError, match="text 0 is int"):
        tok([3])
    with pytest.raises(TypeError, match="sequence of str, got int"):
        tok(42)
    with pytest.raises(TypeError, match="sequence of str, got bytes"):
        tok(b"a cat")
    with pytest.raises(TypeError, match="encode expects a str, got bytes"):
        tok.encode(b"a cat")


def test_empty_batch_and_empty_text(tok):
    assert tok([]).shape == (0, 77)
    assert tok("")[0, :3].tolist() == [49406, 49407, 0]
    assert tok.encode("   ") == []


def test_decode_skips_specials_and_padding(tok):
    batch = tok(["A Photo of a CAT!", "two &amp; three"])
    assert tok.decode(batch[0]) == "a photo of a cat !"
    assert tok.decode(batch[1].numpy()) == "two & three"
    assert tok.decode(batch[0].tolist()) == "a photo of a cat !"
    # Without an end token every id counts: 0 is the byte symbol "!", not padding.
    assert tok.decode(tok.encode("wow!!")) == "wow !!"
    assert tok.decode([]) == ""


@pytest.mark.parametrize(
    "text", ["a photo of a cat", "数字 日本語のテキスト 中文", "ελληνικά и русский текст", "café"]
)
def test_decode_inverts_encode_on_words(tok, text):
    assert tok.decode(tok.encode(text)) == clean_text(text)


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match=r"token id 49408 at position 1 is out of range \[0, 49408\)"):
        tok.decode([320, 49408])
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        tok.decode(torch.tensor([-1, 5]))
    with pytest.raises(TypeError, match="position 0 is str"):
        tok.decode(["a"])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def test_word_cache_is_bounded_and_gives_same_ids(fixtures_dir, tok):
    small = Tokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz", cache_size=16)
    texts = [f"word{i} caption number{i} zebra" for i in range(200)]
    first = small(texts)
    info = small.cache_info()
    assert info.maxsize == 16 and info.currsize <= 16 and info.hits > 0
    assert torch.equal(first, small(texts))
    assert torch.equal(first, tok(texts))
    uncached = Tokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz", cache_size=0)
    assert torch.equal(first, uncached(texts))
    assert uncached.cache_info().currsize == 0


def test_pickles_for_data_loader_workers(tok):
    tok.encode("warm the cache")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.cache_info().currsize == 0
    assert torch.equal(clone(["a photo of a cat", "日本語"]), tok(["a photo of a cat", "日本語"]))


def test_literal_special_tokens_map_to_their_ids_as_in_the_reference(tok):
    assert tok.encode("a <|endoftext|> b") == [320, 49407, 321]


def _reference_clean(text: str) -> str:
    """The original release's normalisation, step by step, without the ASCII shortcut."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_ascii_shortcut_equals_full_cleaning(text):
    assert clean_text(text) == _reference_clean(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_cleaning_equals_reference_on_any_text(text):
    assert clean_text(text) == _reference_clean(text)


def test_numpy_int_context_length(tok):
    assert tok("a", context_length=np.int64(5)).shape == (1, 5)


class _BpeRecordingTokenizer(Tokenizer):
    """The real tokenizer, recording the length of every word it runs BPE on (no word cache: each counts)."""

    def __init__(self, bpe_path) -> None:
        self.bpe_word_lengths: list[int] = []
        super().__init__(bpe_path, cache_size=0)

    def _bpe(self, word: str) -> tuple[int, ...]:
        self.bpe_word_lengths.append(len(word))
        # Refused rather than run: unbounded, BPE of a megabyte word would take hours, not fail.
        assert len(word) <= tokenizer_module.MAX_WORD_CHARS, f"BPE asked for a {len(word):,}-character word"
        return super()._bpe(word)


def _random_letters(rng: random.Random, n: int) -> str:
    # Random lower-case letters are BPE's slowest input: many distinct merges apply.
    return "".join(rng.choices(string.ascii_lowercase, k=n))


def test_a_megabyte_caption_with_spaces_is_encoded_only_until_the_context_is_full(fixtures_dir):
    letters = _random_letters(random.Random(0), 860_000)
    lengths = itertools.islice(itertools.cycle(range(3, 10)), 143_333)  # words of 3 to 9 letters
    starts = itertools.accumulate(lengths, initial=0)
    words = [letters[a:b] for a, b in itertools.pairwise(starts)]
    caption = " ".join(words)
    assert len(caption) >= 1_000_000
    tok = _BpeRecordingTokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz")
    row = tok(caption)[0].tolist()
    # Each word gives at least one id, so at most 75 words are encoded, and not one after the 75th id.
    assert len(tok.bpe_word_lengths) <= 75
    assert sum(tok.bpe_word_lengths) == sum(len(w) for w in words[: len(tok.bpe_word_lengths)])
    assert row == [tok.sot_token_id, *tok.encode(" ".join(words[:200]))[:75], tok.eot_token_id]


def test_a_megabyte_caption_without_spaces_runs_bpe_once_on_its_first_characters(fixtures_dir):
    bound = tokenizer_module.MAX_WORD_CHARS
    caption = _random_letters(random.Random(0), 1_000_000)
    tok = _BpeRecordingTokenizer(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz")
    row = tok(caption)
    assert tok.bpe_word_lengths == [bound]
    assert torch.equal(row, tok(caption[:bound]))
    assert tok.encode(caption) == tok.encode(caption[:bound])


def test_a_word_longer_than_the_bound_is_cut_to_its_first_characters(tok):
    bound = tokenizer_module.MAX_WORD_CHARS
    word = "ab" * bound
    assert tok.encode(f"{word} cat") == tok.encode(f"{word[:bound]} cat")
    # A word of exactly the bound is whole: one character more than it changes the ids.
    assert tok.encode(word[:bound]) != tok.encode(word[: bound - 1])


def test_truncation_reads_at_most_the_characters_per_token_of_the_context(tok):
    read = tokenizer_module.TEXT_CHARS_PER_TOKEN * 16
    cat = tok.encode("cat")
    assert tok(" " * (read - 3) + "cat", context_length=16)[0, 1:2].tolist() == cat
    # Three spaces more put the word past what is read; without truncation the whole text is read.
    assert tok(" " * read + "cat", context_length=16)[0, :2].tolist() == [49406, 49407]
    assert tok(" " * read + "cat", context_length=16, truncate=False)[0, 1:2].tolist() == cat
