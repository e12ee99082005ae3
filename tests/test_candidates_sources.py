"""Candidate sources on real files: parquet, gzip CSV, TSV, JSONL (plain and gzip), a warcio-written WARC;
URL normalisation; bad input skipped and counted by reason, never a crash."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from candidates_support import write_gzip_csv, write_warc

from data_pipelines.candidates.records import Candidate, Rejected, Skipped
from data_pipelines.candidates.sources.html_images import extract_images, page_events
from data_pipelines.candidates.sources.tables import check_tables, expand_paths, iter_table, table_format
from data_pipelines.candidates.sources.warc import iter_warc
from data_pipelines.candidates.urls import normalize_url

BASE = "https://site.example.com/blog/post.html"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM:80/a b.jpg?x=1#frag", ("http://example.com/a%20b.jpg?x=1", None)),
        ("https://example.com:443", ("https://example.com/", None)),
        ("//cdn.example.org/i.jpg", ("https://cdn.example.org/i.jpg", None)),
        ("../img/cat.png", ("https://site.example.com/img/cat.png", None)),
        ("http://münchen.example.de/x.jpg", ("http://xn--mnchen-3ya.example.de/x.jpg", None)),
        ("javascript:void(0)", (None, "non_http_scheme")),
        ("ftp://example.com/x.jpg", (None, "non_http_scheme")),
        ("data:image/png;base64,iVBOR", (None, "data_uri")),
        ("http://images/x.jpg", (None, "invalid_host")),
        ("http://user:pw@example.com/x.jpg", (None, "url_with_credentials")),
        ("http://example.com:99999/x.jpg", (None, "invalid_url")),
        ("http://exa\nmple.com/x.jpg", (None, "invalid_url")),
        ("http://example.com/" + "a" * 3000, (None, "url_too_long")),
        ("   ", (None, "empty_url")),
    ],
)
def test_normalize_url(raw, expected):
    assert normalize_url(raw, BASE) == expected


def test_relative_url_without_base_is_rejected():
    assert normalize_url("/x.jpg") == (None, "relative_url_without_base")


def _by_type(events):
    return (
        [e for e in events if isinstance(e, Candidate)],
        Counter(e.reason for e in events if isinstance(e, Rejected)),
        Counter(e.reason for e in events if isinstance(e, Skipped)),
    )


def test_parquet_rows_and_bad_values(tmp_path):
    path = tmp_path / "a.parquet"
    rows = [
        {"URL": "http://a.example.com/1.jpg", "TEXT": "a dog"},
        {"URL": None, "TEXT": "no url"},
        {"URL": "http://a.example.com/2.jpg", "TEXT": None},
        {"URL": "http://a.example.com/3.jpg", "TEXT": "   "},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    candidates, rejected, skipped = _by_type(list(iter_table(path, "URL", "TEXT")))
    assert candidates == [Candidate("http://a.example.com/1.jpg", "a dog", f"{path}:0")]
    assert rejected == {"missing_url": 1, "missing_text": 1, "empty_text": 1}
    assert not skipped


def test_gzip_csv_with_malformed_and_undecodable_rows(tmp_path):
    body = (
        "url,caption\n"
        "http://a.example.com/1.jpg,a red dog\n"
        'http://a.example.com/2.jpg,"quoted, with comma"\n'
        "http://a.example.com/3.jpg,too,many,fields\n"
        "http://a.example.com/4.jpg,bad \udcff byte\n"  # an invalid UTF-8 byte in the file
    )
    path = write_gzip_csv(tmp_path / "b.csv.gz", body)
    events = list(iter_table(path, "url", "caption"))
    candidates, rejected, _ = _by_type(events)
    assert [c.text for c in candidates] == ["a red dog", "quoted, with comma"]
    assert rejected == {"malformed_row": 1, "undecodable_text": 1}
    assert len(events) == 4  # one event per row


def test_jsonl_with_garbage_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"u": "http://a.example.com/1.jpg", "t": "cat"})
        + "\n{not json\n[1, 2]\n"
        + json.dumps({"u": "http://a.example.com/2.jpg", "t": 42})
        + "\n"
    )
    candidates, rejected, _ = _by_type(list(iter_table(path, "u", "t")))
    assert [c.text for c in candidates] == ["cat"]
    assert rejected == {"malformed_row": 2, "non_string_text": 1}


def test_tsv_keeps_commas_and_counts_short_rows(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text(
        "id\tcaption\turl\n"
        "1\ta dog, a cat\thttp://a.example.com/1.jpg\n"
        "2\tmissing its url\n"  # one field short
        "3\t\thttp://a.example.com/3.jpg\n"
    )
    check_tables([path], "url", "caption")
    candidates, rejected, _ = _by_type(list(iter_table(path, "url", "caption")))
    assert candidates == [Candidate("http://a.example.com/1.jpg", "a dog, a cat", f"{path}:0")]
    assert rejected == {"malformed_row": 1, "empty_text": 1}


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "e.jsonl.gz"
    lines = [{"u": "http://a.example.com/1.jpg", "t": "Grüße aus Köln"}, {"u": None, "t": "x"}, {"t": "y"}]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines) + "\n{broken\n")
    check_tables([path], "u", "t")
    candidates, rejected, _ = _by_type(list(iter_table(path, "u", "t")))
    assert [(c.url, c.text) for c in candidates] == [("http://a.example.com/1.jpg", "Grüße aus Köln")]
    assert rejected == {"missing_url": 2, "malformed_row": 1}


def test_gzip_parquet_is_refused_before_work(tmp_path):
    # Parquet needs random access; a .parquet.gz used to be accepted and then fail (or be lost) mid-run.
    with pytest.raises(ValueError, match="gzip-compressed parquet"):
        table_format(tmp_path / "a.parquet.gz")
    assert table_format(tmp_path / "a.TSV.gz") == "tsv" and table_format("b.ndjson") == "jsonl"


def test_truncated_gzip_is_counted(tmp_path):
    good = write_gzip_csv(tmp_path / "g.csv.gz", "url,text\n" + "http://a.example.com/x.jpg,dog\n" * 2000)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(good.read_bytes()[:-40])
    events = list(iter_table(cut, "url", "text"))
    assert isinstance(events[-1], Skipped) and events[-1].reason == "truncated_file"


def test_missing_column_and_missing_file_fail_before_work(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"url": ["http://a.example.com/x.jpg"], "caption": ["x"]}), path)
    with pytest.raises(ValueError, match="no column 'text'"):
        check_tables([path], "url", "text")
    csv_path = write_gzip_csv(tmp_path / "b.csv.gz", "URL,TEXT\n")
    with pytest.raises(ValueError, match="no column 'url'"):
        check_tables([csv_path], "url", "TEXT")
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand_paths([tmp_path / "nope.parquet"], (".parquet",))
    assert expand_paths([tmp_path], (".parquet", ".csv")) == [path, csv_path]


PAGE = """<!doctype html><html><head><title>t</title></head><body>
<img src="/img/dog.jpg" alt="A  dog
 on grass">
<img src="data:image/gif;base64,R0lGOD" data-src="lazy/cat.jpg" alt="lazy cat">
<img srcset="big.jpg 2x, small.jpg 1x" title="title only">
<img src="https://other.example.org/bird.png">
<img alt="no source at all">
<img src="javascript:alert(1)" alt="script">
<a href="/next.html">next</a><a href="https://elsewhere.example.net/">away</a>
<p>unclosed <div><b>garbage &bogus; <<<>>> </i></body>"""


def test_html_images_lazy_load_and_relative_urls():
    page = extract_images(PAGE, BASE)
    assert page.images == [
        ("https://site.example.com/img/dog.jpg", "A  dog\n on grass"),
        ("https://site.example.com/blog/lazy/cat.jpg", "lazy cat"),
        ("https://site.example.com/blog/big.jpg", "title only"),
        ("https://other.example.org/bird.png", None),
        (None, "no source at all"),
        ("javascript:alert(1)", "script"),
    ]
    assert page.links == ["https://site.example.com/next.html", "https://elsewhere.example.net/"]
    events = list(page_events(PAGE, BASE, "p"))
    candidates, rejected, _ = _by_type(events)
    assert [c.text for c in candidates][:2] == ["A dog on grass", "lazy cat"]
    assert rejected == {"img_without_text": 1, "img_without_src": 1}


def test_base_href_is_honoured():
    page = extract_images('<base href="https://cdn.example.com/a/"><img src="b.jpg" alt="x">', BASE)
    assert page.images == [("https://cdn.example.com/a/b.jpg", "x")]


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        # A tag still open at the end of the input is no element (as in a browser): no image, no event.
        ("\x00\x01\x02<img", []),
        ("<img src=", []),
        ("<img alt='x' src='y", []),
        ("<<<<>>>" * 50, []),
        ("", []),
        # Closed but broken <img> elements: one counted rejection each, never a silent loss.
        ("<img src=>", [Rejected("img_without_src", "g#img0")]),
        ("<img src= alt=x>", [Rejected("img_without_text", "g#img0")]),  # src is the text "alt=x"
        ("<img/src=a.jpg/alt=dog>", [Rejected("img_without_text", "g#img0")]),  # src "a.jpg/alt=dog"
        ("<<img src=a.jpg alt=dog>>", [Candidate("https://site.example.com/blog/a.jpg", "dog", "g#img0")]),
        ("</img src=a.jpg alt=x>", []),  # an end tag, not an image
    ],
)
def test_garbage_html_gives_exactly_its_events(garbage, expected):
    assert list(page_events(garbage, BASE, "g")) == expected


# html.parser raises (AssertionError from _markupbase) on a "<![" section with an unknown keyword;
# newer Python versions may read it as a bogus comment instead.
UNPARSABLE = '<img src="a.jpg" alt="before"><![bogus x]]><img src="b.jpg" alt="after">'


def test_unparsable_page_is_one_counted_skip():
    try:  # asks the standard library itself, so that the check does not depend on the code under test
        HTMLParser().feed(UNPARSABLE)
    except AssertionError:
        stdlib_raises = True
    else:
        stdlib_raises = False
    events = list(page_events(UNPARSABLE, BASE, "g"))
    if stdlib_raises:  # the whole page is one counted skip, never a crash of the file or crawl
        assert events == [Skipped("html_parse_error", "g: AssertionError")]
    else:
        assert [(e.url, e.text) for e in events] == [
            ("https://site.example.com/blog/a.jpg", "before"),
            ("https://site.example.com/blog/b.jpg", "after"),
        ]


def test_warc_written_with_warcio(tmp_path):
    path = write_warc(
        tmp_path / "a.warc.gz",
        [
            ("https://site.example.com/a/page.html", PAGE),
            ("https://site.example.com/b.html", '<img src="x.jpg" alt="b">'),
        ],
    )
    candidates, rejected, skipped = _by_type(list(iter_warc(path)))
    urls = {c.url for c in candidates}
    assert "https://site.example.com/img/dog.jpg" in urls  # root-relative, resolved against the record URI
    assert "https://site.example.com/a/lazy/cat.jpg" in urls
    assert "https://site.example.com/x.jpg" in urls
    assert all("<urn:uuid:" in c.source for c in candidates)
    assert rejected == {"img_without_text": 1, "img_without_src": 1}
    assert not skipped


def test_broken_warc_record_is_counted(tmp_path):
    good = write_warc(
        tmp_path / "good.warc.gz", [("https://site.example.com/p.html", '<img src="x.jpg" alt="x">')] * 3
    )
    data = good.read_bytes()
    broken = tmp_path / "broken.warc.gz"
    broken.write_bytes(data[: len(data) // 2] + b"\x00garbage\x00" * 20)
    candidates, _, skipped = _by_type(list(iter_warc(broken)))
    assert sum(skipped.values()) == 1 and set(skipped) <= {"warc_broken_record", "warc_record_unreadable"}
    assert len(candidates) >= 1


def test_wat_links(tmp_path):
    import io

    from warcio.warcwriter import WARCWriter

    meta = {
        "Envelope": {
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {
                    "HTML-Metadata": {
                        "Links": [
                            {"path": "IMG@/src", "url": "/i/dog.jpg", "alt": "dog"},
                            {"path": "IMG@/src", "url": "/i/none.jpg"},
                            {"path": "A@/href", "url": "/other"},
                        ]
                    }
                }
            }
        }
    }
    path = tmp_path / "a.wat.gz"
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        rec = w.create_warc_record(
            "https://site.example.com/p.html",
            "metadata",
            payload=io.BytesIO(json.dumps(meta).encode()),
            warc_content_type="application/json",
        )
        w.write_record(rec)
    candidates, rejected, _ = _by_type(list(iter_warc(path)))
    assert [(c.url, c.text) for c in candidates] == [("https://site.example.com/i/dog.jpg", "dog")]
    assert rejected == {"img_without_text": 1}
