"""Image-URL normalisation: one canonical spelling per URL, or a rejection reason.

Canonical form: scheme and host lower-cased, host IDNA-encoded, default port removed, empty path written
"/", unsafe characters percent-encoded, fragment dropped (it never reaches the server). Query strings are
kept as they are: image CDNs use them to pick the image.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

MAX_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = "/?%:@!$&'()*+,;=-._~"


def normalize_url(raw: object, base: str | None = None) -> tuple[str | None, str | None]:
    """``(canonical URL, None)`` or ``(None, reason)``; relative URLs are resolved against ``base``."""
    if not isinstance(raw, str):
        return None, "missing_url" if raw is None else "non_string_url"
    url = raw.strip()
    if not url:
        return None, "empty_url"
    if url[:5].lower() == "data:":
        return None, "data_uri"
    if len(url) > MAX_URL_CHARS:
        return None, "url_too_long"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in url):  # interior spaces are percent-encoded below
        return None, "invalid_url"
    try:
        if base is not None:
            url = urljoin(base, url)
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None, "invalid_url"
    scheme = parts.scheme.lower()
    if not scheme:
        return None, "relative_url_without_base"
    if scheme not in _DEFAULT_PORTS:
        return None, "non_http_scheme"
    if parts.username is not None or parts.password is not None:
        return None, "url_with_credentials"
    host = _canonical_host(parts.hostname)
    if host is None:
        return None, "invalid_host"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_QUERY_SAFE)
    out = urlunsplit((scheme, netloc, path, query, ""))
    if len(out) > MAX_URL_CHARS:
        return None, "url_too_long"
    return out, None


def _canonical_host(host: str | None) -> str | None:
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    host = host.rstrip(".")
    if "." not in host:  # "http://images/x.jpg" cannot name a public web host
        return None
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = ascii_host.split(".")
    if any(not label or len(label) > 63 for label in labels) or len(ascii_host) > 253:
        return None
    if not all(ch.isalnum() or ch in "-_" for label in labels for ch in label):
        return None
    return ascii_host.lower()
