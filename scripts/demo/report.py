"""The demo's report: PNG figures and one HTML page (OUT/report/index.html), and the printed summary.

Figures: training curves (from the run's metrics.csv), per-(shape, colour) counts in the source, after
query balancing and after download, the balancer's own per-query plot, confusion matrices of the
zero-shot classifiers on seen and unseen pairs, and a grid of example predictions.
"""

from __future__ import annotations

import html
import json
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import scenes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from clip_train.curves import load_runs, plot_curves
from clip_train.evaluation.plots import plot_confusion_matrix, plot_image_grid


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------- figures
def pair_counts(out: Path) -> dict[str, Counter]:
    """(shape, colour) → rows in the source, candidates kept by balancing, and samples downloaded."""
    truth = pq.read_table(out / "source" / "rows.parquet").to_pylist()
    by_url = {r["url"]: (r["shape"], r["colour"]) for r in truth}
    source = Counter(by_url[r["url"]] for r in truth)
    kept = Counter(
        by_url[u]
        for part in sorted((out / "candidates").glob("part-*.parquet"))
        for u in pq.read_table(part, columns=["url"]).column("url").to_pylist()
        if u in by_url
    )
    downloaded: Counter = Counter()
    for part in sorted((out / "shards").glob("shard-*.parquet")):
        table = pq.read_table(part, columns=["url", "status"]).to_pylist()
        downloaded.update(by_url[r["url"]] for r in table if r["status"] == "success" and r["url"] in by_url)
    return {"source": source, "balanced": kept, "downloaded": downloaded}


def plot_pair_counts(counts: dict[str, Counter], path: Path) -> Path:
    """Images per (shape, colour) pair, sorted by source frequency, before and after balancing."""
    pairs = sorted(counts["source"], key=lambda p: -counts["source"][p])
    fig = Figure(figsize=(13, 4))
    ax = fig.add_subplot()
    x = np.arange(len(pairs))
    for key, label, colour in (
        ("source", "source table (skewed)", "tab:grey"),
        ("balanced", "after query balancing", "tab:blue"),
        ("downloaded", "downloaded into shards", "tab:green"),
    ):
        ax.plot(
            x, [max(counts[key][p], 0.8) for p in pairs], marker="o", ms=3, lw=1, label=label, color=colour
        )
    ax.set_yscale("log")
    ax.set_xticks(x, labels=[f"{c} {s}" for s, c in pairs], rotation=90, fontsize=7)
    ax.set_ylabel("images")
    head, tail = counts["source"][pairs[0]], counts["source"][pairs[-1]]
    ax.set_title(
        f"images per (colour, shape) pair: the source's most common pair has {head}, its rarest {tail}; "
        f"{len(scenes.HELD_OUT)} pairs are never in the source",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def example_grid(
    results: dict[str, Any], labels: list[dict[str, Any]], path: Path, per_group: int = 8
) -> Path:
    """Held-out images (seen pairs first, then unseen) with the predicted shape and colour."""
    shape, colour = results["shape"], results["colour"]
    picks: list[int] = []
    rng = random.Random(0)  # the same examples every run, spread over shapes and colours
    for want_seen in (True, False):
        indices = [i for i, row in enumerate(labels) if row["seen"] == want_seen]
        picks += sorted(rng.sample(indices, min(per_group, len(indices))))
    images, captions = [], []
    for i in picks:
        ps, pc = shape.predictions[i], colour.predictions[i]
        ok = "✓" if ps == shape.labels[i] and pc == colour.labels[i] else "✗"
        images.append(Image.open(labels[i]["file"]).convert("RGB"))
        captions.append(
            f"{ok} {colour.classnames[pc]} ({colour.probabilities[i][pc]:.2f}) "
            f"{shape.classnames[ps]} ({shape.probabilities[i][ps]:.2f})\n"
            f"truth: {labels[i]['colour']} {labels[i]['shape']}{'' if labels[i]['seen'] else ' (unseen)'}"
        )
    return plot_image_grid(
        images,
        captions,
        path,
        columns=per_group,
        title="zero-shot predictions: top row seen pairs, bottom unseen",
    )


# --------------------------------------------------------------------------------------------- the page
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    out: Path,
    run_dir: Path,
    source: dict[str, Any],
    crawled: dict[str, Any],
    results: dict[str, Any],
    checks: list[tuple[str, float, str, bool]],
    seconds: dict[str, float],
) -> Path:
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    figures.append(
        (
            "Training curves",
            plot_curves(load_runs([run_dir]), folder / "training_curves.png").name,
        )
    )
    counts = pair_counts(out)
    figures.append(
        (
            "Images per (shape, colour) pair before and after balancing",
            plot_pair_counts(counts, folder / "pair_counts.png").name,
        )
    )
    balancer_plot = out / "candidates" / "query_counts.png"
    if balancer_plot.exists():
        shutil.copy(balancer_plot, folder / "query_counts.png")
        figures.append(
            ("Per-query counts before and after balancing (data_pipelines.balance)", "query_counts.png")
        )
    for attribute in ("shape", "colour"):
        r = results[attribute]
        for part in ("seen", "unseen"):
            name = f"confusion_{attribute}_{part}.png"
            plot_confusion_matrix(
                np.array(r.confusion[part]),
                r.classnames,
                folder / name,
                title=f"{attribute}, {part} pairs: accuracy {r.accuracy[part]:.1%}",
            )
            figures.append((f"Confusion matrix: {attribute} on {part} (shape, colour) pairs", name))
    figures.append(
        ("Example predictions", example_grid(results, source["labels"], folder / "examples.png").name)
    )

    candidates, manifest = crawled["candidates"], crawled["manifest"]
    summary = {
        "accuracy": {a: r.accuracy for a, r in results.items()},
        "targets": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks],
        "stage_seconds": seconds,
        "source": {k: v for k, v in source.items() if k != "labels"},
        "balancing": candidates.get("totals", {}),
        "download_status_counts": manifest.get("status_counts", {}),
        "num_train_samples": manifest.get("num_samples"),
        "pairs": {f"{c} {s}": {k: counts[k][(s, c)] for k in counts} for s, c in sorted(counts["source"])},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))

    targets = _table(
        ("zero-shot accuracy on held-out images", "value", "target", "met"),
        [(w, f"{v:.1%}", t, "yes" if m else "NO") for w, v, t, m in checks],
    )
    stages = _table(
        ("stage", "seconds"),
        [*((k, f"{v:.0f}") for k, v in seconds.items()), ("total", f"{sum(seconds.values()):.0f}")],
    )
    totals = candidates.get("totals", {})
    crawl = _table(
        ("crawl", "count"),
        [
            ("source table rows", source["rows"]),
            ("rejected by extraction", totals.get("rejected", "")),
            ("matched no query", totals.get("unmatched", "")),
            ("duplicates", totals.get("duplicates", "")),
            ("dropped by balancing", totals.get("dropped_by_balancing", "")),
            ("kept as candidates", totals.get("kept", "")),
            *((f"download: {k}", v) for k, v in sorted(manifest.get("status_counts", {}).items())),
            ("training samples (shards)", manifest.get("num_samples", "")),
        ],
    )
    images = "".join(
        f'<h2>{html.escape(title)}</h2><img src="{html.escape(name)}" alt="{html.escape(title)}">'
        for title, name in figures
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>clip_train demo report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}}
table{{border-collapse:collapse;margin:0.5em 1em 1em 0;display:inline-table;vertical-align:top}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>clip_train embedded demo</h1>
<p>A small CLIP trained on the CPU on procedural scenes crawled from a local website with the query-balanced
crawler, evaluated zero-shot on held-out images: {len(scenes.SHAPES)} shapes × {len(scenes.COLOURS)} colours,
of which {len(scenes.HELD_OUT)} (shape, colour) pairs never occur in training:
{html.escape(", ".join(f"{c} {s}" for s, c in sorted(scenes.HELD_OUT)))}.</p>
{targets}{stages}{crawl}
{images}
</body></html>
"""
    index = folder / "index.html"
    index.write_text(page)
    return index


# ------------------------------------------------------------------------------------------ the summary
def print_summary(
    results: dict[str, Any],
    checks: list[tuple[str, float, str, bool]],
    seconds: dict[str, float],
    total: float,
    report: Path,
) -> None:
    print("\n" + "=" * 78)
    print("clip_train demo: zero-shot accuracy on held-out images")
    print(f"  {'':28}{'seen pairs':>12}{'unseen pairs':>14}{'all':>8}")
    for attribute, r in results.items():
        a = r.accuracy
        print(f"  {attribute:28}{a['seen']:>12.1%}{a['unseen']:>14.1%}{a['all']:>8.1%}")
    print("targets:")
    for what, value, target, met in checks:
        print(f"  {'met ' if met else 'MISS'}  {what:22} {value:6.1%}  (target {target})")
    print(
        "time per stage: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + f"; total {total / 60:.1f} min"
    )
    print(f"report: {report}")


if __name__ == "__main__":
    raise SystemExit(
        f"{__file__} is a module of scripts/demo/run_demo.py; run that instead (--help for its options)"
    )
