"""`python -m clip_train`: compose `configs/` with Hydra, build every object from its `_target_`, and fit.

    python -m clip_train                               # small model on the embedded demo shards (CPU)
    python -m clip_train +experiment=vit_b32           # the CLIP paper's ViT-B/32 recipe
    python -m clip_train --cfg job                     # print the resolved config and exit
    python -m clip_train -m optimizer.lr=1e-4,5e-4     # a local sweep; add hydra/launcher=slurm for SLURM

Runs live in runs/<run_name>; a rerun (or a requeued SLURM job) with the same name resumes from its last
checkpoint, data position included.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import traceback
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy, StrategyRegistry
from pytorch_lightning.utilities.model_helpers import is_overridden

from clip_train.training.sharding import (
    ValidatingDeepSpeedStrategy,
    deepspeed_stage,
    is_sharded,
    is_sharded_class,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("clip_train")


class ConfigError(ValueError):
    """A configuration that cannot run, found before any work starts."""


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


# Lightning's notes that do not apply here: checkpoints are taken after the optimiser step on purpose
# (the state of step N), and the data position is resumed by the data module's own state_dict.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
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


# ------------------------------------------------------------------------------------ checks up front
def configured_world_size(trainer_cfg: DictConfig) -> int:
    """Processes the trainer config wants: devices per node × nodes ("auto" devices: visible GPUs or 1)."""
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        accelerator = trainer_cfg.get("accelerator", "auto")
        devices = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else 1
        devices = max(devices, 1)
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


def launched_world_size(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(processes, where that number came from) when an external launcher started the processes, else None.

    Follows Lightning's own detection, because Lightning takes its world from these variables and not from
    the trainer config: SLURM tasks (srun, the submitit launcher) unless the job is named "bash" or
    "interactive" (Lightning's opt-out), then torchrun's WORLD_SIZE. Lightning's own child processes also
    carry WORLD_SIZE, but without torchrun's GROUP_RANK, so a stale value left by an earlier job of a local
    sweep is not mistaken for a launcher's."""
    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(env["SLURM_NTASKS"]), f"SLURM started {env['SLURM_NTASKS']} tasks (SLURM_NTASKS)"
    if all(k in env for k in ("WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        return int(env["WORLD_SIZE"]), f"torchrun started {env['WORLD_SIZE']} processes (WORLD_SIZE)"
    return None


def world_size(trainer_cfg: DictConfig, environ: Mapping[str, str] | None = None) -> int:
    """Processes the run will have, the divisor of the global batch.

    Under SLURM or torchrun the launcher has already fixed the world, and Lightning joins every process it
    started whatever trainer.num_nodes says; a trainer config that disagrees would silently give each rank
    the wrong share of the global batch (e.g. a 4-node sweep with num_nodes=1: a 4× larger global batch).
    Such a mismatch is a ConfigError."""
    configured = configured_world_size(trainer_cfg)
    launched = launched_world_size(environ)
    if launched is not None and launched[0] != configured:
        raise ConfigError(
            f"{launched[1]}, but the trainer config asks for {configured} processes "
            f"(trainer.devices={trainer_cfg.get('devices', 1)} × trainer.num_nodes="
            f"{trainer_cfg.get('num_nodes', 1)}), so the per-rank batch would be wrong. Under SLURM add "
            "trainer=slurm (devices and nodes then follow the job), or set trainer.devices and "
            "trainer.num_nodes to match the launch"
        )
    return configured


def per_rank_batch_size(global_batch_size: int, world: int) -> int:
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % world:
        raise ConfigError(
            f"global_batch_size={global_batch_size} does not divide over {world} processes "
            f"(trainer.devices × trainer.num_nodes); choose a multiple of {world}"
        )
    return global_batch_size // world


def check_hardware(cfg: DictConfig) -> None:
    """DeepSpeed and FSDP need CUDA (Lightning refuses them on a CPU): say so before anything is built.

    A strategy class may declare `runs_on_cpu = True`: the test suite's subclass of FSDPStrategy, which
    lifts Lightning's CPU refusal to run the sharded code paths on CPU processes."""
    strategy = cfg.trainer.get("strategy", "auto")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        module_name, _, class_name = target.rpartition(".")
        try:
            strategy_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"trainer.strategy._target_={target!r} names no class: {error}") from None
        needs_cuda = is_sharded_class(strategy_class) and not getattr(strategy_class, "runs_on_cpu", False)
    else:
        target = str(strategy)
        needs_cuda = is_sharded(target)
    if (needs_cuda or accelerator in ("gpu", "cuda")) and not torch.cuda.is_available():
        raise ConfigError(
            f"the trainer config (strategy {target}, accelerator {accelerator}) needs CUDA, "
            "but torch sees no GPU here; use trainer=cpu or trainer=ddp_cpu on this machine"
        )


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


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The newest of last.ckpt and the checkpoints Lightning's SLURM plugin writes when a job is preempted
    (hpc_ckpt_N.ckpt in the run directory), or None for a fresh start."""
    if not cfg.resume:
        return None
    run_dir = Path(cfg.paths.run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    # exists(), not is_file(): under DeepSpeed a checkpoint is a directory of per-rank shards.
    existing = [p for p in candidates if p.exists()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


# What a run's trajectory is made of. A checkpoint restores the model, optimiser and schedule as they were,
# so resuming with any of these changed would silently train on with the old values. Exempt: settings that
# change how the same numbers are computed, not which.
FIXED_FOR_A_RUN = (
    "model",
    "loss",
    "optimizer",
    "scheduler",
    "global_batch_size",
    "seed",
    "data.train_shards",
)
FREE_TO_CHANGE = frozenset({"loss.chunk_size", "optimizer.fused", "optimizer.foreach"})
RUN_SETTINGS = "run_settings.json"


def _fixed_settings(cfg: DictConfig) -> dict[str, object]:
    """FIXED_FOR_A_RUN resolved and flattened to {"optimizer.lr": 0.0005, ...}."""
    flat: dict[str, object] = {}

    def visit(key: str, value: object) -> None:
        if OmegaConf.is_dict(value) or isinstance(value, dict):
            for name, sub in value.items():
                visit(f"{key}.{name}", sub)
        elif key not in FREE_TO_CHANGE:
            flat[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    for key in FIXED_FOR_A_RUN:
        visit(key, OmegaConf.select(cfg, key))
    return flat


def check_resumed_settings(cfg: DictConfig, checkpoint: str | None) -> None:
    """Refuse to resume a run whose model, loss, optimiser, schedule, batch, seed or shards were changed
    (they would be ignored: the checkpoint holds the old ones); record them when the run starts fresh."""
    path = Path(cfg.paths.run_dir) / RUN_SETTINGS
    current = _fixed_settings(cfg)
    if checkpoint is None or not path.is_file():  # a fresh start (or a run older than this check)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # every rank writes the same text; the last rename wins
        return
    saved = json.loads(path.read_text())
    changed = [
        f"{key}: {saved.get(key, '(unset)')} -> {current.get(key, '(unset)')}"
        for key in sorted(saved.keys() | current.keys())
        if key not in FREE_TO_CHANGE and saved.get(key) != current.get(key)
    ]
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ConfigError(
            f"{cfg.paths.run_dir} holds a run with other settings ({shown}); resuming it from "
            f"{checkpoint} would keep the old ones. Give this run its own name (run_name=...), or put the "
            "settings back"
        )


def check_demo_shards(cfg: DictConfig) -> None:
    """The default config trains on the demo's shards; without them, say in one line how to make them."""
    if OmegaConf.is_missing(cfg.data, "train_shards"):
        raise ConfigError(
            "no training data: set data.train_shards='/data/shards/shard-{000000..000999}.tar' (a brace "
            "pattern of WebDataset shards, quoted; `python -m data_pipelines.download` writes them)"
        )
    shards = cfg.data.get("train_shards")
    if isinstance(shards, str) and shards.rstrip("/").endswith("demo/shards") and not Path(shards).is_dir():
        raise ConfigError(
            f"no demo shards in {shards}: run `make demo` to generate and crawl them, "
            "or train on your own with data=webdataset data.train_shards='/path/shard-{000000..000099}.tar'"
        )


def check_arguments(group: str, factory: object) -> None:
    """A `_partial_` factory (the optimiser, the schedule) is only called inside Lightning's fit, where an
    unknown key (`+optimizer.lrr=1`) would end in a TypeError deep in Lightning: name it up front."""
    if not isinstance(factory, functools.partial):
        return
    parameters = inspect.signature(factory.func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(factory.keywords) - set(parameters))
    if unknown:
        name = f"{factory.func.__module__}.{factory.func.__qualname__}"
        raise ConfigError(
            f"{', '.join(f'{group}.{k}' for k in unknown)}: not an argument of {name}, which takes "
            f"{', '.join(k for k in parameters if k not in ('self', 'params', 'optimizer'))}"
        )


def check_teacher(cfg: DictConfig) -> None:
    """A distillation run's teacher checkpoint must exist (Hydra would report it wrapped, with no fix)."""
    teacher = cfg.get("teacher")
    if teacher is not None and not Path(str(teacher)).exists():
        raise ConfigError(
            f"teacher checkpoint {teacher} not found: pass teacher=PATH (a clip_train or OpenAI-layout "
            "checkpoint of the model to distil; `make demo` writes demo/runs/demo/checkpoints/last.ckpt)"
        )


# ------------------------------------------------------------------------------------------- training
class _TrainingPhase(pl.Callback):
    """Whether training has begun: an error before it is a set-up problem whose message says it all, an
    error during it needs its traceback (see main)."""

    started = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True


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
    phase = _TrainingPhase()
    callbacks = [*(instantiate(c) for c in (cfg.get("callbacks") or {}).values()), phase]
    loggers = [instantiate(c) for c in (cfg.get("logger") or [])]
    # Without validation shards, no validation loop at all (Lightning would warn about an empty loader).
    no_validation = {} if validating else {"limit_val_batches": 0}
    trainer: pl.Trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False, **no_validation
    )

    ckpt = resume_checkpoint(cfg)
    check_resumed_settings(cfg, ckpt)
    if ckpt:  # a resumed run's checkpoint folder is not empty, by design
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    log.info("run directory %s; %s", cfg.paths.run_dir, f"resuming from {ckpt}" if ckpt else "starting fresh")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except Exception as error:
        error.during_training = phase.started  # read by main
        raise
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


_BRACE_RANGE = re.compile(r"\{\d+\.\.\d+\}")


def check_command_line(argv: list[str]) -> None:
    """Mistakes Hydra reports only with a parser error, a 25-line traceback or not at all: a brace range left
    unquoted (Hydra reads `{` as a dictionary; the shell expands it into one override per shard, of which
    Hydra keeps the last, silently) and the SLURM launcher on a machine without SLURM."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    paths: dict[str, list[str]] = {}
    for key, _, value in (arg.partition("=") for arg in overrides):
        if "/" in value:
            paths.setdefault(key, []).append(value)
    for key, values in paths.items():
        # Paths that differ only in their numbers, one override each: the shell's expansion of a brace range.
        if len(values) > 1 and len({re.sub(r"\d+", "#", v) for v in values}) == 1:
            raise SystemExit(
                f"error: {key} is given {len(values)} times, as the shell expands an unquoted brace pattern "
                "(Hydra would keep only the last path). Quote it: "
                f"\"{key}='/data/shard-{{000000..000099}}.tar'\""
            )
    for arg in overrides:
        key, _, value = arg.partition("=")
        if _BRACE_RANGE.search(value) and value[:1] not in ("'", '"'):
            raise SystemExit(
                f"error: quote the brace pattern so that Hydra takes it as one string: \"{key}='{value}'\""
            )
    if "hydra/launcher=slurm" in argv and shutil.which("sbatch") is None:
        raise SystemExit(
            "error: hydra/launcher=slurm submits jobs with sbatch, which is not on this machine's PATH: run "
            "the sweep from a SLURM login node, or drop hydra/launcher=slurm to run its jobs here in turn"
        )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            up_front = not getattr(error, "during_training", False)
            if (
                up_front
                and isinstance(error, ValueError | FileNotFoundError)
                and not os.environ.get("HYDRA_FULL_ERROR")
            ):
                # A configuration or data problem found before training: the message is the whole story.
                # Once training runs, an error keeps its traceback.
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
