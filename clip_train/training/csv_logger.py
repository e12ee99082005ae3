"""A CSV logger that survives a resume.

Lightning's CSVLogger deletes an existing metrics.csv when a logger starts in a non-empty directory, so a
requeued or restarted run would lose the curves of everything before the restart. This one appends to the
existing file instead (keeping its header). Steps logged after the last checkpoint and before a kill appear
twice, once from each attempt; readers keep the last row of each step (`read_metrics` does).
"""

from __future__ import annotations

import csv
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        metrics = Path(self.metrics_file_path)
        if metrics.is_file():
            with metrics.open(newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        """Keep what an earlier attempt of this run wrote (the base class deletes it)."""


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv continues across restarts of the same run."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """metrics.csv -> {step: {name: value}}, the last row of each step winning, empty cells left out."""
    rows: dict[int, dict[str, float]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            rows.setdefault(step, {}).update(values)
    return rows
