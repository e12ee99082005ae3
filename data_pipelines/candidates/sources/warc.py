"""Common Crawl WARC files (HTML responses) and WAT files (link metadata), read with warcio.

WARC: every ``response`` (or ``resource``) record with an HTML payload is parsed for ``<img>`` elements.
WAT: every JSON ``metadata`` record's ``HTML-Metadata.Links`` entries with path ``IMG@/src`` give the
image URL and its ``alt``. Relative URLs are resolved against the record's target URI (or the page's
``<base href>``). Provenance is "path#<WARC-Record-ID>".

A record that cannot be read is skipped and counted; a broken record that stops warcio's reader
(a corrupt gzip member, a bad header) ends the file, counted as ``warc_broken_record`` with its offset.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

from warcio.archiveiterator import ArchiveIterator

from ..records import Candidate, Rejected, Skipped, SourceEvent, clean_text
from .html_images import page_events

WARC_SUFFIXES = (".warc", ".wat", ".arc")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_MAX_PAYLOAD_BYTES = 8 << 20
_CHARSET = re.compile(rb"""charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def iter_warc(path: Path) -> Iterator[SourceEvent]:
    with open(path, "rb") as f:
        records = ArchiveIterator(f)
        try:
            for record in records:
                rid = record.rec_headers.get_header("WARC-Record-ID") or f"offset {records.offset}"
                try:
                    yield from _record_events(record, f"{path}#{rid}")
                except Exception as e:  # one unreadable payload (bad chunking, bad JSON) skips one record
                    yield Skipped("warc_record_unreadable", f"{path}#{rid}: {type(e).__name__}")
        except Exception as e:  # warcio cannot resynchronise after a corrupt record: the rest is lost
            yield Skipped("warc_broken_record", f"{path}@{records.offset}: {type(e).__name__}: {e}")
            return
        # A truncated or garbled record can end warcio's iteration quietly: only a warning on stderr
        # (err_count) or bytes left unread tell; count it rather than lose the rest of the file silently.
        if records.err_count or f.read(1):
            yield Skipped(
                "warc_broken_record", f"{path}@{records.offset}: stopped before the end of the file"
            )


def _record_events(record, source: str) -> Iterator[SourceEvent]:
    target = record.rec_headers.get_header("WARC-Target-URI")
    if record.rec_type in ("response", "resource"):
        ctype = (
            (record.http_headers.get_header("Content-Type") if record.http_headers else None)
            or record.rec_headers.get_header("Content-Type")
            or ""
        )
        if not ctype.lower().startswith(_HTML_TYPES) or not target:
            return  # images, scripts, robots.txt: not pages, not candidate rows
        payload = record.content_stream().read(_MAX_PAYLOAD_BYTES)
        yield from page_events(_decode(payload, ctype), target, source)
    elif record.rec_type == "metadata" and "json" in (record.rec_headers.get_header("Content-Type") or ""):
        yield from _wat_events(json.loads(record.content_stream().read()), target, source)


def _decode(payload: bytes, content_type: str) -> str:
    m = _CHARSET.search(content_type.encode("latin-1", "replace")) or _CHARSET.search(payload[:2048])
    encoding = m.group(1).decode("ascii") if m else "utf-8"
    try:
        return payload.decode(encoding, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("utf-8", errors="replace")


def _wat_events(meta: dict, target: str | None, source: str) -> Iterator[SourceEvent]:
    html = (
        meta.get("Envelope", {})
        .get("Payload-Metadata", {})
        .get("HTTP-Response-Metadata", {})
        .get("HTML-Metadata")
    )
    if not html or not target:
        return
    base = html.get("Head", {}).get("Base") or target
    try:
        base = urljoin(target, base)
    except ValueError:
        base = target
    for i, link in enumerate(html.get("Links", [])):
        if not isinstance(link, dict) or link.get("path") != "IMG@/src":
            continue
        where = f"{source}#img{i}"
        url, alt = link.get("url"), link.get("alt") or link.get("title")
        if not isinstance(url, str) or not url.strip():
            yield Rejected("img_without_src", where)
            continue
        if alt is None:
            yield Rejected("img_without_text", where)
            continue
        text, reason = clean_text(alt)
        if text is None:
            yield Rejected(reason, where)
            continue
        with contextlib.suppress(ValueError):  # normalize_url rejects what urljoin cannot resolve
            url = urljoin(base, url.strip())
        yield Candidate(url, text, where)
