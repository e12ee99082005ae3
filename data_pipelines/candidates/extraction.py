"""Source events → URL-normalised, query-matched pairs, with every row counted in a Tally."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .balancing import MatchedPair
from .matching import QueryMatcher
from .records import Candidate, Rejected, SourceEvent
from .stats import Tally
from .urls import normalize_url


def match_events(events: Iterable[SourceEvent], matcher: QueryMatcher, tally: Tally) -> Iterator[MatchedPair]:
    """The matched pairs among ``events``; rejections, skips and unmatched rows go into ``tally``."""
    queries = matcher.queries
    for event in events:
        if type(event) is Candidate:
            tally.rows += 1
            url, reason = normalize_url(event.url)
            if url is None:
                tally.rejected[reason] += 1
                continue
            ids = matcher.match_ids(event.text)
            if not ids:
                tally.unmatched += 1
                continue
            tally.matched += 1
            yield MatchedPair(url, event.text, event.source, tuple(sorted(queries[i] for i in ids)))
        elif type(event) is Rejected:
            tally.rows += 1
            tally.rejected[event.reason] += 1
        else:
            tally.skipped[event.reason] += 1
