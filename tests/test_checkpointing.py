"""Checkpoints that are final, atomic and found again: real fits, real signals, real kills, real files."""

from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_support import write_crawler_shards
from download_support import _can_drop_permission_override, _drop_permission_override
from hydra import compose, initialize_config_dir

from clip_train.train import CONFIG_DIR, resume_checkpoint, train
from clip_train.training.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    find_resume_checkpoint,
    is_intact,
)
from clip_train.training.optim import warmup_cosine_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 5  # 4 shards × 10 samples, 8 per step


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_crawler_shards(tmp_path_factory.mktemp("shards"), [10, 10, 10, 10], image_size=40)


def _args(shards: str, root: Path, run: str, *extra: str) -> list[str]:
    return [
        f"data.train_shards='{shards}'", "model=vit_tiny", "data.num_workers=0", "global_batch_size=8",
        f"paths.root_dir={root}", f"run_name={run}", f"paths.run_dir={root}/runs/{run}",
        "scheduler.warmup_steps=2", "trainer.max_epochs=2",
        "scheduler.fixed_total_steps=10",  # the same learning rates whatever max_steps a test stops at
        "trainer.log_every_n_steps=1", "logger.0.flush_logs_every_n_steps=1", "~callbacks.progress",
        "callbacks.checkpoint.every_n_train_steps=4", *extra,
    ]  # fmt: skip


def _train(*overrides: str) -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    train(cfg)


def _step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _loss_rows(run_dir: Path) -> list[tuple[int, int, float]]:
    """(step, epoch, loss) of every row of metrics.csv that logged a training loss, duplicates kept."""
    with (run_dir / "logs/metrics.csv").open(newline="") as f:
        return [
            (int(float(r["step"])), int(float(r["epoch"])), float(r["train/loss"]))
            for r in csv.DictReader(f)
            if r.get("train/loss")
        ]


def _assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Every step once, with the reference's epoch and loss: the same samples in the same order."""
    rows, expected = _loss_rows(run_dir), _loss_rows(reference_dir)
    steps = [s for s, _, _ in rows]
    assert sorted(steps) == [s for s, _, _ in expected], f"steps logged: {sorted(steps)}"
    assert not [s for s, n in Counter(steps).items() if n > 1], "a step was logged twice"
    by_step = {s: (e, loss) for s, e, loss in rows}
    for step, epoch, loss in expected:
        assert by_step[step][0] == epoch, f"epoch column at step {step}"
        assert by_step[step][1] == pytest.approx(loss, abs=1e-6), f"loss at step {step}"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """Two uninterrupted epochs (10 steps)."""
    root = tmp_path_factory.mktemp("reference")
    _train(*_args(shards, root, "reference"))
    return root / "runs/reference"


# ----------------------------------------------------------------------------------------------- final
@pytest.mark.parametrize("stops", [(6, 10), (8, 10)], ids=["not-a-multiple", "a-multiple"])
def test_last_ckpt_holds_the_final_step_whatever_the_stop_and_a_resume_repeats_nothing(
    shards, reference, tmp_path, stops
):
    # The interval is 4 steps: a stop at step 6 falls between two periodic saves, one at 8 on one.
    run_dir = tmp_path / "runs/run"
    for max_steps in stops:
        _train(*_args(shards, tmp_path, "run", f"trainer.max_steps={max_steps}"))
        assert _step_of(run_dir / "checkpoints/last.ckpt") == max_steps
        assert len(_loss_rows(run_dir)) == max_steps
    _assert_same_run(run_dir, reference)  # 10 steps is also the end of max_epochs=2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        *(f"step-{s:08d}.ckpt" for s in sorted({4, 8, *stops})),
    ]
    assert (run_dir / "checkpoints/last.ckpt").samefile(run_dir / "checkpoints/step-00000010.ckpt")


def test_a_stop_by_max_steps_in_mid_epoch_resumes_that_epoch_and_ends_at_max_epochs(
    shards, reference, tmp_path
):
    # 3 of the first epoch's 5 steps, then a resume without max_steps: the rest of epoch 0, then epoch 1.
    _train(*_args(shards, tmp_path, "run", "trainer.max_steps=3"))
    _train(*_args(shards, tmp_path, "run"))
    _assert_same_run(tmp_path / "runs/run", reference)
    assert _step_of(tmp_path / "runs/run/checkpoints/last.ckpt") == 2 * STEPS_PER_EPOCH


def test_a_checkpoint_is_written_after_the_metrics_row_of_its_last_step(shards, tmp_path, monkeypatch):
    # Lightning logs a step after the hooks that save it: a kill between the two would lose that row for good.
    import clip_train.training.checkpointing as checkpointing

    rows_on_disk: dict[str, list[int]] = {}
    write = checkpointing.write_atomically

    def spy(path: Path, *args, **kwargs):
        rows_on_disk[path.name] = [s for s, _, _ in _loss_rows(tmp_path / "runs/run")]
        return write(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "write_atomically", spy)
    _train(*_args(shards, tmp_path, "run", "trainer.max_steps=6", "logger.0.flush_logs_every_n_steps=50"))
    assert rows_on_disk == {"step-00000004.ckpt": [0, 1, 2, 3], "step-00000006.ckpt": [0, 1, 2, 3, 4, 5]}
    assert [s for s, _, _ in _loss_rows(tmp_path / "runs/run")] == list(range(6))  # and once only


def test_a_fixed_total_keeps_the_schedule_when_max_steps_grows_and_the_default_stretches_it():
    def rates(total_steps: int, fixed_total_steps: int | None) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = warmup_cosine_schedule(optimizer, 2, total_steps, fixed_total_steps=fixed_total_steps)
        seen = []
        for _ in range(6):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen

    assert rates(6, fixed_total_steps=10) == rates(10, fixed_total_steps=10)
    stretched, planned = rates(6, None), rates(10, None)
    assert stretched[:2] == planned[:2] and stretched[5] < planned[5] - 0.2  # after warm-up they part


def test_a_stop_by_the_time_limit_saves_the_last_step_and_resumes_to_the_same_run(
    shards, reference, tmp_path
):
    # max_time: Lightning's Timer sets should_stop at the end of a batch; the step it stops at is whatever
    # the clock says, and that step is the one in last.ckpt.
    _train(
        *_args(
            shards,
            tmp_path,
            "run",
            '+trainer.max_time="00:00:00:01"',
            "callbacks.checkpoint.every_n_train_steps=100",
        )
    )
    run_dir = tmp_path / "runs/run"
    stopped_at = len(_loss_rows(run_dir))
    assert 0 < stopped_at < 2 * STEPS_PER_EPOCH, "the time limit did not stop the run early: lower it"
    assert _step_of(run_dir / "checkpoints/last.ckpt") == stopped_at
    _train(*_args(shards, tmp_path, "run"))
    _assert_same_run(run_dir, reference)


def test_a_copied_run_folder_resumes_into_its_own_last_ckpt(shards, tmp_path):
    _train(*_args(shards, tmp_path, "a", "trainer.max_steps=4"))
    shutil.copytree(tmp_path / "runs/a", tmp_path / "runs/b")  # hard links become separate files
    _train(*_args(shards, tmp_path, "b", "trainer.max_steps=6"))
    checkpoints = tmp_path / "runs/b/checkpoints"
    assert _step_of(checkpoints / "last.ckpt") == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last.ckpt",
        "step-00000004.ckpt",
        "step-00000006.ckpt",
    ]


def test_keep_last_keeps_the_newest_step_files_and_last_ckpt(shards, tmp_path):
    _train(
        *_args(
            shards,
            tmp_path,
            "run",
            "callbacks.checkpoint.every_n_train_steps=1",
            "callbacks.checkpoint.keep_last=2",
        )
    )
    checkpoints = tmp_path / "runs/run/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last.ckpt",
        "step-00000009.ckpt",
        "step-00000010.ckpt",
    ]


# ------------------------------------------------------------------------------------------- found again
def test_a_damaged_last_ckpt_is_named_and_the_newest_intact_step_file_is_taken(shards, tmp_path):
    _train(*_args(shards, tmp_path, "run", "trainer.max_steps=6"))
    checkpoints = tmp_path / "runs/run/checkpoints"
    for name in ("last.ckpt", "step-00000006.ckpt"):  # both cut off part way, as by a full disk
        data = (checkpoints / name).read_bytes()
        (checkpoints / f"{name}.cut").write_bytes(data[: len(data) // 2])
        (checkpoints / f"{name}.cut").replace(checkpoints / name)
    assert not is_intact(checkpoints / "last.ckpt") and is_intact(checkpoints / "step-00000004.ckpt")
    with pytest.warns(UserWarning, match=r"last\.ckpt is not a complete checkpoint.*step-00000004\.ckpt"):
        found = find_resume_checkpoint(checkpoints)
    assert found == checkpoints / "step-00000004.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(*_args(shards, tmp_path, "run", "trainer.max_steps=8"))
    assert _step_of(checkpoints / "last.ckpt") == 8


def test_a_deleted_last_ckpt_resumes_from_the_newest_step_file_and_an_older_preemption_file_competes(
    tmp_path,
):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (2, 10, 4):  # numbered, so found by number, not by name order or age
        torch.save({"global_step": step}, checkpoints / f"step-{step:08d}.ckpt")
    assert find_resume_checkpoint(checkpoints) == checkpoints / "step-00000010.ckpt"
    os.link(checkpoints / "step-00000004.ckpt", checkpoints / "last.ckpt")  # linked, then step 10 written
    assert find_resume_checkpoint(checkpoints) == checkpoints / "step-00000010.ckpt"
    (checkpoints / "last.ckpt").unlink()
    os.link(checkpoints / "step-00000010.ckpt", checkpoints / "last.ckpt")
    assert find_resume_checkpoint(checkpoints) == checkpoints / "last.ckpt"
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's SLURM plugin wrote these before this version
    torch.save({"global_step": 12}, hpc)
    future = time.time() + 60
    os.utime(hpc, (future, future))
    assert find_resume_checkpoint(checkpoints, also=[hpc]) == hpc


def test_resume_checkpoint_reads_the_callbacks_folder(tmp_path):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.run_dir={tmp_path}", "data.train_shards=x"])
    assert resume_checkpoint(cfg) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 1}, tmp_path / "checkpoints/step-00000001.ckpt")
    assert resume_checkpoint(cfg) == str(tmp_path / "checkpoints/step-00000001.ckpt")


# --------------------------------------------------------------------------------------------- atomic
def _tmpfs(path: Path) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_kill_during_a_write_leaves_the_previous_checkpoint_whatever_tmpdir_is(tmp_path):
    """A big checkpoint written by a child process with TMPDIR on another file system (tmpfs), killed with
    SIGKILL while the file is being written: the previous checkpoint stays intact and is the one found."""
    other_fs = tmp_path / "tmpfs"
    if not _tmpfs(other_fs):
        pytest.skip("cannot mount a tmpfs here (needs root): TMPDIR on another file system not reproduced")
    try:
        checkpoints = tmp_path / "checkpoints"
        checkpoints.mkdir()
        target = checkpoints / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.zeros(10)}, target)
        writer = (
            "import sys, torch\n"
            "from clip_train.training.checkpointing import AtomicCheckpointIO\n"
            "big = {'global_step': 2, 'w': torch.ones(100_000_000)}\n"  # 400 MB
            "AtomicCheckpointIO().save_checkpoint(big, sys.argv[1])\n"
        )
        env = {**os.environ, "TMPDIR": str(other_fs)}
        child = subprocess.Popen([sys.executable, "-c", writer, str(target)], env=env)
        deadline = time.monotonic() + 120
        partial = []
        while time.monotonic() < deadline and child.poll() is None:
            partial = [
                p for p in checkpoints.iterdir() if p.name != "last.ckpt" and p.stat().st_size > 1 << 20
            ]
            if partial:
                break
            time.sleep(0.005)
        assert partial and child.poll() is None, "the write ended before it could be interrupted"
        child.kill()
        child.wait()
        assert is_intact(target) and _step_of(target) == 1
        assert find_resume_checkpoint(checkpoints) == target
        assert not list(other_fs.iterdir()), "the checkpoint went through TMPDIR"
    finally:
        subprocess.run(["umount", str(other_fs)], check=False)


# ------------------------------------------------------------------------------- signals and disks
def _launch(
    shards: str, root: Path, run: str, *extra: str, env: dict | None = None, **kwargs
) -> subprocess.Popen:
    command = [sys.executable, "-m", "clip_train", *_args(shards, root, run, *extra)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(command, cwd=root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)  # fmt: skip


def _signal_after_steps(proc: subprocess.Popen, run_dir: Path, steps: int, signum: int) -> None:
    """Send `signum` once metrics.csv shows `steps` training steps (a run too fast to catch fails)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / "logs/metrics.csv").exists() and len(_loss_rows(run_dir)) >= steps:
            proc.send_signal(signum)
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended before {steps} steps: {proc.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SLURM requeue signal"])
def test_a_signal_saves_the_last_finished_step_and_the_resume_completes_the_same_run(
    shards, reference, tmp_path, how
):
    # No periodic save in reach (every 100 steps): whatever last.ckpt holds, the stop itself saved it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_RECORD"\n')  # no SLURM here
    (bin_dir / "scontrol").chmod(0o755)
    record = tmp_path / "scontrol.txt"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SCONTROL_RECORD": str(record)}
    if how != "SIGTERM":
        env["SLURM_JOB_ID"] = "4242"
    run_dir = tmp_path / "runs/run"
    proc = _launch(shards, tmp_path, "run", "callbacks.checkpoint.every_n_train_steps=100",
                   "trainer.log_every_n_steps=1", env=env)  # fmt: skip
    _signal_after_steps(proc, run_dir, 2, signal.SIGTERM if how == "SIGTERM" else signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    trained = len(_loss_rows(run_dir))
    assert 2 <= trained < 2 * STEPS_PER_EPOCH, "the signal did not stop the run"
    assert _step_of(run_dir / "checkpoints/last.ckpt") == trained, err
    if how == "SIGTERM":
        assert not record.exists()
    else:
        assert proc.returncode == 0, err
        assert record.read_text().split() == ["requeue", "4242"]
    _train(*_args(shards, tmp_path, "run"))
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_an_unwritable_run_folder_is_refused_up_front_and_a_full_disk_mid_run_is_one_line(shards, tmp_path):
    if os.geteuid() == 0 and not _can_drop_permission_override():
        pytest.skip("runs as root, which ignores permission bits, and cannot drop CAP_DAC_OVERRIDE here")
    checkpoints = tmp_path / "runs/ro/checkpoints"
    checkpoints.mkdir(parents=True)
    checkpoints.chmod(0o555)
    drop = _drop_permission_override if os.geteuid() == 0 else None
    try:
        proc = _launch(shards, tmp_path, "ro", preexec_fn=drop)
        _, err = proc.communicate(timeout=300)
    finally:
        checkpoints.chmod(0o755)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write to {checkpoints}"), err
    assert not (tmp_path / "runs/ro/logs").exists(), "work started before the refusal"

    # A write that fails part way (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) after a first save.
    _train(*_args(shards, tmp_path, "full", "trainer.max_steps=4"))
    first = tmp_path / "runs/full/checkpoints/last.ckpt"
    limit = first.stat().st_size // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec: the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _launch(shards, tmp_path, "full", "trainer.max_steps=8", preexec_fn=small_files)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert lines[-1].startswith("error: could not write the checkpoint ") and "File too large" in lines[-1], (
        err
    )
    assert "Traceback" not in err, err
    assert _step_of(first) == 4 and is_intact(first)
    assert not [p for p in first.parent.iterdir() if ".partial" in p.name]


def test_a_write_error_names_the_file_the_reason_and_the_free_space(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint .*GiB free"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, blocked / "last.ckpt")  # its folder is a file
