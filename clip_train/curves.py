"""`python -m clip_train.curves`: the training curves of one run, or of every job of a sweep, in one PNG,
with a table of where each run ended.

    python -m clip_train.curves runs/vit_b32                     # -> runs/vit_b32/curves.png
    python -m clip_train.curves runs/vit_b32-sweep               # every job of the sweep, overlaid
    python -m clip_train.curves runs/a runs/b --smooth 50 --out a_vs_b.png

A run directory is one with logs/metrics.csv (the CSV logger, the default); a folder of such directories
(a sweep) stands for all of them. Runs are labelled by the overrides that tell them apart (a sweep's swept
values, from each job's .hydra/overrides.yaml), otherwise by their directory names.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clip_train.training.loggers import read_metrics

METRICS = Path("logs") / "metrics.csv"
# (metric, panel title, log-scale y axis, noisy); a panel is drawn when some run logged its metric. Noisy
# per-batch metrics are drawn under a trailing mean; the schedule and the temperature are smooth already.
PANELS = (
    ("train/loss", "training loss", False, True),
    ("val/loss", "validation loss", False, False),
    ("train/image_to_text_accuracy", "in-batch image→text accuracy", False, True),
    ("train/logit_scale", "logit scale (1/temperature)", False, False),
    ("train/lr", "learning rate", True, False),
    ("train/samples_per_second", "samples/s", False, True),
)


class CurvesError(ValueError):
    """Nothing to plot: a path without metrics, or metrics without a training step."""


@dataclass
class Run:
    label: str
    path: Path
    metrics: dict[int, dict[str, float]]  # step -> {name: value}

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        steps = [s for s in sorted(self.metrics) if name in self.metrics[s]]
        return np.array(steps), np.array([self.metrics[s][name] for s in steps])


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories named by `paths`: each path itself, or the run directories directly inside it."""
    runs: list[Path] = []
    for path in paths:
        if (path / METRICS).is_file():
            runs.append(path)
            continue
        inside = []
        if path.is_dir():
            inside = sorted((p for p in path.iterdir() if (p / METRICS).is_file()), key=_job_order)
        if not inside:
            raise CurvesError(
                f"{path}: no {METRICS} in it or in the folders directly inside it. Pass a run directory "
                "(runs/<run_name>) or a sweep folder (runs/<run_name>-sweep) of a run logged with the CSV "
                "logger (logger=csv, the default; its first rows appear after trainer.log_every_n_steps)"
            )
        runs.extend(inside)
    return runs


def _job_order(path: Path) -> tuple[int, str]:
    """Sweep jobs are numbered folders: 2 before 10."""
    return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, path.name)


def _overrides(run: Path) -> dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return dict(str(o).split("=", 1) for o in OmegaConf.load(path) if "=" in str(o))


def label_runs(runs: Sequence[Path]) -> list[str]:
    """Each run's overrides that differ between the runs ("optimizer.lr=3e-4"), else its directory name."""
    overrides = [_overrides(r) for r in runs]
    keys = sorted({k for o in overrides for k in o})
    differing = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    labels = []
    for run, o in zip(runs, overrides, strict=True):
        swept = " ".join(f"{k}={o[k]}" for k in differing if k in o)
        labels.append(swept or run.name)
    if len(set(labels)) < len(labels):  # still ambiguous: fall back to the paths
        labels = [str(r) for r in runs]
    return labels


def load_runs(paths: Sequence[Path]) -> list[Run]:
    found = find_runs(paths)
    runs = []
    for path, label in zip(found, label_runs(found), strict=True):
        metrics = read_metrics(path / METRICS)
        if not any("train/loss" in m for m in metrics.values()):
            raise CurvesError(f"{path / METRICS} holds no train/loss yet: nothing to plot")
        runs.append(Run(label, path, metrics))
    return runs


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start), so a curve never looks ahead."""
    if window <= 1 or len(values) < 2:
        return values
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def default_window(runs: Sequence[Run]) -> int:
    """Points per trailing mean: about 1/50 of the longest run's logged training steps."""
    return max(1, max(len(r.series("train/loss")[0]) for r in runs) // 50)


def plot_curves(runs: Sequence[Run], path: Path, window: int | None = None) -> Path:
    """One panel per metric that some run logged; raw points faint, the trailing mean on top. `window`:
    points per mean, None for about 1/50 of the longest run."""
    panels = [panel for panel in PANELS if any(len(r.series(panel[0])[0]) for r in runs)]
    window = default_window(runs) if window is None else window
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows))
    for i, (key, title, log_scale, noisy) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for j, run in enumerate(runs):
            steps, values = run.series(key)
            if not len(steps):
                continue
            colour = f"C{j % 10}"
            if window > 1 and noisy:
                ax.plot(steps, values, color=colour, lw=0.6, alpha=0.25)
                values = smooth(values, window)
            ax.plot(
                steps, values, color=colour, lw=1.2, label=run.label, marker="o" if len(steps) < 3 else None
            )
        ax.set_title(title + (f" (mean of {window})" if window > 1 and noisy else ""), fontsize=9)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.tick_params(labelsize=7)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def summary_table(runs: Sequence[Run], window: int) -> str:
    """Where each run ended: last step, its (smoothed) training loss, the best validation loss."""
    lines = [
        f"| run | last step | training loss (mean of the last {window}) | best val/loss (step) |",
        "|---|---|---|---|",
    ]
    for run in runs:
        steps, loss = run.series("train/loss")
        tail = float(np.mean(loss[-max(1, window) :]))
        val_steps, val = run.series("val/loss")
        best = f"{val.min():.4f} ({val_steps[val.argmin()]})" if len(val) else "—"
        lines.append(f"| {run.label} | {steps[-1]} | {tail:.4f} | {best} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.curves",
        description="Plot the training curves of one run, or of every job of a sweep, in one PNG, and "
        "print where each run ended.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or sweep folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG to write (default: curves.png in the first run directory)"
    )
    parser.add_argument(
        "--smooth", type=int, default=None, metavar="N",
        help="trailing mean over N logged points for the training curves; 1 draws them raw "
        "(default: about 1/50 of the longest run)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smooth is not None and args.smooth < 1:
        print(f"error: --smooth must be at least 1, got {args.smooth}", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.runs)
    except CurvesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.runs[0] / "curves.png"
    window = args.smooth or default_window(runs)
    plot_curves(runs, out, window)
    print(summary_table(runs, window))
    print(f"wrote {out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
