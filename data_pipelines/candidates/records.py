"""The three events a candidate source yields, and the checks every candidate text goes through.

Every source yields, for each input row, exactly one ``Candidate`` or one ``Rejected``; a page or record
that produced no rows at all (a fetch error, a non-HTML WARC record) yields a ``Skipped``. Counting these
events is how the pipeline accounts for every input row.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_TEXT_CHARS = 4096


class Candidate(NamedTuple):
    url: str  # absolute, not yet normalised
    text: str
    source: str  # provenance: "file:row", "warc:record-id", "page URL"


class Rejected(NamedTuple):
    """An input row dropped for ``reason``."""

    reason: str
    source: str


class Skipped(NamedTuple):
    """A page or record that yielded no rows (so it is not a row itself), counted by ``reason``."""

    reason: str
    source: str


SourceEvent = Candidate | Rejected | Skipped


def clean_text(text: object) -> tuple[str | None, str | None]:
    """Whitespace-collapsed text, or ``(None, reason)`` when the text cannot be used."""
    if text is None:
        return None, "missing_text"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "undecodable_text"
    if not isinstance(text, str):
        return None, "non_string_text"
    # U+FFFD comes from a lossy decode upstream; lone surrogates from errors="surrogateescape".
    if "\ufffd" in text or not _encodable(text):
        return None, "undecodable_text"
    text = " ".join(text.split())
    if not text:
        return None, "empty_text"
    if len(text) > MAX_TEXT_CHARS:
        return None, "text_too_long"
    return text, None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
