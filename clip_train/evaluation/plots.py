"""PNG figures of evaluation results: confusion matrix, per-class accuracy, and image grids for retrieval
and search results.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing depends on a display or on
pyplot's global figure state, and this is safe to call from any thread or a training callback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

_MAX_TICK_LABELS = 60  # beyond this many classes, tick labels are dropped (unreadable anyway)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_confusion_matrix(
    confusion: Tensor | np.ndarray, classnames: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (row = true class, column = predicted), counts written in the cells
    when there are at most 20 classes. Returns the path of the PNG."""
    counts = np.asarray(confusion, dtype=np.int64)
    c = counts.shape[0]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.35 * c, 24)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    shown = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= _MAX_TICK_LABELS:
        ax.set_xticks(range(c), labels=classnames, rotation=90, fontsize=8)
        ax.set_yticks(range(c), labels=classnames, fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    colour = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({counts.sum()} images, {c} classes)")
    return _save(fig, path)


def plot_per_class_accuracy(
    recall: Sequence[float], classnames: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Horizontal bars of each class's recall (fraction of its images classified correctly), sorted from
    worst to best; classes without images are left out. Returns the path of the PNG."""
    pairs = sorted(
        ((r, n) for r, n in zip(recall, classnames, strict=True) if not math.isnan(r)), key=lambda p: p[0]
    )
    fig = Figure(figsize=(7, min(3 + 0.22 * len(pairs), 40)))
    ax = fig.add_subplot()
    values = [p[0] for p in pairs]
    ax.barh(range(len(pairs)), values, color="tab:blue")
    ax.set_yticks(range(len(pairs)), labels=[p[1] for p in pairs], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (recall of the class)")
    mean = float(np.mean(values)) if values else float("nan")
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
    ax.legend(loc="lower right")
    ax.set_title(title or "per-class accuracy")
    return _save(fig, path)


def plot_image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    path: str | Path,
    *,
    columns: int = 4,
    title: str = "",
) -> Path:
    """A grid of images, each with its caption (e.g. a search result's rank and score). Returns the path."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    columns = max(1, min(columns, len(images) or 1))
    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(2.6 * columns, 2.8 * rows + (0.4 if title else 0)))
    for i in range(rows * columns):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        if i < len(images):
            ax.imshow(np.asarray(images[i].convert("RGB")))
            ax.set_title(captions[i], fontsize=8, wrap=True)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
