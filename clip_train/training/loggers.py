"""Loggers whose curves survive a resume: a restarted or requeued run continues the same curves.

CSV: Lightning's CSVLogger deletes an existing metrics.csv when a logger starts in a non-empty directory, so
a restarted run would lose the curves of everything before the restart. Ours appends to the existing file
(keeping its header). Steps logged after the last checkpoint and before a kill appear twice, once from each
attempt; readers keep the last row of each step (`read_metrics` does).

TensorBoard: each attempt writes a new event file into the same directory, and TensorBoard shows them as
one run. Steps the killed attempt logged after its last checkpoint would be drawn twice; ours marks the
first step the resumed attempt logs as a restart (a `SessionLog.START` event), after which TensorBoard
drops the earlier files' points from that step on.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only


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


class ResumableTensorBoardLogger(TensorBoardLogger):
    """`TensorBoardLogger` whose curves continue across restarts of the same run without doubled steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._restart_marked = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._restart_marked and step is not None:
            # The first step this attempt logs is where it resumed (0 for a fresh run, which hides nothing).
            # Marked here rather than when the writer opens: Lightning may open it before the checkpoint's
            # step is restored.
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            start = Event(step=step, session_log=SessionLog(status=SessionLog.START))
            self.experiment.file_writer.add_event(start)
            self._restart_marked = True
        super().log_metrics(metrics, step)


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """metrics.csv -> {step: {name: value}}, the last row of each step winning, empty cells left out."""
    rows: dict[int, dict[str, float]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            rows.setdefault(step, {}).update(values)
    return rows
