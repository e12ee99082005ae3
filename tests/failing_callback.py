"""A callback that raises a plain ValueError once training has started, as a bug would: `python -m
clip_train` must show its traceback, not shorten it like our bad-input errors (+callbacks.fail._target_)."""

from __future__ import annotations

import pytorch_lightning as pl


class FailAtStep(pl.Callback):
    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.global_step == self.step:
            raise ValueError(f"deliberate failure at step {self.step}")
