"""Whole-word matching rules: casing, Unicode normalisation, punctuation, scripts with and without spaces."""

from __future__ import annotations

import pytest

from data_pipelines.candidates.matching import QueryMatcher, load_queries, normalize_text


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("A Red-Dog, running!", "a red dog running"),
        ("ＮＥＷ　ＹＯＲＫ", "new york"),  # full-width letters and ideographic space (NFKC)
        ("Straße", "strasse"),  # case folding, not just lower-casing
        ("ﬁsh", "fish"),  # ligature (NFKC)
        ("Cafe\u0301", "café"),  # combining accent composed (NFKC); accents are kept
        ("soft\u00adhyphen", "softhyphen"),  # format characters vanish inside words
        ("under_score/slash", "under score slash"),
        ("黑猫在睡觉", "黑 猫 在 睡 觉"),  # every ideograph is a word of its own
        ("  tabs\tand\nnewlines  ", "tabs and newlines"),
    ],
)
def test_normalize_text(text, normalised):
    assert normalize_text(text) == normalised


@pytest.fixture(scope="module")
def matcher():
    return QueryMatcher(
        ["Dog", "red dog", "New York", "café", "t-shirt", "猫", "睡觉", "ไทย", "москва", "C++", "hot"]
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A RED-dog, running!", ["Dog", "red dog"]),
        ("dogs and hotdogs", []),  # whole words only
        ("hot-dog", ["Dog", "hot"]),  # punctuation separates words
        ("ＮＥＷ　ＹＯＲＫ at night", ["New York"]),
        ("CAFÉ au lait", ["café"]),
        ("a cafe", []),  # accents are significant
        ("my T‑Shirt", ["t-shirt"]),  # non-breaking hyphen is punctuation too
        ("黑猫在睡觉", ["猫", "睡觉"]),  # no spaces: contiguous characters match
        ("ภาษาไทยง่าย", ["ไทย"]),
        ("Улицы Москвы и МОСКВА", ["москва"]),  # Cyrillic: case folded, whole words (no stemming)
        ("I love C++", ["C++"]),  # "c++" normalises to "c": punctuation-only differences are lost
        ("", []),
    ],
)
def test_match(matcher, text, expected):
    assert matcher.match(text) == sorted(expected)


def test_queries_merged_and_dropped():
    m = QueryMatcher(["Dog", "dog", "DOG!", "!!!", "cat"])
    assert m.queries == ["Dog", "cat"]
    assert m.skipped == {"duplicate_after_normalisation": 2, "empty_after_normalisation": 1}


def test_query_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="query file not found"):
        load_queries([tmp_path / "missing.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        load_queries([empty])
    with pytest.raises(ValueError, match="empty"):
        QueryMatcher(["...", "!"])
    two = tmp_path / "b.txt"
    two.write_text("b\n")
    (tmp_path / "a.txt").write_text("a\n\nc\n")
    assert load_queries([tmp_path / "a.txt", two]) == ["a", "c", "b"]
