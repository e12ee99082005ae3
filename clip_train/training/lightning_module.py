"""The Lightning module that trains a CLIP model with a contrastive loss.

One training step: encode both towers, let the loss gather embeddings across ranks (with gradients), back-
propagate, clip, step the optimiser and the per-step schedule, then clamp the temperature. Optimisation is
manual so that exact gradient caching (several backward passes per step) and the skipping of non-finite
steps behave the same on one process and under data parallelism.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel

from clip_train.models.clip import check_token_values
from clip_train.training.gradient_cache import gradient_cached_step
from clip_train.training.optim import decayed_parameter_names, parameter_groups
from clip_train.training.sharding import (
    clamp_master_copy_,
    is_sharded,
    promote_scalar_parameters,
    unsharded_model,
    wrap_for_fsdp,
)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps whose loss was NaN or infinite."""


class CLIPTrainingModule(pl.LightningModule):
    """Contrastive training of a two-tower model.

    Args:
        model: a CLIP model (see `clip_train.models.CLIP`).
        loss: `ContrastiveLoss` or `SigLipLoss` from `clip_train.losses`.
        optimizer: a partial optimiser taking parameter groups (Hydra `_partial_: true`); its weight decay
            applies to weight matrices only (see `parameter_groups`).
        scheduler: a partial taking `(optimizer, total_steps=...)`, stepped after every optimiser step.
        micro_batch_size: when smaller than the per-rank batch, use exact gradient caching with micro-batches
            of this size (`clip_train.training.gradient_cache`).
        gradient_clip_norm: clip the global gradient norm to this value (None: no clipping). Under DeepSpeed
            the engine does the clipping: `clip_train.train.build_strategy` puts this value in its config.
        max_consecutive_nonfinite: stop with `NonFiniteLossError` after this many non-finite steps in a row.
        compile: wrap the model in `torch.compile`.
        grad_checkpointing: recompute activations in the backward pass to save memory.
    """

    runs_under_sharded_strategies = True  # FSDP, DeepSpeed ZeRO (a subclass may say otherwise)

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        micro_batch_size: int | None = None,
        gradient_clip_norm: float | None = None,
        max_consecutive_nonfinite: int = 5,
        compile: bool = False,
        grad_checkpointing: bool = False,
        text_length_groups: int = 4,
    ) -> None:
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer or null, got {micro_batch_size}")
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")
        if text_length_groups < 0:
            raise ValueError(f"text_length_groups must be >= 0 (0: full padding), got {text_length_groups}")
        self.automatic_optimization = False
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.micro_batch_size = micro_batch_size
        self.gradient_clip_norm = gradient_clip_norm
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.compile = compile
        self.text_length_groups = text_length_groups
        # The data module checks token values once per batch, in its workers; in the step, that check
        # would cost a device synchronisation.
        model.check_token_values = False
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.nonfinite_steps = 0  # total over the run, logged
        self._consecutive_nonfinite = 0
        self._last_step_end: float | None = None
        self._data_wait = 0.0
        self._decayed_names: set[str] | None = None  # set in configure_model, before any wrapping

    # ----------------------------------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        # Runs before the strategy wraps the model. Which parameters get weight decay is decided by shape,
        # so decide it now: FSDP later turns every parameter into a 1-D view of its shard. And the sharded
        # strategies refuse 0-dim tensors.
        self._decay_decision()
        strategy = self.trainer.strategy
        if is_sharded(strategy):
            promote_scalar_parameters(self.model)
        if isinstance(strategy, FSDPStrategy) and not isinstance(self.model, FullyShardedDataParallel):
            self.model = wrap_for_fsdp(strategy, self.model)
        if self.compile and not getattr(self, "_compiled", False):
            self.model = torch.compile(self.model)
            self._compiled = True
            self._compile_unproven = True  # until its first step has run

    def configure_optimizers(self):
        inner = getattr(self.model, "_orig_mod", self.model)
        groups = parameter_groups(
            inner, weight_decay=self._optimizer_weight_decay(), decayed_names=self._decay_decision()
        )
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _decay_decision(self) -> set[str]:
        """Names of the parameters that get weight decay, decided once on the unwrapped model (configure_model
        runs before any wrapping; a module used outside Trainer.fit decides at its first optimiser)."""
        if self._decayed_names is None:
            inner = getattr(self.model, "_orig_mod", self.model)
            self._decayed_names = decayed_parameter_names(inner, inner.no_weight_decay_param_names())
        return self._decayed_names

    def _optimizer_weight_decay(self) -> float:
        keywords = getattr(self.optimizer_factory, "keywords", {}) or {}
        return float(keywords.get("weight_decay", 0.0))

    def on_fit_start(self) -> None:
        if (
            self.micro_batch_size is not None
            and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        ):
            raise ValueError(
                "gradient caching (micro_batch_size) cannot be combined with fp16's dynamic loss scale; "
                "use trainer.precision=bf16-mixed"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The architecture travels with the weights, so evaluation and export can rebuild the model from
        # the checkpoint alone (clip_train.checkpoints.load_model).
        from clip_train.checkpoints import clip_config_to_dict

        checkpoint["clip_config"] = clip_config_to_dict(getattr(self.model, "_orig_mod", self.model).config)
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))

    # ------------------------------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._data_wait = 0.0 if self._last_step_end is None else now - self._last_step_end
        self._step_start = now

    def training_step(self, batch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        output = self._forward_backward_or_eager(batch)
        if self._apply_update(optimizer, output.loss):
            self._log_step(output, batch[0].shape[0])
        return output.loss.detach()

    def _forward_backward_or_eager(self, batch):
        """forward_backward; if torch.compile fails at its first step (a platform it does not support, no
        C++ compiler, ...), the model falls back to eager mode with one warning and the step is redone.
        Compilation fails before anything runs, so the redone step is the step eager mode would have run."""
        if not getattr(self, "_compile_unproven", False):
            return self.forward_backward(batch)
        try:
            return self.forward_backward(batch)
        except torch._dynamo.exc.TorchDynamoException as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(
                f"torch.compile failed on this platform ({reason}); training goes on in eager mode. Set "
                "module.compile=false to skip the attempt.",
                stacklevel=2,
            )
            self.model = self.model._orig_mod
            self.optimizers().zero_grad(set_to_none=True)
            return self.forward_backward(batch)
        finally:
            self._compile_unproven = False

    def forward_backward(self, batch):
        """Compute the loss of `batch` and back-propagate it into `.grad`; returns the loss output."""
        images, tokens = batch[0], batch[1]
        text = {"text_lengths": self._text_lengths(batch), "text_groups": self.text_length_groups}
        if self.micro_batch_size is not None and self.micro_batch_size < images.shape[0]:
            # Gradient caching runs under DDP only (train.py refuses the sharded strategies), where the
            # temperature parameter is whole outside the forward pass.
            self._last_logit_scale = (
                getattr(self.model, "_orig_mod", self.model).logit_scale_and_bias()[0].detach()
            )
            return gradient_cached_step(
                self.model,
                self.loss,
                images,
                tokens,
                self.micro_batch_size,
                backward=self.manual_backward,
                no_sync=getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext),
                **text,
            )
        encoded = self.model(images, tokens, **text)
        self._last_logit_scale = encoded.logit_scale.detach()
        output = self.loss(encoded.image_embeds, encoded.text_embeds, encoded.logit_scale, encoded.logit_bias)
        # Back-propagate even a non-finite loss: every rank must take part in the gradient all-reduce.
        self.manual_backward(output.loss)
        return output

    def _text_lengths(self, batch) -> list[int] | None:
        """The captions' lengths, which the data module computed in its workers after checking the token
        values; None (every caption padded) without length groups. A batch that comes without lengths (not
        from our data module) has its token values checked here instead, at one device synchronisation."""
        info = batch[2] if len(batch) > 2 and isinstance(batch[2], dict) else {}
        lengths = info.get("text_lengths")
        if lengths is None:
            text = _clip_config(self.model).text
            check_token_values(batch[1], text.vocab_size, text.eot_token_id)
        return lengths if self.text_length_groups else None

    def _apply_update(self, optimizer, loss: Tensor) -> bool:
        """Step the optimiser and the schedule and clamp the temperature, unless the loss was not finite on
        some rank (then the gradients are dropped and the step is counted). Returns whether it stepped."""
        if not self._all_ranks_finite(loss):
            optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite_step(loss)
            return False
        self._consecutive_nonfinite = 0
        if self.gradient_clip_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        inner = getattr(self.model, "_orig_mod", self.model)
        inner.clamp_logit_scale_()
        clamp_master_copy_(self.trainer.strategy, inner.logit_scale, inner.config.max_logit_scale)
        return True

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._last_step_end = time.perf_counter()

    def _all_ranks_finite(self, loss: Tensor) -> bool:
        return self.trainer.strategy.reduce_boolean_decision(
            bool(torch.isfinite(loss.detach()).item()), all=True
        )

    def _on_nonfinite_step(self, loss: Tensor) -> None:
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), rank_zero_only=True)
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"the loss was not finite for {self._consecutive_nonfinite} consecutive steps (last value "
                f"{loss.item()}, global step {self.global_step}); lower the learning rate, enable gradient "
                "clipping (module.gradient_clip_norm) or use bf16 instead of fp16"
            )
        warnings.warn(
            f"non-finite loss ({loss.item()}) at global step {self.global_step}: step skipped "
            f"({self._consecutive_nonfinite} in a row, stopping at {self.max_consecutive_nonfinite})",
            stacklevel=2,
        )

    # ------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        # Ranks hold different numbers of validation batches; under FSDP and ZeRO-3 that needs a copy of
        # the model that runs without collectives (see unsharded_model). (train.py refuses Lightning's own
        # DeepSpeed class here: it would call each step through the engine.)
        self._val_resources = contextlib.ExitStack()
        self._val_model = self._val_resources.enter_context(
            unsharded_model(self.trainer.strategy, self.model)
        )
        self._val_model.eval()

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        """Loss and in-batch accuracies on the validation shards (`data.val_shards`), each batch against
        itself: ranks hold different numbers of validation batches, so nothing is gathered per batch;
        sums are reduced over ranks once, at the end."""
        images, tokens = batch[0], batch[1]
        encoded = self._val_model(images, tokens)
        gather, self.loss.gather = self.loss.gather, False
        try:
            output = self.loss(
                encoded.image_embeds, encoded.text_embeds, encoded.logit_scale, encoded.logit_bias
            )
        finally:
            self.loss.gather = gather
        n = images.shape[0]
        per_batch = (output.loss, output.image_to_text_accuracy, output.text_to_image_accuracy)
        self._val_sums += torch.stack(
            [*(v.detach().double() * n for v in per_batch), self._val_sums.new_tensor(n)]
        )

    def on_validation_epoch_end(self) -> None:
        self._val_resources.close()
        del self._val_model
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        samples = float(sums[3])
        if samples == 0:
            return
        metrics = dict(
            zip(
                ("val/loss", "val/image_to_text_accuracy", "val/text_to_image_accuracy"),
                (sums[:3] / samples).tolist(),
                strict=True,
            )
        )
        metrics["val/samples"] = samples
        # Already reduced over ranks: straight to the loggers (self.log would ask for another reduction).
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _log_step(self, output, local_batch: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        world = self.trainer.world_size
        # The value the step's forward used: under ZeRO-3 and FSDP the parameter itself is a shard (often
        # empty) outside the forward pass.
        logit_scale = self._last_logit_scale.float()
        metrics = {
            "train/loss": output.loss.detach(),
            "train/image_to_text_accuracy": output.image_to_text_accuracy,
            "train/text_to_image_accuracy": output.text_to_image_accuracy,
            # The parameter is log(1/τ): exp of it is the factor the cosine similarities are multiplied by
            # (clamped at 100), and τ is its inverse. Both are logged under their own names.
            "train/logit_scale": logit_scale,
            "train/temperature": 1.0 / logit_scale,
            "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
            "train/samples_per_second": torch.tensor(local_batch * world / max(elapsed, 1e-9)),
            "train/data_wait_seconds": torch.tensor(self._data_wait),
        }
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "corrupt_samples"):
            metrics["train/corrupt_samples_skipped"] = torch.tensor(float(datamodule.corrupt_samples))
        self.log_dict(metrics, prog_bar=False, sync_dist=False, rank_zero_only=True)
        self.log("loss", output.loss.detach(), prog_bar=True, logger=False, rank_zero_only=True)


def _clip_config(model: nn.Module):
    """The CLIPConfig of a model, through the wrappers of compile, DDP, FSDP and DeepSpeed."""
    while not hasattr(model, "config") or not hasattr(model.config, "text"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model.config
