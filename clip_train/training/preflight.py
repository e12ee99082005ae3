"""Checks made before any work starts: each names what is wrong and how to fix it, in one line.

The command line (what Hydra would misread), the world size and the per-rank batch, the hardware the
strategy needs, the training data and the distillation teacher, the optimiser's and schedule's keys, and
whether a resumed run still has the settings its checkpoint was trained with. `python -m clip_train` shows
a ConfigError as one line, without a traceback.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clip_train.training.sharding import is_sharded, is_sharded_class


class ConfigError(ValueError):
    """A configuration that cannot run, found before any work starts."""


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
    """Each of the `world` processes' equal share of global_batch_size (samples per optimiser step)."""
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % world:
        below = global_batch_size // world * world
        nearest = f"{below} or {below + world}" if below else str(world)
        raise ConfigError(
            f"global_batch_size={global_batch_size} does not divide over {world} processes "
            f"(trainer.devices × trainer.num_nodes): every process takes an equal share; set "
            f"global_batch_size to a multiple of {world}, e.g. {nearest}"
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


# What a run's trajectory is made of. A checkpoint restores the model, optimiser and schedule as they were,
# so resuming with any of these changed would silently train on with the old values. Not the shards'
# paths: a requeued SLURM job may stage the same shards to a new node-local folder. Exempt too: settings that
# change how the same numbers are computed, not which.
FIXED_FOR_A_RUN = ("model", "loss", "optimizer", "scheduler", "global_batch_size", "seed")
FREE_TO_CHANGE = frozenset({"loss.chunk_size", "optimizer.fused", "optimizer.foreach"})
RUN_SETTINGS = "run_settings.json"


def _fixed_settings(cfg: DictConfig) -> dict[str, object]:
    """FIXED_FOR_A_RUN resolved and flattened to {"optimizer.lr": 0.0005, ...}."""
    flat: dict[str, object] = {}

    def visit(key: str, value: object) -> None:
        if OmegaConf.is_dict(value) or isinstance(value, dict):
            for name, sub in value.items():
                visit(f"{key}.{name}", sub)
        else:
            flat[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    for key in FIXED_FOR_A_RUN:
        visit(key, OmegaConf.select(cfg, key))
    return flat


def _global_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher set it (torchrun, SLURM, Lightning's own children), else 0."""
    env = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def record_run_settings(cfg: DictConfig) -> None:
    """At a fresh start, keep what check_resumed_settings compares a later resume against (rank 0 only)."""
    if _global_rank() != 0:
        return
    path = Path(cfg.paths.run_dir) / RUN_SETTINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(_fixed_settings(cfg), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def check_resumed_settings(cfg: DictConfig, checkpoint: str | None) -> None:
    """Refuse to resume a run whose model, loss, optimiser, schedule, batch or seed were changed: they would
    be ignored, the checkpoint holds the old ones. (A run older than this check has no record: let it be.)"""
    path = Path(cfg.paths.run_dir) / RUN_SETTINGS
    if checkpoint is None or not path.is_file():
        return
    saved, current = json.loads(path.read_text()), _fixed_settings(cfg)
    changed = [
        f"{key}: {saved.get(key, '(unset)')} -> {current.get(key, '(unset)')}"
        for key in sorted(saved.keys() | current.keys())
        if key.split(".")[0] in FIXED_FOR_A_RUN and key not in FREE_TO_CHANGE
        and saved.get(key) != current.get(key)
    ]  # fmt: skip
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


_BRACE_RANGE = re.compile(r"\{\d+\.\.\d+\}")


def _shell_expansion(values: list[str]) -> bool:
    """Whether repeated values of one key look like the shell's expansion of an unquoted shard range
    {a..b}: tar paths, none of them quoted or braced, alike but for one run of digits of equal width, and
    those consecutive. (A wrapper script may repeat an override on purpose; Hydra keeps the last.)"""
    if (
        len(values) < 2
        or not all(".tar" in v for v in values)
        or any(c in v for v in values for c in "{}'\"")
    ):
        return False
    split = [re.split(r"(\d+)", v) for v in values]
    if len({len(parts) for parts in split}) != 1:
        return False
    differing = [i for i in range(len(split[0])) if len({parts[i] for parts in split}) > 1]
    if len(differing) != 1 or differing[0] % 2 == 0:  # odd positions hold the digit runs
        return False
    runs = [parts[differing[0]] for parts in split]
    numbers = [int(r) for r in runs]
    return len({len(r) for r in runs}) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def check_command_line(argv: list[str]) -> None:
    """Mistakes Hydra reports only with a parser error, a 25-line traceback or not at all: a brace range left
    unquoted (Hydra reads `{` as a dictionary; the shell expands it into one override per shard, of which
    Hydra keeps the last, silently) and the SLURM launcher on a machine without SLURM."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    values: dict[str, list[str]] = {}
    for key, _, value in (arg.partition("=") for arg in overrides):
        values.setdefault(key, []).append(value)
    for key, given in values.items():
        if _shell_expansion(given):
            raise SystemExit(
                f"error: {key} is given {len(given)} times, as the shell expands an unquoted brace pattern "
                "(Hydra would keep only the last). Quote it: "
                f"\"{key}='/data/shard-{{000000..000099}}.tar'\""
            )
    for arg in overrides:
        key, _, value = arg.partition("=")
        if _BRACE_RANGE.search(value) and value[:1] not in ("'", '"'):
            raise SystemExit(
                f"error: quote the brace pattern so that Hydra takes it as one string: \"{key}='{value}'\""
            )
    submits = {"hydra/launcher=slurm", "hydra/launcher=submitit_slurm"} & set(argv)
    only_prints = {"--cfg", "-c", "--help", "-h", "--info", "--hydra-help"} & set(argv)
    if submits and not only_prints and shutil.which("sbatch") is None:
        raise SystemExit(
            f"error: {submits.pop()} submits jobs with sbatch, which is not on this machine's PATH: run the "
            "sweep from a SLURM login node, or drop the launcher override to run its jobs here in turn"
        )
