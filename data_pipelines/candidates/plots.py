"""Per-query counts before and after balancing, on log–log axes (the head/tail picture of CLIP/MetaCLIP)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_query_counts(per_query: dict[str, dict[str, int]], t: int, path: Path) -> Path:
    """Rank–count curves of matched and kept pairs per query (queries sorted by count, descending)."""
    matched = sorted((c["matched"] for c in per_query.values()), reverse=True)
    kept = sorted((c["kept"] for c in per_query.values() if c["kept"] > 0), reverse=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    if matched:
        ax.loglog(range(1, len(matched) + 1), matched, label="matched (before balancing)", lw=1.6)
    if kept:
        ax.loglog(range(1, len(kept) + 1), kept, label="kept for the query (after)", lw=1.6)
    ax.axhline(t, color="grey", ls="--", lw=1, label=f"t = {t:,}")
    ax.set_xlabel("query rank")
    ax.set_ylabel("pairs per query")
    ax.set_title(f"{len(matched):,} matched queries, {sum(kept):,} pairs kept")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
