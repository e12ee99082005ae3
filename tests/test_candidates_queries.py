"""The query builder: frequent words, high-PMI bigrams, titles, user lists; and its CLI output files."""

from __future__ import annotations

import json

import pytest

from data_pipelines import build_queries as cli
from data_pipelines.candidates.query_builder import BuilderConfig, build_queries

CORPUS = (
    ["New York skyline at night"] * 6 + ["a dog in the park", "the dog and the cat"] * 5 + ["the new car"] * 3
)


def test_sources_and_dedup():
    cfg = BuilderConfig(min_word_count=5, min_bigram_count=5, min_pmi=1.0, min_title_count=2)
    queries, added = build_queries(
        CORPUS, cfg, titles=["New York", "Atlantis", "Skyline at Night"], user_lists={"wn": ["Dog"]}
    )
    assert queries[0] == "Dog"  # user lists come first and are kept as spelled
    assert "dog" not in queries  # the same query after normalisation
    assert "the" in queries and "car" not in queries  # "car" occurs 3 times only
    assert "new york" in queries  # high-PMI bigram
    assert "Skyline at Night" in queries and "Atlantis" not in queries
    assert added == {"wn": 1, "words": added["words"], "bigrams": added["bigrams"], "titles": 1}
    assert len(queries) == sum(added.values())


def test_cli_writes_list_and_counts(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    user = tmp_path / "wordnet.txt"
    user.write_text("golden retriever\n")
    out = tmp_path / "q" / "queries.txt"
    args = ["--corpus", str(corpus), "--lists", str(user), "--min-word-count", "5", "--out", str(out)]
    assert cli.main(args) == 0
    assert out.read_text().splitlines()[0] == "golden retriever"
    counts = json.loads(out.with_name("queries.txt.counts.json").read_text())
    assert (
        counts["total"] == len(out.read_text().splitlines()) and counts["per_source"]["list:wordnet.txt"] == 1
    )
    assert capsys.readouterr().out.startswith("wrote ")
    assert cli.main(["--corpus", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: file not found: {tmp_path / 'none.txt'}\n"


def test_cli_without_input_names_the_options_that_give_it(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path / "queries.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no input given: pass at least one of --corpus ")
    assert "--titles" in err and "--lists" in err
    assert not (tmp_path / "queries.txt").exists()


def test_cli_help(capsys):
    # --help exits 0 (an error would be 2) and lists the parser's options; the option is looked for
    # with its metavar, as the description (the module docstring) names --min-word-count too.
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: python -m data_pipelines.build_queries")
    assert "--min-word-count MIN_WORD_COUNT" in help_text and "--out OUT" in help_text
