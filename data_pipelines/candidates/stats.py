"""Row accounting and the stats JSON.

Every input row ends in exactly one of: ``rejected[reason]`` (source or URL checks), ``unmatched`` (no
query in its text), ``duplicates[reason]``, ``dropped_by_balancing``, ``kept``; ``check_accounting``
asserts that they sum to ``rows``. ``skipped`` counts pages and records that produced no rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    rows: int = 0
    matched: int = 0
    unmatched: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.rows += other.rows
        self.matched += other.matched
        self.unmatched += other.unmatched
        self.rejected.update(other.rejected)
        self.skipped.update(other.skipped)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "rejected": dict(sorted(self.rejected.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tally:
        return cls(d["rows"], d["matched"], d["unmatched"], Counter(d["rejected"]), Counter(d["skipped"]))


def build_stats(
    tally: Tally,
    duplicates: Counter[str],
    matched_per_query: Counter[str],
    kept_per_query: Counter[str],
    t: int,
    seed: int,
    n_queries: int,
    queries_dropped: dict[str, int] | None = None,
) -> dict:
    """The stats JSON: totals, every rejection reason with its count, per-query matched and kept, and
    the query lines that never became queries (``queries_dropped``, by reason)."""
    queries_dropped = dict(sorted((queries_dropped or {}).items()))
    kept = sum(kept_per_query.values())
    dropped = tally.matched - sum(duplicates.values()) - kept
    per_query = {
        q: {"matched": n, "kept": kept_per_query.get(q, 0)} for q, n in sorted(matched_per_query.items())
    }
    return {
        "t": t,
        "seed": seed,
        "totals": {
            "rows": tally.rows,
            "rejected": sum(tally.rejected.values()),
            "unmatched": tally.unmatched,
            "duplicates": sum(duplicates.values()),
            "dropped_by_balancing": dropped,
            "kept": kept,
            "queries": n_queries,
            "queries_dropped": sum(queries_dropped.values()),
            "queries_matched": len(matched_per_query),
            "queries_at_limit": sum(1 for n in kept_per_query.values() if n >= t),
        },
        "rejected": dict(sorted(tally.rejected.items())),
        "duplicates": dict(sorted(duplicates.items())),
        "skipped": dict(sorted(tally.skipped.items())),
        "queries_dropped": queries_dropped,
        "per_query": per_query,
    }


def check_accounting(stats: dict) -> None:
    """Raise AssertionError unless every row is accounted for exactly once."""
    t = stats["totals"]
    parts = t["rejected"] + t["unmatched"] + t["duplicates"] + t["dropped_by_balancing"] + t["kept"]
    if parts != t["rows"] or t["dropped_by_balancing"] < 0:
        raise AssertionError(f"row accounting does not add up: {parts} accounted for, {t['rows']} read")
