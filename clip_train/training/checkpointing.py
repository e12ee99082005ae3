"""Training checkpoints that are final, atomic and found again.

Three promises, and where each is kept:

* **Final.** `TrainingCheckpoint` saves at the end of the batch on which training ends, whatever ends it:
  `max_steps`, the last batch of `max_epochs`, `trainer.should_stop` (the `max_time` limit, early stopping),
  a SLURM requeue signal, or SIGTERM (Lightning stops with SIGTERMException, and `on_exception` saves the
  state of the last finished step). So `last.ckpt` always holds the last optimiser step; only kill -9 loses
  the steps since the previous periodic save. Saving at the end of a batch, not in `on_train_end`, also
  keeps a stop in mid-epoch a stop in mid-epoch: by `on_train_end` Lightning has counted the epoch as
  finished, and a resume would skip the rest of its data.
* **Atomic.** `AtomicCheckpointIO` writes a temporary file beside the checkpoint, fsyncs it and renames it
  into place, so a kill at any moment leaves either the old file or the new one, whichever file system
  `$TMPDIR` is on. `last.ckpt` is a hard link to the newest `step-N.ckpt`, swapped in by a rename as well
  (a relative symbolic link for DeepSpeed's checkpoint directories). A failed write is one line that names
  the file, the error and the free space, never a silent skip.
* **Found.** `find_resume_checkpoint` takes `last.ckpt` when it is intact, else the newest intact
  `step-N.ckpt`, and says which damaged file it passed over.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.strategies import DeepSpeedStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from clip_train.models.openai_layout import CheckpointError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
_PARTIAL = ".partial"  # suffix of a checkpoint still being written; removed at the next start


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permission, quota); the message says which and where."""


# ------------------------------------------------------------------------------------ atomic writing
def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash right after it must not bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**30:.1f} GiB free"
    except OSError:
        return "free space unknown"


def write_failure_message(path: Path, error: OSError) -> str:
    reason = error.strerror or str(error)
    return (
        f"could not write the checkpoint {path}: {reason} ({_free_space(path.parent)} on the file system of "
        f"{path.parent}). Free space or make the folder writable (or choose another paths.root_dir), then "
        "rerun the same command: it resumes from the newest checkpoint on disk"
    )


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temporary file in its own folder: fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}{_PARTIAL}-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        _fsync_directory(path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint I/O, made atomic in the checkpoint's own folder.

    Lightning's own writer goes through `$TMPDIR` and moves the file: a copy, not a rename, when `$TMPDIR`
    is another file system (tmpfs on many clusters), so a kill during it left a truncated checkpoint; and it
    ignores a PermissionError, so an unwritable folder meant no checkpoint at all."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            write_atomically(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as error:
            # torch's zip writer answers a failed write with a RuntimeError of its own, raised while the
            # OSError is being handled: report the OSError.
            cause = error
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise CheckpointWriteError(write_failure_message(path, cause)) from error


def probe_writable(folder: Path) -> OSError | None:
    """Try writing a file in `folder`, or in its nearest existing parent if it does not exist yet (creating
    nothing that stays); the error, or None when it can be written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        return error
    return None


# --------------------------------------------------------------------------------------- finding again
def step_number(path: Path) -> int | None:
    match = _STEP_FILE.match(path.name)
    return int(match.group(1)) if match else None


def _step_files(folder: Path) -> list[Path]:
    """The folder's step-N.ckpt files (or DeepSpeed folders), oldest step first."""
    return sorted((p for p in folder.glob("step-*.ckpt") if step_number(p) is not None), key=step_number)


def _remove(path: Path) -> None:
    """Delete a checkpoint file, link or DeepSpeed folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def is_intact(path: Path) -> bool:
    """A complete checkpoint: a readable zip archive (what torch.save writes; a cut-off file has lost the
    central directory at its end), or a DeepSpeed checkpoint directory with its `latest` tag file."""
    if path.is_dir():
        return (path / "latest").is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def find_resume_checkpoint(checkpoint_dir: Path, also: list[Path] = ()) -> Path | None:
    """The checkpoint to resume from: `last.ckpt` if intact, unless a later intact `step-N.ckpt` exists
    (a stop between writing it and linking `last.ckpt`), else the newest intact `step-N.ckpt`. `also`
    (preemption checkpoints of older versions) compete by modification time. Damaged files are named in
    a warning and passed over."""
    last = checkpoint_dir / LAST
    damaged: list[Path] = []
    newest_step = None
    for path in reversed(_step_files(checkpoint_dir)):
        if is_intact(path):
            newest_step = path
            break
        damaged.append(path)
    chosen = None
    if last.exists() or last.is_symlink():
        if is_intact(last):
            chosen = last
        else:
            damaged.append(last)
    if chosen is None or (newest_step is not None and _is_later(newest_step, last)):
        chosen = newest_step
    others = [p for p in also if p.exists() and is_intact(p)]
    if others:
        newest_other = max(others, key=lambda p: p.stat().st_mtime)
        if chosen is None or newest_other.stat().st_mtime > chosen.stat().st_mtime:
            chosen = newest_other
    for path in damaged:
        warnings.warn(
            f"{path} is not a complete checkpoint (cut off while being written, or copied incompletely); "
            f"{'resuming from ' + str(chosen) if chosen else 'no intact checkpoint is left'}",
            stacklevel=2,
        )
    if chosen is None and damaged:
        raise CheckpointError(
            f"every checkpoint in {checkpoint_dir} is damaged ({', '.join(p.name for p in damaged)}); move "
            "them aside to start this run over, or pass resume=false"
        )
    return chosen


def _is_later(step_file: Path, last: Path) -> bool:
    """Whether `step_file` holds a later step than `last.ckpt` (which links to some step file)."""
    for candidate in _step_files(last.parent):
        try:
            if candidate.samefile(last):
                return step_number(step_file) > step_number(candidate)
        except OSError:
            continue
    # last.ckpt is a copy (a copied run folder, or a file system without hard links): newer file wins.
    return step_file.stat().st_mtime > last.stat().st_mtime


# ------------------------------------------------------------------------------------------- callback
class TrainingCheckpoint(Checkpoint):
    """Saves `step-N.ckpt` every `every_n_train_steps` steps and every `every_n_minutes` minutes, and at the
    end of training whatever ends it (see the module docstring); `last.ckpt` links to the newest.

    dirpath: the checkpoint folder. keep_last: how many step files to keep (None: all; last.ckpt stays).
    requeue_signals: under SLURM (SLURM_JOB_ID set), the signals that announce a time limit or preemption
        (sbatch --signal, submitit's). On one, every rank finishes its step, the checkpoint is saved, and the
        job is requeued: by the handler that was installed before (submitit's), else `scontrol requeue`.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_train_steps: int | None = 500,
        every_n_minutes: float | None = None,
        keep_last: int | None = None,
        requeue_signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2"),
    ) -> None:
        for name, value in (("every_n_train_steps", every_n_train_steps), ("keep_last", keep_last)):
            if value is not None and value < 1:
                raise ValueError(f"callbacks.checkpoint.{name}={value}: give a positive number, or null")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(
                f"callbacks.checkpoint.every_n_minutes={every_n_minutes}: give minutes > 0, or null"
            )
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self.keep_last = keep_last
        self.requeue_signals = [getattr(signal, name) for name in requeue_signals]
        self._last_saved_step = -1
        self._last_save_time = time.monotonic()
        self._received: int = 0  # the requeue signal received on this rank, 0 for none
        self._previous_handlers: dict[int, Any] = {}

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:  # the default: swap in the atomic writer (see its docstring)
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath.is_dir():
            for leftover in self.dirpath.glob(f".*{_PARTIAL}*"):  # a write that a kill -9 interrupted
                _remove(leftover)
        self._install_requeue_handlers()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save_time = time.monotonic()
        if trainer.global_step > 0:  # resumed: this step is on disk already
            self._last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        step = trainer.global_step
        due = self._time_is_up()
        received = self._received
        if trainer.world_size > 1 and (self.every_n_minutes is not None or self._previous_handlers):
            # Clocks and signals differ between ranks: any rank's reason is every rank's.
            flags = torch.tensor([int(due), received], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            due, received = bool(flags[0]), int(flags[1])
        periodic = self.every_n_train_steps is not None and step % self.every_n_train_steps == 0
        if step != self._last_saved_step and (periodic or due or received or _ends_here(trainer, batch_idx)):
            _log_this_step_now(trainer)
            self.save(trainer)
        if received:
            self._requeue(trainer, received)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training ended without a batch-end save (e.g. the data ran out early): save what there is.
        if trainer.global_step > 0 and trainer.global_step != self._last_saved_step:
            self.save(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM: Lightning raises this between steps (on every rank at once under DDP), so the state is that
        # of the last finished step. Any other exception may come from inside a step: nothing is saved.
        step = trainer.global_step
        if isinstance(exception, SIGTERMException) and step > 0 and step != self._last_saved_step:
            self.save(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    # ---------------------------------------------------------------- saving
    def save(self, trainer: pl.Trainer) -> Path:
        """Write step-N.ckpt for the current step and point last.ckpt at it (every rank calls this)."""
        step = trainer.global_step
        target = self.dirpath / f"step-{step:08d}.ckpt"
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self._save_directory(trainer, target)
        else:
            trainer.save_checkpoint(target)  # AtomicCheckpointIO on rank 0, then a barrier
            if trainer.is_global_zero:
                self._link_last_to_file(target)
        if trainer.is_global_zero:
            self._prune()
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        log.debug("saved %s", target)
        return target

    def _save_directory(self, trainer: pl.Trainer, target: Path) -> None:
        """DeepSpeed writes a folder of per-rank shards: write it under a temporary name, rename it, and
        point last.ckpt at it with a relative symbolic link (a folder cannot be hard-linked)."""
        partial = target.with_name(f".{target.name}{_PARTIAL}")
        if trainer.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        trainer.strategy.barrier("checkpoint folder ready")
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            try:
                for root, _, files in os.walk(partial):
                    for name in files:
                        with open(Path(root) / name, "rb") as f:
                            os.fsync(f.fileno())
                if target.exists():
                    _remove(target)
                os.rename(partial, target)
                last = self.dirpath / LAST
                if last.is_dir() and not last.is_symlink():  # a folder written by an older version
                    _remove(last)
            except OSError as error:
                raise CheckpointWriteError(write_failure_message(target, error)) from error
            self._swap_in_last(lambda link: os.symlink(target.name, link))
        trainer.strategy.barrier("checkpoint folder renamed")

    def _link_last_to_file(self, target: Path) -> None:
        def hard_link(link: Path) -> None:
            try:
                os.link(target, link)
            except OSError:  # a file system without hard links: a second copy, written atomically too
                write_atomically(link, lambda f: f.write(target.read_bytes()))

        self._swap_in_last(hard_link)

    def _swap_in_last(self, make_link: Callable[[Path], None]) -> None:
        """Replace last.ckpt by a rename: `make_link` creates the new one under a temporary name first."""
        last = self.dirpath / LAST
        link = self.dirpath / f".{LAST}{_PARTIAL}"
        try:
            link.unlink(missing_ok=True)
            make_link(link)
            os.replace(link, last)
            _fsync_directory(self.dirpath)
        except OSError as error:
            raise CheckpointWriteError(write_failure_message(last, error)) from error

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in _step_files(self.dirpath)[: -self.keep_last]:
            _remove(old)

    # ---------------------------------------------------------------- when
    def _time_is_up(self) -> bool:
        if self.every_n_minutes is None:
            return False
        return time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes

    # ---------------------------------------------------------------- SLURM requeue
    def _install_requeue_handlers(self) -> None:
        if "SLURM_JOB_ID" not in os.environ or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.requeue_signals:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_requeue_signal)

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._received = int(signum)  # acted on at the end of the current step, not in the middle of it

    def _requeue(self, trainer: pl.Trainer, signum: int) -> None:
        previous = self._previous_handlers.get(signum)
        self._received = 0
        if callable(previous):  # submitit's handler: it requeues the job and exits
            log.info(
                "requeue signal %d: checkpoint saved at step %d; handing over", signum, trainer.global_step
            )
            previous(signum, None)
            return
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            log.info(
                "requeue signal %d: checkpoint saved at step %d; requeuing job %s",
                signum,
                trainer.global_step,
                job,
            )
            try:
                done = subprocess.run(
                    ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
                )
                if done.returncode != 0:
                    log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
            except (OSError, subprocess.TimeoutExpired) as error:
                log.warning("could not run scontrol requeue %s: %s", job, error)
        trainer.should_stop = True


def _log_this_step_now(trainer: pl.Trainer) -> None:
    """Hand this step's metrics to the loggers (and flush them) before its checkpoint is written.

    Lightning logs a step's metrics only after the `on_train_batch_end` hooks, where checkpoints are saved: a
    kill between the two would leave a checkpoint holding a step whose row no logger ever wrote, and the
    resume starts after it. So the row is written here, and the loop's own call for this step is skipped."""
    connector = getattr(trainer, "_logger_connector", None)
    log_step = getattr(connector, "update_train_step_metrics", None)
    if log_step is None or not trainer.loggers:
        return
    log_step()
    for logger in trainer.loggers:
        logger.save()

    def skip_once() -> None:
        del connector.update_train_step_metrics  # back to the class's method for the next step

    connector.update_train_step_metrics = skip_once


def _ends_here(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether training stops after this batch: max_steps, the last batch of max_epochs, or should_stop."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    if trainer.should_stop:  # the max_time Timer, early stopping, a requeue (callbacks ordered before ours)
        return True
    epoch_loop = trainer.fit_loop.epoch_loop
    last_batch = epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
    max_epochs = trainer.max_epochs
    return (
        last_batch and max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    )
