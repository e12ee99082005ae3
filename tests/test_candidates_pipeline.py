"""The whole pipeline on real files through its CLIs: every row accounted for, the output contract the
downloader reads, restartable jobs, the submitit job-array path, independence from the partitioning, and
bad arguments or a stale output folder refused before any work."""

from __future__ import annotations

import csv
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from candidates_support import serve, write_gzip_csv, write_warc

from data_pipelines import balance, extract
from data_pipelines.candidates.balancing import MatchedPair
from data_pipelines.candidates.balancing import balance as balance_in_memory
from data_pipelines.candidates.matching import QueryMatcher
from data_pipelines.candidates.passes.executors import ExecutorConfig
from data_pipelines.candidates.pipeline import plan_extract, run_balance, run_extract_pass
from data_pipelines.candidates.stats import check_accounting
from data_pipelines.candidates.urls import normalize_url

WORDS = ["dog", "cat", "red", "car", "tree", "bird", "sky", "house", "boat", "sea"]
QUERIES = [*WORDS, "red car", "blue whale"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rnd = random.Random(0)
    rows = [
        {"URL": f"http://img.example.com/{rnd.randrange(700)}.jpg", "TEXT": " ".join(rnd.choices(WORDS, k=3))}
        for _ in range(1200)
    ]
    rows += [{"URL": "data:image/png;base64,xx", "TEXT": "dog"}, {"URL": None, "TEXT": "dog"}]
    rows += [{"URL": "http://img.example.com/u.jpg", "TEXT": "nothing to see"}]
    pq.write_table(pa.Table.from_pylist(rows[:700]), d / "part1.parquet")
    body = io.StringIO()
    csv.writer(body).writerows([["URL", "TEXT"], *([r["URL"] or "", r["TEXT"]] for r in rows[700:])])
    write_gzip_csv(d / "part2.csv.gz", body.getvalue() + "http://img.example.com/z.jpg,a,b\n")  # malformed
    page = '<img src="/a.jpg" alt="Blue whale!"><img src="b.jpg" alt="a red car"><img src="c.jpg">'
    write_warc(d / "crawl.warc.gz", [("https://www.example.org/sea/page.html", page)])
    # Plus three lines that never become queries, to be reported: a duplicate after normalisation, one of
    # nothing but punctuation, one that is not UTF-8.
    (d / "queries.txt").write_bytes(("\n".join(QUERIES) + "\nDOG!\n!!!\n").encode() + b"caf\xe9\n")
    return d


QUERIES_DROPPED = {"duplicate_after_normalisation": 1, "empty_after_normalisation": 1, "undecodable": 1}


def _run(inputs, work, out, buckets=3, t=40, seed=0, executor="processes", tables=None, warc=True):
    tables = tables or [str(inputs / "part1.parquet"), str(inputs / "part2.csv.gz")]
    args = ["--queries", str(inputs / "queries.txt"), "--tables", *tables, "--url-column", "URL"]
    args += ["--text-column", "TEXT", "--work", str(work)] + (
        ["--warc", str(inputs / "crawl.warc.gz")] if warc else []
    )
    args += ["--buckets", str(buckets), "--executor", executor, "--workers", "2"]
    assert extract.main(args) == 0
    assert balance.main(["--work", str(work), "--out", str(out), "--t", str(t), "--seed", str(seed)]) == 0
    return json.loads((out / "stats.json").read_text())


def _table(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def test_end_to_end(inputs, tmp_path, capsys):
    stats = _run(inputs, tmp_path / "work", tmp_path / "out")
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary[-1].startswith("kept ") and str(tmp_path / "out") in summary[-1]
    extracted = next(line for line in summary if line.startswith("extracted "))
    assert "12 queries, query lines dropped: 1 duplicate_after_normalisation, " in extracted
    assert "1 empty_after_normalisation, 1 undecodable;" in extracted
    check_accounting(stats)
    assert stats["queries_dropped"] == QUERIES_DROPPED
    tot = stats["totals"]
    assert tot["queries"] == len(QUERIES) and tot["queries_dropped"] == 3
    assert tot["rows"] == 1203 + 1 + 3  # table rows (incl. one malformed) + WARC images
    assert stats["rejected"] == {"data_uri": 1, "missing_url": 1, "malformed_row": 1, "img_without_text": 1}
    assert tot["unmatched"] == 1 and tot["duplicates"] > 0
    rows = _table(tmp_path / "out")
    assert list(rows[0]) == ["url", "text", "query", "matched_queries", "source"]
    per_query = {q: c["kept"] for q, c in stats["per_query"].items() if c["kept"]}
    assert max(per_query.values()) <= 40
    assert sum(per_query.values()) == len(rows) == tot["kept"]
    assert stats["per_query"]["blue whale"] == {"matched": 1, "kept": 1}
    whale = next(r for r in rows if r["query"] == "blue whale")
    assert whale["url"] == "https://www.example.org/a.jpg" and "crawl.warc.gz#<urn:uuid:" in whale["source"]
    assert all(r["query"] in r["matched_queries"] for r in rows)
    assert len({r["url"] for r in rows}) == len(rows)
    assert (tmp_path / "out" / "query_counts.png").stat().st_size > 1000


def test_same_result_as_in_memory_and_independent_of_partitioning(inputs, tmp_path):
    _run(inputs, tmp_path / "w1", tmp_path / "o1", buckets=1, seed=3)
    _run(inputs, tmp_path / "w5", tmp_path / "o5", buckets=5, seed=3, tables=[str(inputs)])  # a folder
    one, five = _table(tmp_path / "o1"), _table(tmp_path / "o5")
    key = sorted((r["url"], r["text"], r["query"]) for r in one)
    assert key == sorted((r["url"], r["text"], r["query"]) for r in five)
    # The in-memory rule over the same matched pairs selects the same rows.
    matcher = QueryMatcher(QUERIES)
    pairs = []
    for path in [inputs / "part1.parquet"]:
        for i, r in enumerate(pq.read_table(path).to_pylist()):
            url, _ = normalize_url(r["URL"])
            if url and (m := matcher.match(r["TEXT"])):
                pairs.append(MatchedPair(url, r["TEXT"], f"{path}:{i}", tuple(m)))
    only_parquet = tmp_path / "o_pq"
    _run(
        inputs,
        tmp_path / "w_pq",
        only_parquet,
        buckets=2,
        seed=3,
        tables=[str(inputs / "part1.parquet")],
        warc=False,
    )
    expected = {(k.url, k.text, k.query) for k in balance_in_memory(pairs, 40, 3)}
    got = {(r["url"], r["text"], r["query"]) for r in _table(only_parquet)}
    assert got == expected


def test_finished_jobs_are_not_run_again(inputs, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    specs = plan_extract(
        work,
        [str(inputs / "queries.txt")],
        [str(inputs / "part1.parquet")],
        url_column="URL",
        text_column="TEXT",
        n_buckets=2,
    ).jobs
    cfg = ExecutorConfig(kind="processes", workers=1)
    run_extract_pass(specs, cfg)
    first = run_balance(work, out, 40, 0, cfg)
    stamps = {p: p.stat().st_mtime_ns for p in (*work.rglob("*.parquet"), *out.glob("part-*.parquet"))}
    assert run_balance(work, out, 40, 0, cfg) == first
    run_extract_pass(specs, cfg)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    with pytest.raises(ValueError, match="another plan"):
        plan_extract(work, [str(inputs / "queries.txt")], [str(inputs)], url_column="URL", text_column="TEXT")


def test_out_folder_of_another_selection_is_refused(inputs, tmp_path, capsys):
    # Finished select jobs are never re-run, so balancing into an out folder made with another t, seed or
    # extraction would silently keep the old part files under new stats; it must fail instead.
    work, out = tmp_path / "work", tmp_path / "out"
    _run(inputs, work, out, t=40, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other_work = tmp_path / "other_work"
    assert extract.main([*_extract_args(inputs, other_work), "--tables", str(inputs / "part1.parquet")]) == 0
    for work_dir, t, seed, made_with in [
        (work, 5, 0, "t = 40, seed = 0, not t = 5, seed = 0"),
        (work, 40, 1, "t = 40, seed = 0, not t = 40, seed = 1"),
        (other_work, 40, 0, "t = 40, seed = 0 from another extraction"),
    ]:
        capsys.readouterr()
        args = ["--work", str(work_dir), "--out", str(out), "--t", str(t), "--seed", str(seed)]
        assert balance.main(args) == 2
        err = capsys.readouterr().err
        assert made_with in err and "use a fresh --out folder or delete" in err
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}  # nothing touched
    # The same selection again is a no-op; another t into a fresh folder really applies the new t.
    assert balance.main(["--work", str(work), "--out", str(out), "--t", "40"]) == 0
    assert balance.main(["--work", str(work), "--out", str(tmp_path / "out5"), "--t", "5"]) == 0
    stats5 = json.loads((tmp_path / "out5" / "stats.json").read_text())
    assert stats5["t"] == 5 and 0 < max(c["kept"] for c in stats5["per_query"].values()) <= 5
    assert len(_table(tmp_path / "out5")) == stats5["totals"]["kept"]


def _extract_args(inputs, work) -> list[str]:
    columns = ["--url-column", "URL", "--text-column", "TEXT"]
    return ["--queries", str(inputs / "queries.txt"), *columns, "--work", str(work), "--workers", "1"]


@pytest.mark.parametrize(
    ("module", "flag", "value"),
    [
        (extract, "--per-host", "0"),  # would hang a crawl forever
        (extract, "--delay", "-1"),
        (extract, "--delay", "nan"),
        (extract, "--max-pages", "0"),
        (extract, "--max-depth", "-1"),
        (extract, "--workers", "0"),
        (extract, "--buckets", "0"),
        (extract, "--mem-gb", "0"),
        (extract, "--per-host", "two"),
        (balance, "--t", "0"),
        (balance, "--workers", "-2"),
        (balance, "--timeout-min", "0"),
        (balance, "--seed", str(2**63)),  # keys a 64-bit hash
    ],
)
def test_bad_numbers_fail_before_any_work(inputs, tmp_path, capsys, module, flag, value):
    if module is extract:
        args = [*_extract_args(inputs, tmp_path / "w"), "--tables", str(inputs / "part1.parquet")]
    else:  # refused while parsing, so even before the work folder is looked at
        args = ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        module.main([*args, f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and ("must be" in err or "expected an integer" in err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_submitit_local_executor_runs_the_passes_as_job_arrays(inputs, tmp_path):
    # submitit's "local" executor: each job is a real subprocess, launched as SLURM would run an array task.
    work, out = tmp_path / "work", tmp_path / "out"
    specs = plan_extract(
        work,
        [str(inputs / "queries.txt")],
        [str(inputs / "part1.parquet")],
        [str(inputs / "crawl.warc.gz")],
        url_column="URL",
        text_column="TEXT",
        n_buckets=2,
    ).jobs
    cfg = ExecutorConfig(kind="local", log_dir=str(tmp_path / "logs"), timeout_min=5)
    run_extract_pass(specs, cfg)
    stats = run_balance(work, out, 40, 0, cfg)
    check_accounting(stats)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert (tmp_path / "logs" / "count").is_dir()


def test_clear_errors_before_any_work(inputs, tmp_path, capsys):
    base = ["--work", str(tmp_path / "w"), "--url-column", "URL", "--text-column", "TEXT"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (
            ["--queries", str(tmp_path / "none.txt"), "--tables", str(inputs / "part1.parquet")],
            "query file not found",
        ),
        (["--queries", str(empty), "--tables", str(inputs / "part1.parquet")], "empty"),
        (
            ["--queries", str(inputs / "queries.txt"), "--tables", str(tmp_path / "no.parquet")],
            "input not found",
        ),
    ]
    for args, message in cases:
        assert extract.main(args + base) == 2
        assert message in capsys.readouterr().err
    bad_column = ["--queries", str(inputs / "queries.txt"), "--tables", str(inputs / "part1.parquet")]
    assert extract.main([*bad_column, "--work", str(tmp_path / "w"), "--url-column", "image"]) == 2
    assert "no column 'image'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert balance.main(["--work", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2


def test_live_crawl_through_the_cli(tmp_path, capsys):
    # A crawl is one more extract job: from a --seeds file (comments and blank lines ignored) through
    # matching and balancing, with its pages that give no rows counted in stats.json.
    site = tmp_path / "site"
    (site / "private").mkdir(parents=True)
    (site / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (site / "index.html").write_text(
        '<img src="/img/car.jpg" alt="A red car"><img src="img/dog.jpg" alt="a dog">'
        '<img src="img/none.jpg"><img src="img/sea.jpg" alt="only the sea">'
        '<a href="notes.txt">t</a><a href="photo.jpg">p</a><a href="missing.html">m</a>'
        '<a href="/private/x.html">x</a>'
    )
    (site / "notes.txt").write_text('<img src="x.jpg" alt="a dog in plain text">')
    (site / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    (site / "private" / "x.html").write_text('<img src="/img/secret.jpg" alt="a secret dog">')
    queries = tmp_path / "queries.txt"
    queries.write_text("dog\ncar\n")
    work, out, seeds = tmp_path / "work", tmp_path / "out", tmp_path / "seeds.txt"
    with serve(site) as (base, log):
        # A commented-out seed would be refused as "not an http(s) URL" (and crawled if it were one).
        seeds.write_text(f"# seeds of the test\n\n  {base}/index.html  \n# {base}/private/x.html\n")
        args = ["--queries", str(queries), "--seeds", str(seeds), "--work", str(work), "--delay", "0"]
        args += ["--max-pages", "50", "--user-agent", "cli-test/1", "--buckets", "2", "--workers", "1"]
        assert extract.main(args) == 0
    assert "extracted 4 rows: 2 matched, 1 unmatched, 1 rejected, 4 pages/records skipped;" in (
        capsys.readouterr().out
    )
    (job,) = json.loads((work / "plan.json").read_text())["jobs"]
    assert job["kind"] == "pages" and job["inputs"] == [f"{base}/index.html"]
    assert (job["crawl"]["delay_s"], job["crawl"]["max_pages"]) == (0.0, 50)
    paths = sorted(p for _, p, _ in log)
    assert paths == ["/index.html", "/missing.html", "/notes.txt", "/photo.jpg", "/robots.txt"]
    assert {ua for _, _, ua in log} == {"cli-test/1"}
    assert balance.main(["--work", str(work), "--out", str(out), "--t", "40", "--workers", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    check_accounting(stats)
    assert stats["skipped"] == {"http_404": 1, "not_html": 2, "robots_disallowed": 1}
    assert stats["rejected"] == {"img_without_text": 1}
    assert (stats["totals"]["rows"], stats["totals"]["unmatched"], stats["totals"]["kept"]) == (4, 1, 2)
    page = f"{base}/index.html"
    assert sorted((r["url"], r["text"], r["query"], r["source"]) for r in _table(out)) == [
        (f"{base}/img/car.jpg", "A red car", "car", f"{page}#img0"),
        (f"{base}/img/dog.jpg", "a dog", "dog", f"{page}#img1"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "No such file"),
        ("", "no seed URL in "),
        ("# only a comment\n\n", "no seed URL in "),
        ("www.example.com/index.html\n", "seeds.txt:1: not an absolute http(s) URL"),  # used to be lost
        ("# c\nhttp://[127.0.0.1/x.html\n", "seeds.txt:2: not an absolute http(s) URL"),
    ],
)
def test_bad_seed_file_fails_before_any_work(inputs, tmp_path, capsys, text, message):
    seeds = tmp_path / "seeds.txt"
    if text is not None:
        seeds.write_text(text)
    args = ["--queries", str(inputs / "queries.txt"), "--seeds", str(seeds), "--work", str(tmp_path / "w")]
    assert extract.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", [extract, balance])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "python -m data_pipelines." in capsys.readouterr().out
