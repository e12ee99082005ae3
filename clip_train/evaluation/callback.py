"""A Lightning callback that evaluates zero-shot classification and retrieval during training.

Every `every_n_steps` optimiser steps and once at the end of training, every rank embeds its slice of
each evaluation set (`clip_train.evaluation.distributed.rank_range`), the slices are all-gathered, and each
rank computes the same metrics; they are logged to the trainer's loggers as `<prefix>/<set>/<metric>` (and
put in `trainer.callback_metrics`, so a sweep can optimise them). Evaluation sets come from the Hydra
config (configs/callbacks/zero_shot_eval.yaml):

    zero_shot:
      - name: shapes
        imagefolder: data/eval/shapes      # or shards: "data/eval/shard-{000000..000003}.tar"
        classnames: data/eval/classes.txt  # a file, or a list of names (optional for image folders)
        templates: single                  # single | imagenet80 | a template file | a list of templates
    retrieval:
      - name: captions
        folder: data/eval/captioned        # or shards: "..."

The sets are read (file lists, labels, captions; not pixels) once, when fitting starts, so that a bad
path fails before the first step. The model is evaluated in eval mode without gradients, inside the
trainer's precision context, and put back into training mode afterwards. The model's parameters must be
whole on every rank (DDP or single device; not FSDP or DeepSpeed ZeRO-3, which shard them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from clip_train.evaluation.datasets import (
    ClassificationSet,
    DatasetError,
    RetrievalSet,
    captioned_folder,
    captioned_shards,
    image_folder,
    labelled_shards,
)
from clip_train.evaluation.embedding import tokenizer_for
from clip_train.evaluation.retrieval import evaluate_retrieval
from clip_train.evaluation.templates import check_templates, load_classnames, load_templates
from clip_train.evaluation.zero_shot import evaluate_zero_shot
from clip_train.training.sharding import unsharded_model


@dataclass
class ZeroShotSpec:
    name: str
    dataset: ClassificationSet
    templates: list[str]


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def zero_shot_set_from_spec(spec: Mapping[str, Any]) -> ZeroShotSpec:
    """Read one `zero_shot` entry of the config (see the module docstring)."""
    spec = dict(spec)
    name = str(spec.get("name") or "")
    if not name:
        raise DatasetError(f"a zero_shot evaluation set needs a 'name', got {spec}")
    classnames_spec = spec.get("classnames")
    classnames = None
    if isinstance(classnames_spec, str):
        classnames = load_classnames(classnames_spec)
    elif classnames_spec is not None:
        classnames = [str(c) for c in classnames_spec]
    templates_spec = spec.get("templates", "single")
    if isinstance(templates_spec, str):
        templates = load_templates(templates_spec)
    else:
        templates = check_templates([str(t) for t in templates_spec], f"zero_shot set {name!r}")
    if spec.get("imagefolder"):
        dataset = image_folder(spec["imagefolder"], classnames, name=name)
    elif spec.get("shards"):
        if classnames is None:
            raise DatasetError(f"zero_shot set {name!r}: labelled shards need 'classnames'")
        dataset = labelled_shards(_as_list(spec["shards"]), classnames, name=name)
    else:
        raise DatasetError(f"zero_shot set {name!r} needs 'imagefolder' or 'shards', got keys {sorted(spec)}")
    return ZeroShotSpec(name, dataset, templates)


def retrieval_set_from_spec(spec: Mapping[str, Any]) -> RetrievalSet:
    """Read one `retrieval` entry of the config (see the module docstring)."""
    spec = dict(spec)
    name = str(spec.get("name") or "")
    if not name:
        raise DatasetError(f"a retrieval evaluation set needs a 'name', got {spec}")
    if spec.get("folder"):
        return captioned_folder(spec["folder"], name=name)
    if spec.get("shards"):
        return captioned_shards(_as_list(spec["shards"]), name=name)
    raise DatasetError(f"retrieval set {name!r} needs 'folder' or 'shards', got keys {sorted(spec)}")


class EvaluationCallback(pl.Callback):
    """Zero-shot classification and retrieval every `every_n_steps` optimiser steps and at the end of
    training, spread over all ranks.

    Args:
        every_n_steps: evaluate when the global step is a multiple of this; 0 evaluates only at the end.
        zero_shot: zero-shot sets, each {name, imagefolder | shards, classnames, templates}.
        retrieval: captioned sets, each {name, folder | shards}.
        batch_size: images per forward pass on each rank.
        num_workers: DataLoader workers decoding images on each rank.
        at_train_end: also evaluate when training ends (unless the last step was just evaluated).
        prefix: metric names are `<prefix>/<set name>/<metric>`.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        zero_shot: Sequence[Mapping[str, Any]] = (),
        retrieval: Sequence[Mapping[str, Any]] = (),
        batch_size: int = 64,
        num_workers: int = 0,
        at_train_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at the end), got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.every_n_steps = every_n_steps
        self.zero_shot_specs = [dict(s) for s in (zero_shot or ())]
        self.retrieval_specs = [dict(s) for s in (retrieval or ())]
        if not self.zero_shot_specs and not self.retrieval_specs:
            raise ValueError("EvaluationCallback needs at least one zero_shot or retrieval set")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.at_train_end = at_train_end
        self.prefix = prefix
        self.zero_shot_sets: list[ZeroShotSpec] = []
        self.retrieval_sets: list[RetrievalSet] = []
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.load_sets()

    def load_sets(self) -> None:
        """Read the configured sets (file lists, labels, captions); raises naming any bad path or file."""
        if self.zero_shot_sets or self.retrieval_sets:
            return
        zero_shot = [zero_shot_set_from_spec(s) for s in self.zero_shot_specs]
        retrieval = [retrieval_set_from_spec(s) for s in self.retrieval_specs]
        names = [s.name for s in zero_shot] + [s.name for s in retrieval]
        if len(set(names)) != len(names):
            raise DatasetError(f"evaluation set names must be unique, got {names}")
        self.zero_shot_sets, self.retrieval_sets = zero_shot, retrieval

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run every evaluation set on every rank; log and return the metrics (the same on every rank)."""
        started = time.perf_counter()
        self._last_step = trainer.global_step
        trained = _clip(pl_module)
        rank, world = trainer.global_rank, trainer.world_size

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.all_gather(tensor)  # (world, *shape)

        metrics: dict[str, float] = {}
        was_training = trained.training
        try:
            with (
                torch.no_grad(),
                _precision_context(trainer),
                unsharded_model(trainer.strategy, trained) as model,
            ):
                model.eval()
                common = {
                    "tokenizer": tokenizer_for(model),
                    "batch_size": self.batch_size,
                    "num_workers": self.num_workers,
                    "rank": rank,
                    "world": world,
                    "all_gather": all_gather,
                }
                for zs in self.zero_shot_sets:
                    result = evaluate_zero_shot(model, zs.dataset, zs.templates, **common)
                    key = f"{self.prefix}/{zs.name}"
                    metrics[f"{key}/zero_shot_top1"] = result.metrics.top1
                    metrics[f"{key}/zero_shot_top5"] = result.metrics.top5
                    metrics[f"{key}/zero_shot_mean_per_class_recall"] = result.metrics.mean_per_class_recall
                for rs in self.retrieval_sets:
                    scores = evaluate_retrieval(model, rs, **common)
                    key = f"{self.prefix}/{rs.name}"
                    metrics |= {f"{key}/image_to_text_R@{k}": v for k, v in scores.image_to_text.items()}
                    metrics |= {f"{key}/text_to_image_R@{k}": v for k, v in scores.text_to_image.items()}
        finally:
            trained.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        summary = ", ".join(f"{k.removeprefix(self.prefix + '/')}={v:.4f}" for k, v in metrics.items())
        rank_zero_info(
            f"evaluation at step {trainer.global_step} ({time.perf_counter() - started:.1f} s on {world} "
            f"rank(s)): {summary}"
        )
        return metrics


def _clip(pl_module: pl.LightningModule) -> Any:
    """The CLIP model inside the training module, as trained (unsharded_model takes off its wrappers)."""
    model = getattr(pl_module, "model", None)
    if model is None:
        raise TypeError(f"{type(pl_module).__name__} has no `.model` (a CLIP) to evaluate")
    return model


def _precision_context(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    plugin = getattr(trainer.strategy, "precision_plugin", None)
    return plugin.forward_context() if plugin is not None else contextlib.nullcontext()
