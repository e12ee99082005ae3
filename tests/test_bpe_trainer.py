"""BPE trainer: merges against a from-scratch recount, the file format, loading and round trips, the CLI."""

from __future__ import annotations

import gzip
import itertools
import random
from collections import Counter

import pytest

from clip_train.bpe_trainer import count_words, learn_merges, main, train_bpe, write_merges
from clip_train.tokenizer import (
    NUM_BASE_TOKENS,
    WORD_END,
    Tokenizer,
    byte_encode,
    bytes_to_unicode,
    clean_text,
)

LATIN = ["photo", "of", "a", "the", "dog", "cat", "running", "on", "beach", "red", "car", "near", "house"]
CYRILLIC = ["фотография", "красный", "кот", "собака", "на", "пляже", "дом", "рядом"]
JAPANESE = ["東京の夜景", "猫", "犬と海"]


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """Captions of 5-15 words mixing English, Russian and Japanese, plus random rare words.

    Pre-tokens are space-separated (CLIP decodes with a space after each), so decoding gives the text back.
    """
    rng = random.Random(seed)
    rare = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(50)
    ]
    common = LATIN + CYRILLIC + JAPANESE
    lines = []
    for _ in range(n):
        words = [
            rng.choice(common) if rng.random() < 0.85 else rng.choice(rare) for _ in range(rng.randint(5, 15))
        ]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(["", " .", " !", " 7"]))
    return lines


def naive_merges(word_counts: dict[str, int], num_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """Textbook BPE: recount every pair from scratch at each step (same tie-break and duplicate rule)."""
    words = {}
    for word, count in word_counts.items():
        symbols = list(byte_encode(word))
        symbols[-1] += WORD_END
        words[tuple(symbols)] = count
    tokens = set(bytes_to_unicode().values())
    tokens |= {t + WORD_END for t in tokens}
    merges = []
    while len(merges) < num_merges:
        counts = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                counts[pair] += count
        candidates = [(-c, p) for p, c in counts.items() if c >= min_frequency and p[0] + p[1] not in tokens]
        if not candidates:
            break
        _, (a, b) = min(candidates)
        merges.append((a, b))
        tokens.add(a + b)
        merged_words = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words[tuple(out)] = count
        words = merged_words
    return merges


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(2000)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    merges = train_bpe(corpus, NUM_BASE_TOKENS + 300)
    path = write_merges(merges, tmp_path_factory.mktemp("bpe") / "bpe.txt.gz")
    return merges, Tokenizer(path)


def test_incremental_training_equals_naive_recount():
    counts = count_words([*make_corpus(300, seed=1), "aaaa aaa abab ababab", "банан бананы"])
    for min_frequency in (1, 2, 5):
        assert learn_merges(counts, 400, min_frequency=min_frequency) == naive_merges(
            counts, 400, min_frequency
        )


def test_trained_file_loads_with_vocab_size_from_merges(trained):
    merges, tok = trained
    assert len(merges) == 300
    assert tok.vocab_size == NUM_BASE_TOKENS + 300
    assert (tok.sot_token_id, tok.eot_token_id) == (512 + 300, 513 + 300)
    assert len({a + b for a, b in merges}) == len(merges), "every merge adds a distinct token"
    row = tok("a photo of a cat")[0].tolist()
    assert row[0] == tok.sot_token_id and tok.eot_token_id in row


def test_round_trip_including_non_latin_scripts(trained, corpus):
    _, tok = trained
    for text in [*corpus[:200], "Красный кот на пляже", "東京の夜景 と 猫", "unseen wordz ελληνικά"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size - 2 for i in ids)
        assert tok.decode(ids) == clean_text(text)
        assert tok.decode(tok(text, context_length=200)[0]) == clean_text(text)


def test_frequent_words_become_single_tokens(trained):
    _, tok = trained
    for word in ["photo", "красный", "собака", "東京の夜景"]:
        assert len(tok.encode(word)) == 1, word
    # Multi-byte scripts compress too: "фотография" is 20 UTF-8 bytes.
    assert len(tok.encode("фотография")) <= 2


def test_training_is_deterministic(corpus, trained):
    assert train_bpe(list(corpus), NUM_BASE_TOKENS + 300) == trained[0]


def test_min_frequency_stops_early():
    merges = train_bpe(["one caption only", "one caption only"], NUM_BASE_TOKENS + 10_000, min_frequency=2)
    assert 0 < len(merges) < 10_000
    assert train_bpe(["xq zw"], NUM_BASE_TOKENS + 10_000, min_frequency=2) == []


def test_file_format_matches_the_standard_one(trained, tmp_path):
    merges, _ = trained
    path = write_merges(merges, tmp_path / "out.txt.gz")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert lines[1:] == [f"{a} {b}" for a, b in merges]
    assert write_merges(merges, tmp_path / "again.txt.gz").read_bytes() == path.read_bytes()


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 514"):
        train_bpe(["a b"], 513)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe(["a b"], 600, min_frequency=0)
    with pytest.raises(TypeError, match="not one str"):
        train_bpe("a caption", 600)
    with pytest.raises(TypeError, match="line 1 is int"):
        train_bpe(["a caption", 7], 600)
    with pytest.raises(ValueError, match="whitespace"):
        write_merges([("a", "b c")], "unused.txt.gz")


def test_cli_trains_from_plain_and_gzip_files(tmp_path, capsys):
    corpus = make_corpus(400, seed=2)
    plain = tmp_path / "a.txt"
    plain.write_text("\n".join(corpus[:200]) + "\n\n", encoding="utf-8")
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress("\n".join(corpus[200:]).encode("utf-8")))
    out = tmp_path / "vocab" / "bpe.txt.gz"

    assert main([str(plain), str(packed), "--vocab-size", "700", "--output", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("learned 186 merges, vocab size 700, from 400 captions") and str(out) in summary
    tok = Tokenizer(out)
    assert tok.vocab_size == 700
    assert tok.decode(tok.encode(corpus[0])) == clean_text(corpus[0])


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--vocab-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.txt"), "--vocab-size", "600", "--output", str(tmp_path / "o.gz")])
    assert "not found" in capsys.readouterr().err
