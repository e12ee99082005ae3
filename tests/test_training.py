"""The training program: real Hydra composition, real Lightning fits on real shards, a real kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from data_support import write_crawler_shards
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from clip_train.data import ShardError
from clip_train.losses import ContrastiveLoss
from clip_train.models import build_model
from clip_train.train import CONFIG_DIR, ConfigError, check_hardware, per_rank_batch_size, train, world_size
from clip_train.training.csv_logger import read_metrics
from clip_train.training.lightning_module import CLIPTrainingModule, NonFiniteLossError

REPO_ROOT = Path(__file__).resolve().parents[1]
# The distillation experiments build their student from a teacher checkpoint: tests/test_distill_training.py.
EXPERIMENTS = sorted(
    p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("distill")
)


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(experiment):
    cfg = _compose(f"+experiment={experiment}", "data.train_shards=x")
    with torch.device("meta"):
        model = build_model(cfg.model.name_or_config)
    assert model.image_size in (32, 224, 288, 336, 384, 448)
    assert cfg.run_name == experiment


def test_vit_b32_is_the_papers_recipe():
    cfg = _compose("+experiment=vit_b32", "data.train_shards=x")
    assert cfg.model.name_or_config == "ViT-B/32"
    assert cfg.global_batch_size == 32768
    assert cfg.optimizer.lr == 5e-4 and list(cfg.optimizer.betas) == [0.9, 0.98]
    assert cfg.optimizer.eps == 1e-6 and cfg.optimizer.weight_decay == 0.2
    assert cfg.scheduler.warmup_steps == 2000 and cfg.trainer.max_epochs == 32
    assert cfg.trainer.precision == "bf16-mixed"


def test_choosing_the_siglip_loss_initialises_its_scale_and_bias_as_the_paper():
    from hydra.utils import instantiate

    cfg = _compose("loss=siglip", "model=vit_tiny")
    model = instantiate(cfg.model)
    assert model.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)
    assert model.logit_bias.item() == -10.0


def test_the_default_config_is_a_small_cpu_run():
    cfg = _compose()
    assert cfg.model.name_or_config == "rn-tiny" and cfg.trainer.accelerator == "cpu"
    assert str(cfg.data.train_shards).endswith("demo/shards")


def test_typos_and_unknown_names_are_refused_by_composition():
    with pytest.raises(MissingConfigException, match="nope"):
        _compose("+experiment=nope")
    with pytest.raises(ConfigCompositionException, match="lrr"):
        _compose("optimizer.lrr=1")


def test_the_global_batch_must_divide_over_the_world():
    assert per_rank_batch_size(32768, 8) == 4096
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        per_rank_batch_size(32768, 3)
    assert world_size(OmegaConf.create({"devices": 4, "num_nodes": 2})) == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
@pytest.mark.parametrize("trainer", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "gpu"])
def test_gpu_only_strategies_fail_clearly_without_cuda(trainer):
    cfg = _compose(f"trainer={trainer}", "data.train_shards=x")
    with pytest.raises(ConfigError, match="needs CUDA"):
        check_hardware(cfg)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_build_their_strategy(stage):
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DeepSpeedStrategy

    cfg = _compose(f"trainer=deepspeed_zero{stage}", "data.train_shards=x")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage


def test_missing_shards_are_reported_before_training(tmp_path):
    cfg = _compose(
        f"data.train_shards='{tmp_path}/shard-{{000000..000003}}.tar'", f"paths.run_dir={tmp_path}/run"
    )
    with pytest.raises(ShardError, match=r"shard-000000\.tar"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------- the Lightning module
class _Batches(torch.utils.data.IterableDataset):
    """Fixed random batches; `poison` lists batch indices whose images are NaN."""

    def __init__(self, n: int, poison: set[int] = frozenset()) -> None:
        self.n, self.poison = n, poison

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(self.n):
            images = torch.randn(8, 3, 32, 32, generator=g)
            tokens = torch.zeros(8, 77, dtype=torch.long)
            tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = (
                49406,
                torch.randint(1, 4000, (8, 3), generator=g),
                49407,
            )
            if i in self.poison:
                images[0] = float("nan")
            yield images, tokens


def _fit(
    batches: _Batches,
    max_consecutive_nonfinite: int = 3,
    start_logit_scale: float | None = None,
    precision: str | pl.plugins.Precision = "32-true",
    micro_batch_size: int | None = None,
) -> CLIPTrainingModule:
    from functools import partial

    torch.manual_seed(0)
    model = build_model("vit-tiny")
    if start_logit_scale is not None:  # e.g. a checkpoint saved by code that did not clamp
        with torch.no_grad():
            model.logit_scale.fill_(start_logit_scale)
    module = CLIPTrainingModule(
        model,
        ContrastiveLoss(check_finite=False),
        partial(torch.optim.AdamW, lr=1e-3),
        max_consecutive_nonfinite=max_consecutive_nonfinite,
        gradient_clip_norm=1.0,
        micro_batch_size=micro_batch_size,
    )
    precision_arg = (
        {"plugins": [precision]} if isinstance(precision, pl.plugins.Precision) else {"precision": precision}
    )
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **precision_arg)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on():
    with pytest.warns(UserWarning, match="non-finite loss"):
        module = _fit(_Batches(6, poison={2}))
    assert module.nonfinite_steps == 1
    assert module.trainer.global_step == 5  # 6 batches, one skipped
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_too_many_consecutive_non_finite_steps_stop_the_run():
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"), pytest.warns(UserWarning):
        _fit(_Batches(6, poison={1, 2, 3}), max_consecutive_nonfinite=3)


def test_bf16_mixed_precision_with_gradient_caching_trains():
    module = _fit(_Batches(3), precision="bf16-mixed", micro_batch_size=4)
    assert module.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_gradient_caching_refuses_fp16_loss_scaling():
    # On a CPU Lightning turns "16-mixed" into bf16; a loss scaler is what makes fp16 incompatible.
    fp16 = pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="bf16-mixed"):
        _fit(_Batches(1), precision=fp16, micro_batch_size=4)


def test_the_temperature_is_clamped_after_every_step():
    module = _fit(_Batches(1), start_logit_scale=6.0)  # exp(6) = 403 > 100
    assert module.model.logit_scale.exp().item() == pytest.approx(100.0)


# --------------------------------------------------------------------- end to end: python -m clip_train
def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "clip_train", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def _common(shards: str, root: Path) -> list[str]:
    return [
        f"data.train_shards='{shards}'", "data.num_workers=2", f"paths.root_dir={root}",
        "global_batch_size=16",
        "scheduler.warmup_steps=3", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "logger.0.flush_logs_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=1",
        "callbacks.checkpoint.save_top_k=1", "~callbacks.progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_on_the_same_trajectory(tmp_path):
    shards = write_crawler_shards(tmp_path / "shards", [40, 40, 40, 40], image_size=40)
    common = _common(shards, tmp_path)  # 160 samples / 16 = 10 steps per epoch, 20 in all

    reference = _run([*common, "run_name=reference"], cwd=tmp_path)
    out, _ = reference.communicate(timeout=400)
    assert reference.returncode == 0, out
    expected = read_metrics(tmp_path / "runs/reference/logs/metrics.csv")
    assert sorted(s for s, m in expected.items() if "train/loss" in m) == list(range(20))

    kill_at = random.Random(os.getpid()).randint(3, 13)  # a random step, mid-epoch or in the second epoch
    victim = _run([*common, "run_name=victim"], cwd=tmp_path, start_new_session=True)
    checkpoint = tmp_path / f"runs/victim/checkpoints/step-{kill_at:08d}.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its data-loader workers, without warning
    victim.wait()

    resumed = _run([*common, "run_name=victim"], cwd=tmp_path)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    actual = read_metrics(tmp_path / "runs/victim/logs/metrics.csv")
    steps = sorted(s for s, m in actual.items() if "train/loss" in m)
    assert steps == list(range(20)), f"steps logged across the two attempts: {steps}"
    for step in steps:
        assert actual[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], abs=1e-6), step


@pytest.mark.slow
def test_two_cpu_processes_train_with_ddp(tmp_path):
    shards = write_crawler_shards(tmp_path / "shards", [24, 24, 24, 24], image_size=40)
    args = [*_common(shards, tmp_path), "trainer=ddp_cpu", "data.num_workers=1", "trainer.max_epochs=1",
            "micro_batch_size=4", "run_name=ddp"]  # fmt: skip
    proc = _run(args, cwd=tmp_path)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    metrics = read_metrics(tmp_path / "runs/ddp/logs/metrics.csv")
    losses = [m["train/loss"] for _, m in sorted(metrics.items()) if "train/loss" in m]
    assert len(losses) == 96 // 16
    assert (tmp_path / "runs/ddp/checkpoints/last.ckpt").exists()


@pytest.mark.slow
def test_a_failed_job_does_not_end_a_sweep_run_by_the_submitit_launcher(tmp_path):
    """A 2-job sweep through Hydra's submitit launcher (its local executor stands in for SLURM): the job
    with an invalid micro-batch fails and records why; the other trains and checkpoints."""
    shards = write_crawler_shards(tmp_path / "shards", [16, 16], image_size=40)
    common = [a for a in _common(shards, tmp_path) if not a.startswith("trainer.max_epochs")]
    sweep = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "micro_batch_size=0,4"]
    args = [*sweep, *common, "trainer.max_steps=2", "data.num_workers=1", "run_name=sweep"]
    proc = _run(args, cwd=tmp_path)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    failed, succeeded = tmp_path / "runs/sweep-sweep/0", tmp_path / "runs/sweep-sweep/1"  # by job number
    assert "micro_batch_size=0 must lie in" in (failed / "error.txt").read_text()
    assert (succeeded / "checkpoints/last.ckpt").is_file()
    assert not (succeeded / "error.txt").exists()


@pytest.mark.slow
def test_wandb_logs_offline_without_a_key_and_a_restart_continues_the_same_run(tmp_path):
    shards = write_crawler_shards(tmp_path / "shards", [16, 16], image_size=40)
    common = [a for a in _common(shards, tmp_path) if "logger.0" not in a and "max_epochs" not in a]
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    runs = []
    for steps in (2, 3):  # the second invocation resumes the first (same run directory)
        args = [*common, "logger=wandb", f"trainer.max_steps={steps}", "data.num_workers=1", "run_name=wb"]
        env = {**env_free, "HOME": str(tmp_path)}  # no ~/.netrc either: no key anywhere
        command = [sys.executable, "-m", "clip_train", *args]
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        runs.append(sorted(p.name for p in (tmp_path / "runs/wb/wandb").glob("offline-run-*")))
    run_id = (tmp_path / "runs/wb/run_id").read_text().strip()
    assert len(runs[1]) == 2 and all(name.endswith(run_id) for name in runs[1])
