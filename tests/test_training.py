"""The training program: real Hydra composition, real Lightning fits on real shards, a real kill -9."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from data_support import write_crawler_shards
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from clip_train.checkpoints import load_model
from clip_train.data import ShardError, WebDatasetDataModule
from clip_train.losses import ContrastiveLoss
from clip_train.models import build_model
from clip_train.train import CONFIG_DIR, build_strategy, resume_checkpoint, train
from clip_train.training.lightning_module import CLIPTrainingModule, NonFiniteLossError
from clip_train.training.loggers import read_metrics
from clip_train.training.optim import warmup_cosine_schedule
from clip_train.training.preflight import (
    ConfigError,
    check_command_line,
    check_hardware,
    check_resumed_settings,
    per_rank_batch_size,
    record_run_settings,
    world_size,
)

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
    # The data module takes its image size and context length from the model (train.py fills the nulls).
    assert cfg.data.image_size is None and cfg.data.context_length is None
    with torch.device("meta"):
        model = build_model(cfg.model.name_or_config)
    assert model.image_size == 224 and model.context_length == 77


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


def test_an_appended_key_the_optimiser_or_schedule_does_not_take_is_refused_up_front(tmp_path):
    # Hydra's own hint for a typo is "use +optimizer.lrr=1"; that key would reach AdamW inside fit.
    run = [f"data.train_shards='{tmp_path}/s-{{0..1}}.tar'", f"paths.run_dir={tmp_path}/r"]
    refusals = {
        "+optimizer.lrr=1": "optimizer.lrr: not an argument of torch.optim",
        "+scheduler.warmup=3": "scheduler.warmup: not an argument of clip_train",
    }
    for override, named in refusals.items():
        with pytest.raises(ConfigError, match=named):
            train(_compose(override, *run))
    assert not (tmp_path / "r").exists()


def test_help_says_how_to_run_and_lists_every_group_option(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clip_train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Train a CLIP model: python -m clip_train")
    assert "+experiment=vit_b32" in proc.stdout and "--cfg job" in proc.stdout
    for group in ("experiment", "model", "trainer", "logger"):
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in proc.stdout


def test_command_lines_hydra_would_misread_are_refused_with_the_fix(tmp_path):
    # What bash makes of data.train_shards=/d/shard-{000000..000002}.tar unquoted; Hydra keeps the last.
    expanded = [f"data.train_shards=/d/shard-00000{i}.tar" for i in range(3)]
    proc = subprocess.run([sys.executable, "-m", "clip_train", *expanded, f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "given 3 times" in proc.stderr and "Quote it" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
    with pytest.raises(
        SystemExit, match=r"quote the brace pattern .*\"data\.val_shards='/v/s-\{0\.\.3\}\.tar'\""
    ):
        check_command_line(["data.val_shards=/v/s-{0..3}.tar"])
    check_command_line(["data.train_shards='/d/s-{0..3}.tar'", "data.num_workers=2", "data.num_workers=0"])
    check_command_line(["paths.root_dir=/a/x1", "data.train_shards=/b/y1"])  # different keys: fine
    # Repeats a wrapper script may make on purpose (Hydra keeps the last): not the shell's expansion.
    check_command_line(["paths.root_dir=/scratch/run1", "paths.root_dir=/scratch/run2"])
    check_command_line(
        ["data.train_shards='/l-2023/s-{0..9}.tar'", "data.train_shards='/l-2024/s-{0..9}.tar'"]
    )
    check_command_line(["data.train_shards=/d/s-000000.tar", "data.train_shards=/d/s-000005.tar"])
    if shutil.which("sbatch") is None:  # this machine: no SLURM
        for launcher in ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm"):
            with pytest.raises(SystemExit, match="sbatch, which is not on this machine's PATH"):
                check_command_line(["-m", launcher, "optimizer.lr=1e-4,5e-4"])
        check_command_line(["-m", "hydra/launcher=slurm", "--cfg", "job"])  # prints, submits nothing


def test_the_global_batch_must_divide_over_the_world():
    assert per_rank_batch_size(32768, 8) == 4096
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        per_rank_batch_size(32768, 3)
    assert world_size(OmegaConf.create({"devices": 4, "num_nodes": 2})) == 8


# What srun (or the submitit launcher) exports to each of 4 nodes × 8 tasks; Lightning reads these too.
SLURM_4_NODES = {
    "SLURM_JOB_NAME": "clip_train", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "32", "SLURM_NNODES": "4",
    "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
}  # fmt: skip


def _slurm_job(monkeypatch, variables: dict[str, str] = SLURM_4_NODES) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_a_slurm_sweep_with_trainer_slurm_splits_the_batch_over_every_task(monkeypatch):
    _slurm_job(monkeypatch)
    cfg = _compose("hydra/launcher=slurm", "trainer=slurm", "+experiment=vit_b32", "data.train_shards=x")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 4)
    assert per_rank_batch_size(cfg.global_batch_size, world_size(cfg.trainer)) == 32768 // 32


def test_a_trainer_that_disagrees_with_the_slurm_job_is_refused_before_training(monkeypatch, tmp_path):
    """The old README sweep: 4 nodes, but the experiment's trainer=gpu counts one node's GPUs."""
    _slurm_job(monkeypatch)
    cfg = _compose("hydra/launcher=slurm", "+experiment=vit_b32", "data.train_shards=x")
    with pytest.raises(ConfigError, match=r"SLURM started 32 tasks .* add trainer=slurm"):
        world_size(cfg.trainer)
    # The whole program stops there too (a CPU trainer, so that the CUDA check does not answer first).
    cfg = _compose("trainer=cpu", "data.train_shards=x", f"paths.run_dir={tmp_path}/run")
    with pytest.raises(ConfigError, match="SLURM started 32 tasks"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_slurm_variables_of_an_interactive_job_and_torchrun_follow_lightnings_rules(monkeypatch):
    single = OmegaConf.create({"devices": 1, "num_nodes": 1})
    # Lightning ignores SLURM in a job named "interactive" (its opt-out), so the trainer config rules.
    _slurm_job(monkeypatch, {**SLURM_4_NODES, "SLURM_JOB_NAME": "interactive"})
    assert world_size(single) == 1
    monkeypatch.delenv("SLURM_NTASKS")
    torchrun = {"WORLD_SIZE": "4", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    _slurm_job(monkeypatch, torchrun)
    assert world_size(OmegaConf.create({"devices": 2, "num_nodes": 2})) == 4
    with pytest.raises(ConfigError, match="torchrun started 4 processes"):
        world_size(single)
    # WORLD_SIZE alone is what Lightning's own launcher leaves behind, not a launch: ignored.
    for name in ("RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert world_size(single) == 1


def _sbatch(tmp_path: Path, args: list[str], **variables: str) -> list[str]:
    """Run scripts/slurm/train.sbatch as SLURM would; returns the arguments it hands to srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # No SLURM here: this srun only records the command line it was given.
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_RECORD"\n')
    (bin_dir / "srun").chmod(0o755)
    record = tmp_path / "srun_args.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_RECORD": str(record),
                "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NAME": "clip_train", "SLURM_JOB_ID": "100",
                **variables})  # fmt: skip
    subprocess.run(["bash", str(REPO_ROOT / "scripts/slurm/train.sbatch"), *args], env=env, check=True,
                   capture_output=True)  # fmt: skip
    return record.read_text().splitlines()


def test_each_sbatch_job_gets_its_own_run_directory_and_a_requeue_finds_it_again(tmp_path):
    def run_names(args: list[str], **variables: str) -> list[str]:
        return [a for a in _sbatch(tmp_path, args, **variables) if a.startswith("run_name=")]

    lr3, lr5 = ["+experiment=vit_b32", "optimizer.lr=3e-4"], ["+experiment=vit_b32", "optimizer.lr=5e-4"]
    first = run_names(lr3)
    assert len(first) == 1 and first[0].startswith("run_name=clip_train-")
    assert run_names(lr3, SLURM_RESTART_COUNT="1") == first  # the requeued job
    assert run_names(lr3, SLURM_JOB_ID="101") == first  # the same command resubmitted after a crash
    assert run_names(lr5) != first  # another job: another directory
    assert run_names(lr3, SLURM_JOB_NAME="b32") != first
    assert run_names(lr3, SLURM_ARRAY_TASK_ID="3") == [first[0] + "-3"]
    assert run_names([*lr3, "run_name=mine"]) == ["run_name=mine"]  # the user's choice wins
    command = _sbatch(tmp_path, lr3)
    assert command[:4] == [".venv/bin/python", "-m", "clip_train", "trainer=slurm"]


def test_resume_takes_the_newest_of_last_and_the_slurm_preemption_checkpoints(tmp_path):
    cfg = OmegaConf.create({"resume": True, "paths": {"run_dir": str(tmp_path)}})
    assert resume_checkpoint(cfg) is None  # a fresh run directory
    (tmp_path / "checkpoints").mkdir()
    names = ("checkpoints/last.ckpt", "hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt")
    files = {name: tmp_path / name for name in names}
    for age, path in zip((30, 20, 10), files.values()):  # seconds ago: hpc_ckpt_2 is the newest
        torch.save({"global_step": 1}, path)
        os.utime(path, (time.time() - age, time.time() - age))
    assert resume_checkpoint(cfg) == str(files["hpc_ckpt_2.ckpt"])
    os.utime(files["checkpoints/last.ckpt"])  # steps trained after the requeue: last.ckpt is newer again
    assert resume_checkpoint(cfg) == str(files["checkpoints/last.ckpt"])
    cfg.resume = False
    assert resume_checkpoint(cfg) is None


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


@pytest.mark.parametrize(
    "trainer", [["trainer=deepspeed_zero2"], ["trainer=gpu", "trainer.strategy=deepspeed_stage_3"]]
)
def test_gradient_clipping_is_handed_to_deepspeed_which_ignores_lightnings(trainer):
    """Lightning's clip_gradients does nothing under DeepSpeed; the engine clips by its config's value."""
    cfg = _compose(*trainer, "module.gradient_clip_norm=0.5", "data.train_shards=x")
    assert build_strategy(cfg).config["gradient_clipping"] == 0.5
    cfg = _compose(*trainer, "data.train_shards=x")
    strategy = build_strategy(cfg)
    # No clipping asked: a registered name stays a name, and a built strategy gets no gradient_clipping.
    assert strategy == "deepspeed_stage_3" or "gradient_clipping" not in strategy.config


def test_gradient_clipping_under_fsdp_is_refused_up_front():
    cfg = _compose("trainer=fsdp", "module.gradient_clip_norm=1.0", "data.train_shards=x")
    with pytest.raises(ConfigError, match="under FSDP"):
        build_strategy(cfg)
    assert build_strategy(_compose("trainer=ddp_cpu", "module.gradient_clip_norm=1.0")) == "ddp"


def test_missing_shards_are_reported_before_training(tmp_path):
    cfg = _compose(
        f"data.train_shards='{tmp_path}/shard-{{000000..000003}}.tar'", f"paths.run_dir={tmp_path}/run"
    )
    with pytest.raises(ShardError, match=r"shard-000000\.tar"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_recipe_without_training_shards_says_so_before_building_anything(tmp_path):
    cfg = _compose("+experiment=vit_b32", "trainer=cpu", f"paths.run_dir={tmp_path}/run")
    with pytest.raises(ConfigError, match=r"no training data: set data\.train_shards='"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_resuming_with_changed_settings_is_refused_and_harmless_changes_are_not(tmp_path, monkeypatch):
    run = [f"paths.run_dir={tmp_path}/run", "data.train_shards='/data/shard-{000000..000009}.tar'"]
    record_run_settings(_compose(*run))  # a fresh start
    assert json.loads((tmp_path / "run/run_settings.json").read_text())["optimizer.lr"] == 2e-3
    last = str(tmp_path / "run/checkpoints/last.ckpt")
    # How long to train, how to read and log, how the same loss is computed and where the shards are (a
    # requeued job may stage them to a new node-local folder) may change on resume ...
    harmless = ["trainer.max_epochs=40", "data.num_workers=1", "logger=none", "loss.chunk_size=8"]
    check_resumed_settings(_compose(*run, *harmless, "data.train_shards=/scratch/job2/shards"), last)
    # ... but not what the checkpoint would silently override: the model, optimiser, schedule, batch, seed.
    changed = _compose(*run, "optimizer.lr=0.5", "global_batch_size=64")
    with pytest.raises(ConfigError, match="other settings") as refused:
        check_resumed_settings(changed, last)
    message = str(refused.value)
    assert "optimizer.lr: 0.002 -> 0.5" in message and "global_batch_size: 128 -> 64" in message
    assert "run_name=" in message
    with pytest.raises(ConfigError, match=r"model\.\w+: "):
        check_resumed_settings(_compose(*run, "model=vit_tiny"), last)
    check_resumed_settings(changed, checkpoint=None)  # no checkpoint: nothing to contradict
    # Only rank 0 records (ranks of other nodes may share the folder); starting over records anew.
    monkeypatch.setenv("RANK", "1")
    record_run_settings(changed)
    with pytest.raises(ConfigError, match="other settings"):
        check_resumed_settings(changed, last)
    monkeypatch.setenv("RANK", "0")
    record_run_settings(changed)
    check_resumed_settings(changed, last)


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
    gradient_clip_norm: float | None = 1.0,
    callbacks: list[pl.Callback] | None = None,
) -> CLIPTrainingModule:
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
        gradient_clip_norm=gradient_clip_norm,
        micro_batch_size=micro_batch_size,
    )
    precision_arg = (
        {"plugins": [precision]} if isinstance(precision, pl.plugins.Precision) else {"precision": precision}
    )
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         **precision_arg)  # fmt: skip
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


class _GradientNorms(pl.Callback):
    """The global gradient norm the optimiser is about to apply, at every step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())


def test_gradient_clip_norm_caps_the_norm_the_optimiser_applies():
    free, clipped = _GradientNorms(), _GradientNorms()
    _fit(_Batches(2), gradient_clip_norm=None, callbacks=[free])
    _fit(_Batches(2), gradient_clip_norm=0.05, callbacks=[clipped])
    assert len(free.norms) == 2 and min(free.norms) > 0.5  # so the cap below binds at every step
    assert clipped.norms == pytest.approx([0.05] * 2, rel=1e-4)


def test_weight_decay_skips_gains_biases_embeddings_and_the_logit_scale():
    model = build_model("vit-tiny")
    adamw = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.2)
    module = CLIPTrainingModule(model, ContrastiveLoss(), adamw)
    optimizer = module.configure_optimizers()  # no scheduler: the optimiser alone
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    decayed = {name_of[id(p)] for p in decay["params"]}
    undecayed = {name_of[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(undecayed) and decayed | undecayed == set(name_of.values())
    embeddings = {"visual.class_embedding", "visual.positional_embedding", "text.positional_embedding",
                  "text.token_embedding.weight", "logit_scale"}  # fmt: skip
    assert embeddings <= undecayed
    assert {"visual.ln_pre.weight", "text.ln_final.weight", "visual.transformer.resblocks.0.ln_1.weight",
            "text.transformer.resblocks.1.mlp.c_fc.bias", "visual.ln_post.bias"} <= undecayed  # fmt: skip
    # Every gain and bias is undecayed; everything decayed is a weight matrix (or the patch convolution).
    assert all(not n.endswith("bias") and "ln_" not in n for n in decayed)
    assert {"visual.conv1.weight", "visual.proj", "text.text_projection",
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            "text.transformer.resblocks.1.mlp.c_proj.weight"} <= decayed  # fmt: skip
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(115):  # a few steps past the end: the rate stays at the floor
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1)  # step 0 trains at 1/warmup of the rate, not at 0
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[9] == lrs[10] == pytest.approx(1.0)  # the last warm-up step and the start of the cosine
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lrs[110] == lrs[114] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # no rise after the warm-up


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
        "callbacks.checkpoint.keep_last=1", "~callbacks.progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_compile_failure_falls_back_to_eager_mode_with_one_warning(tmp_path, monkeypatch):
    # A real failure: inductor's C++ compiler missing, as on a platform without one.
    import torch._inductor.config as inductor_config

    shards = write_crawler_shards(tmp_path / "shards", [8, 8], image_size=40)

    def run(name: str, *extra: str) -> list[float]:
        cfg = _compose(
            f"data.train_shards='{shards}'", "model=vit_tiny", "+model.vision={layers: 1}",
            "+model.text={layers: 1}", "data.num_workers=0", "global_batch_size=8",
            f"paths.run_dir={tmp_path}/{name}", "trainer.precision=32-true",
            "trainer.max_steps=2", "trainer.log_every_n_steps=1", "logger.0.flush_logs_every_n_steps=1",
            "~callbacks.progress", *extra,
        )  # fmt: skip
        train(cfg)
        metrics = read_metrics(tmp_path / f"{name}/logs/metrics.csv")
        return [m["train/loss"] for _, m in sorted(metrics.items()) if "train/loss" in m]

    eager = run("eager")
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallen_back = run("compiled", "module.compile=true")
    said = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(said) == 1 and "No working C++ compiler" in said[0] and "module.compile=false" in said[0]
    assert fallen_back == eager  # the failed step was redone in eager mode, nothing else changed


def test_a_short_run_logs_every_metric_the_issue_lists(tmp_path):
    shards = write_crawler_shards(tmp_path / "shards", [12, 12], image_size=40)
    cfg = _compose(
        f"data.train_shards='{shards}'", "model=vit_tiny", "data.num_workers=0", "global_batch_size=8",
        f"paths.run_dir={tmp_path}/run", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "logger.0.flush_logs_every_n_steps=1", "~callbacks.progress",
    )  # fmt: skip
    train(cfg)
    metrics = read_metrics(tmp_path / "run/logs/metrics.csv")
    logged = [m for _, m in sorted(metrics.items()) if "train/loss" in m]
    assert len(logged) == 2
    for names in logged:
        assert {"train/loss", "train/temperature", "train/logit_scale", "train/image_to_text_accuracy",
                "train/text_to_image_accuracy", "train/lr", "train/samples_per_second",
                "train/data_wait_seconds"} <= set(names)  # fmt: skip
    first = logged[0]
    # CLIP starts at τ = 0.07; the logit scale multiplying the similarities is 1/τ.
    assert first["train/temperature"] == pytest.approx(0.07, rel=0.01)
    assert first["train/temperature"] * first["train/logit_scale"] == pytest.approx(1.0)
    assert 0 <= first["train/image_to_text_accuracy"] <= 1 and first["train/samples_per_second"] > 0
    assert first["train/data_wait_seconds"] >= 0 and first["train/lr"] > 0


def test_without_overrides_or_demo_shards_it_says_in_one_line_how_to_make_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CLIP_TRAIN_ROOT")}
    proc = subprocess.run([sys.executable, "-m", "clip_train"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "make demo" in lines[0] and "demo/shards" in lines[0], proc.stderr
    assert not (tmp_path / "runs/demo/checkpoints").exists()


def test_an_unexpected_error_keeps_its_traceback_and_a_bad_input_error_is_one_line(tmp_path):
    shards = write_crawler_shards(tmp_path / "shards", [16, 16], image_size=40)
    common = [*_common(shards, tmp_path), "data.num_workers=0", "model=vit_tiny"]
    tests = os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONPATH": tests}
    for extra, during in ((["+callbacks.fail._target_=failing_callback.FailAtStep", "run_name=a"], True),
                          (["micro_batch_size=99", "run_name=b"], False)):  # fmt: skip
        command = [sys.executable, "-m", "clip_train", *common, *extra]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        lines = proc.stderr.splitlines()
        if during:
            assert "Traceback" in proc.stderr, proc.stderr
            assert "ValueError: deliberate failure at step 1" in lines, proc.stderr
        else:
            assert "Traceback" not in proc.stderr, proc.stderr
            assert lines[-1].startswith("error: micro_batch_size=99 must lie in"), proc.stderr


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
    # Three validation shards over two ranks: rank 0 reads two, rank 1 one (uneven on purpose).
    val_shards = write_crawler_shards(tmp_path / "val", [10, 7, 5], image_size=40)
    args = [*_common(shards, tmp_path), "trainer=ddp_cpu", "data.num_workers=1", "trainer.max_epochs=1",
            "micro_batch_size=4", "run_name=ddp", f"data.val_shards='{val_shards}'",
            # No BatchNorm: rank 1's running statistics drift from rank 0's (saved) within the last step.
            "model=vit_tiny"]  # fmt: skip
    proc = _run(args, cwd=tmp_path)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    assert "no `validation_step`" not in out
    metrics = read_metrics(tmp_path / "runs/ddp/logs/metrics.csv")
    losses = [m["train/loss"] for _, m in sorted(metrics.items()) if "train/loss" in m]
    assert len(losses) == 96 // 16
    checkpoint = tmp_path / "runs/ddp/checkpoints/last.ckpt"
    assert checkpoint.exists()

    # Validation ran at the end of the epoch with the final weights: every validation sample once, each
    # rank's batches scored against themselves, the sums reduced over both ranks.
    logged = metrics[96 // 16]
    model = load_model(checkpoint).eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for rank in range(2):
        data = WebDatasetDataModule(
            train_shards=shards, val_shards=val_shards, batch_size=8, num_workers=0, rank=rank, world_size=2,
            image_size=model.image_size, context_length=model.context_length,
        )  # fmt: skip
        for images, tokens, _ in data.val_dataloader():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # trainer.precision bf16-mixed
                out = model(images, tokens)
                loss = ContrastiveLoss(gather=False)(out.image_embeds, out.text_embeds, out.logit_scale)
            n = images.shape[0]
            per_batch = (loss.loss, loss.image_to_text_accuracy, loss.text_to_image_accuracy)
            sums += torch.tensor([*(v.item() * n for v in per_batch), n], dtype=torch.float64)
    assert logged["val/samples"] == sums[3] == 22
    assert logged["val/loss"] == pytest.approx(float(sums[0] / sums[3]), abs=1e-5)
    assert logged["val/image_to_text_accuracy"] == pytest.approx(float(sums[1] / sums[3]), abs=1e-6)
    assert logged["val/text_to_image_accuracy"] == pytest.approx(float(sums[2] / sums[3]), abs=1e-6)


@pytest.mark.slow
def test_tensorboard_curves_continue_across_a_restart_without_doubled_steps(tmp_path):
    """Attempt 1 logs steps 0-3; attempt 2 resumes from a step-2 checkpoint and logs 2-3 again, as a run
    killed after step 3 but checkpointed at step 2 would. TensorBoard must then show each step once, with
    the second attempt's points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = write_crawler_shards(tmp_path / "shards", [16, 16], image_size=40)
    common = [a for a in _common(shards, tmp_path) if "logger.0" not in a and "max_epochs" not in a]
    common += ["logger=tensorboard", "data.num_workers=0", "run_name=tb"]
    checkpoints = tmp_path / "runs/tb/checkpoints"
    at_step_2 = tmp_path / "at-step-2.ckpt"
    started = {}
    for attempt, steps in (("first", 2), ("first", 4), ("second", 4)):
        if attempt == "second":  # back to the state at step 2: the later checkpoints are lost
            shutil.rmtree(checkpoints)
            checkpoints.mkdir()
            at_step_2.replace(checkpoints / "last.ckpt")
        started[attempt] = time.time()
        proc = _run([*common, f"trainer.max_steps={steps}"], cwd=tmp_path)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        if steps == 2:
            shutil.copyfile(checkpoints / "last.ckpt", at_step_2)
    assert len(list((tmp_path / "runs/tb/tensorboard").glob("events.out.tfevents.*"))) == 3

    events = EventAccumulator(str(tmp_path / "runs/tb/tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2, 3]
    assert all(e.wall_time >= started["second"] for e in losses[2:])
    assert all(e.wall_time < started["second"] for e in losses[:2])


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
