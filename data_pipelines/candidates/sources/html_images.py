"""Images (URL, alt text) and links of one HTML page, with the standard library's tolerant parser.

Lazy-loading pages put the real image URL in a data attribute and a placeholder (often a ``data:`` URI)
in ``src``; the lazy attributes are therefore read first. Relative URLs are resolved against the page's
``<base href>`` or the page URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin

from ..records import Candidate, Rejected, Skipped, SourceEvent, clean_text

_LAZY_ATTRS = ("data-src", "data-lazy-src", "data-original", "data-lazy", "data-url")
_SRCSET_ATTRS = ("srcset", "data-srcset")


@dataclass
class PageImages:
    images: list[tuple[str | None, str | None]] = field(default_factory=list)  # (absolute src, alt or title)
    links: list[str] = field(default_factory=list)  # absolute hrefs


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.imgs: list[dict[str, str | None]] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")


def image_src(attrs: dict[str, str | None]) -> str | None:
    """The image URL an ``<img>`` element shows once loaded (lazy attributes first, then src, srcset)."""
    for name in (*_LAZY_ATTRS, "src"):
        value = (attrs.get(name) or "").strip()
        if value and not value.lower().startswith("data:"):
            return value
    for name in _SRCSET_ATTRS:
        first = (attrs.get(name) or "").strip().split(",")[0].split()
        if first:
            return first[0]
    return (attrs.get("src") or "").strip() or None  # a data: URI, rejected (and counted) downstream


def extract_images(html: str, page_url: str) -> PageImages:
    """Every ``<img>`` of the page as (absolute URL or None, alt text, else title, else None), and every
    ``<a href>`` as an absolute URL. Raises only on input the parser cannot read at all."""
    parser = _Parser()
    parser.feed(html)
    parser.close()
    try:
        base = urljoin(page_url, parser.base) if parser.base else page_url
    except ValueError:
        base = page_url
    page = PageImages()
    for attrs in parser.imgs:
        src = image_src(attrs)
        text = (attrs.get("alt") or "").strip() or (attrs.get("title") or "").strip() or None
        page.images.append((_join(base, src), text))
    page.links = [u for href in parser.hrefs if (u := _join(base, href)) is not None]
    return page


def _join(base: str, url: str | None) -> str | None:
    if url is None:
        return None
    try:
        return urljoin(base, url)
    except ValueError:  # e.g. an unterminated IPv6 literal; normalize_url will reject the raw string
        return url


def page_events(html: str, page_url: str, source: str) -> Iterator[SourceEvent]:
    """One Candidate or Rejected per ``<img>`` of the page (provenance "source#img<i>"); a Skipped when
    the page cannot be parsed at all."""
    try:
        page = extract_images(html, page_url)
    except Exception as e:  # html.parser is tolerant, but garbage must never stop a whole file
        yield Skipped("html_parse_error", f"{source}: {type(e).__name__}")
        return
    for i, (url, alt) in enumerate(page.images):
        where = f"{source}#img{i}"
        if url is None:
            yield Rejected("img_without_src", where)
            continue
        if alt is None:
            yield Rejected("img_without_text", where)
            continue
        text, reason = clean_text(alt)
        yield Rejected(reason, where) if text is None else Candidate(url, text, where)
