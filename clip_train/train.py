"""`python -m clip_train`: compose `configs/` with Hydra, build every object from its `_target_`, and fit.

    python -m clip_train                               # small model on the embedded demo shards (CPU)
    python -m clip_train +experiment=vit_b32           # the CLIP paper's ViT-B/32 recipe
    python -m clip_train --cfg job                     # print the resolved config and exit
    python -m clip_train -m optimizer.lr=1e-4,5e-4     # a local sweep; add hydra/launcher=slurm for SLURM

Runs live in runs/<run_name>; a rerun (or a requeued SLURM job) with the same name resumes from its last
checkpoint, data position included.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
import uuid
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy, StrategyRegistry
from pytorch_lightning.utilities.model_helpers import is_overridden

from clip_train.training.checkpointing import CheckpointWriteError, find_resume_checkpoint, probe_writable
from clip_train.training.preflight import (
    ConfigError,
    check_arguments,
    check_command_line,
    check_demo_shards,
    check_hardware,
    check_resumed_settings,
    check_teacher,
    per_rank_batch_size,
    record_run_settings,
    world_size,
)
from clip_train.training.sharding import ValidatingDeepSpeedStrategy, deepspeed_stage, is_sharded

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("clip_train")


# ----------------------------------------------------------------------------------- config resolvers
def _wandb_offline() -> bool:
    """Log offline unless an API key is configured (environment or ~/.netrc from `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def _run_id(run_dir: str) -> str:
    """A run id stored in the run directory, so that a requeued job continues the same logger run."""
    path = Path(run_dir) / "run_id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


# Lightning's note that does not apply here: the data position is resumed by the data module's own
# state_dict.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# bf16 weights are reported at 32 bits in the model summary: a note on the summary's size estimate only.
warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")


class _WithoutAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger" line, printed at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_WithoutAdverts())

for _name, _fn in (("wandb_offline", _wandb_offline), ("run_id", _run_id)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=True)


# ------------------------------------------------------------------------------- strategy and resume
def build_strategy(cfg: DictConfig) -> Strategy | str:
    """The trainer's strategy, carrying the module's gradient clipping where Lightning cannot apply it.

    The module clips in its own optimiser step (optimisation is manual), through Lightning's clip_gradients.
    Under DeepSpeed that call is a silent no-op: the engine clips inside its step, by the `gradient_clipping`
    of its own config, so the norm goes there. Under FSDP Lightning refuses norm clipping, but only at the
    first step; say so before anything is built."""
    strategy_cfg = cfg.trainer.get("strategy", "auto")
    clip = cfg.module.get("gradient_clip_norm")
    if isinstance(strategy_cfg, DictConfig):
        strategy = instantiate(strategy_cfg)
    elif clip is not None and is_sharded(strategy_cfg):
        # A registered name such as "deepspeed_stage_2": build the object, to configure its clipping.
        strategy = StrategyRegistry.get(strategy_cfg)
    else:
        return strategy_cfg
    if clip is None:
        return strategy
    if isinstance(strategy, DeepSpeedStrategy):
        set_in_config = strategy.config.get("gradient_clipping")
        if set_in_config not in (None, 0, 0.0, clip):
            raise ConfigError(
                f"module.gradient_clip_norm={clip} disagrees with gradient_clipping={set_in_config} in the "
                "DeepSpeed config; set one of them"
            )
        strategy.config["gradient_clipping"] = float(clip)
    elif isinstance(strategy, FSDPStrategy):
        raise ConfigError(
            f"module.gradient_clip_norm={clip} cannot be applied under FSDP (Lightning does not clip sharded "
            "gradients by norm); set module.gradient_clip_norm=null or use trainer=deepspeed_zero3"
        )
    return strategy


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run's checkpoints go: the checkpoint callback's folder (runs/<run_name>/checkpoints)."""
    callback = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    return Path(callback.get("dirpath") or Path(cfg.paths.run_dir) / "checkpoints")


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from (see training.checkpointing.find_resume_checkpoint: last.ckpt if
    intact, else the newest intact step-N.ckpt; a damaged file is named and passed over), or None for a
    fresh start. Preemption checkpoints of older versions (hpc_ckpt_N.ckpt) compete by age."""
    if not cfg.resume:
        return None
    run_dir = Path(cfg.paths.run_dir)
    found = find_resume_checkpoint(checkpoint_dir(cfg), also=sorted(run_dir.glob("hpc_ckpt_*.ckpt")))
    return str(found) if found else None


def check_output_writable(cfg: DictConfig) -> None:
    """Refuse, before any work, a run directory or checkpoint folder that cannot be written."""
    for folder in dict.fromkeys([Path(cfg.paths.run_dir), checkpoint_dir(cfg)]):
        error = probe_writable(folder)
        if error is not None:
            raise ConfigError(
                f"cannot write to {folder} ({error.strerror or error}): the run would lose its checkpoints."
                " Make it writable, or choose another folder with paths.root_dir=... or run_name=..."
            )


# ------------------------------------------------------------------------------------------- training
def train(cfg: DictConfig) -> dict[str, float]:
    """Build the data module, model, Lightning module, callbacks, loggers and trainer from `cfg`; fit.

    Returns the final logged metrics (a sweep optimises one of them)."""
    check_hardware(cfg)
    check_demo_shards(cfg)
    check_teacher(cfg)
    world = world_size(cfg.trainer)
    batch_size = per_rank_batch_size(int(cfg.global_batch_size), world)
    if cfg.micro_batch_size is not None and not 1 <= cfg.micro_batch_size <= batch_size:
        raise ConfigError(
            f"micro_batch_size={cfg.micro_batch_size} must lie in [1, per-rank batch {batch_size}]"
        )
    strategy = build_strategy(cfg)
    validating = bool(cfg.data.get("val_shards"))
    if (
        validating
        and deepspeed_stage(strategy) == 3
        and not isinstance(strategy, ValidatingDeepSpeedStrategy)
    ):
        raise ConfigError(
            "validation (data.val_shards) under ZeRO-3 needs the trainer=deepspeed_zero3 strategy class "
            f"(ValidatingDeepSpeedStrategy), not {type(strategy).__name__}: Lightning's would run each "
            "validation step through the engine, and ranks with more batches would wait forever"
        )
    if cfg.micro_batch_size is not None and cfg.micro_batch_size < batch_size and is_sharded(strategy):
        raise ConfigError(
            f"micro_batch_size={cfg.micro_batch_size} (exact gradient caching) runs under DDP only: it reads "
            "the temperature outside the model's forward pass, where ZeRO-3 and FSDP hold only a shard of "
            "it, and several backward passes per step are not verified under DeepSpeed. Use trainer=gpu "
            "(DDP) with micro_batch_size, or drop micro_batch_size under this strategy"
        )
    ckpt = resume_checkpoint(cfg)
    check_resumed_settings(cfg, ckpt)  # before the model, the teacher and the data are built
    check_output_writable(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    model = instantiate(cfg.model)
    data_overrides = {"batch_size": batch_size, "seed": cfg.seed}
    if cfg.data.get("image_size") is None:
        data_overrides["image_size"] = model.image_size
    if cfg.data.get("context_length") is None:
        data_overrides["context_length"] = model.context_length
    datamodule = instantiate(cfg.data, **data_overrides)
    optimizer, scheduler = instantiate(cfg.optimizer), instantiate(cfg.scheduler)
    for group, factory in (("optimizer", optimizer), ("scheduler", scheduler)):
        check_arguments(group, factory)
    module = instantiate(
        cfg.module, model=model, loss=instantiate(cfg.loss), optimizer=optimizer, scheduler=scheduler
    )
    if is_sharded(strategy) and not getattr(module, "runs_under_sharded_strategies", True):
        raise ConfigError(
            f"{type(module).__name__} does not run under {type(strategy).__name__}; use trainer=gpu (DDP)"
        )
    if validating and not is_overridden("validation_step", module):
        raise ConfigError(
            f"data.val_shards is set, but {type(module).__name__} has no validation on held-out shards "
            "(a distilled student is compared with its teacher by python -m clip_train.distillation.report)"
            ": drop data.val_shards (data.val_shards=null)"
        )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or [])]
    # Without validation shards, no validation loop at all (Lightning would warn about an empty loader).
    no_validation = {} if validating else {"limit_val_batches": 0}
    trainer: pl.Trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False, **no_validation
    )

    if ckpt is None:
        record_run_settings(cfg)
    log.info("run directory %s; %s", cfg.paths.run_dir, f"resuming from {ckpt}" if ckpt else "starting fresh")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _describes_bad_input(error: BaseException) -> bool:
    """Errors our code raises to say what is wrong with the input (ConfigError, ShardError, CheckpointError
    and the other ValueError subclasses of this project), missing files and a checkpoint that cannot be
    written (a full or read-only disk); any other error, a bug included, keeps its traceback."""
    own = type(error).__module__.split(".")[0] in ("clip_train", "data_pipelines")
    return (own and isinstance(error, ValueError)) or isinstance(
        error, FileNotFoundError | CheckpointWriteError
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            if _describes_bad_input(error) and not os.environ.get("HYDRA_FULL_ERROR"):
                # A configuration or data problem: the message is the whole story.
                raise SystemExit(f"error: {error}") from None
            raise
        # One failed job must not end a sweep: record the failure in its run directory and go on.
        run_dir = Path(cfg.paths.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        log.error("job failed (traceback in %s); the sweep continues", run_dir / "error.txt")
        return math.nan
    return metrics.get("train/loss")


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
