"""The Lightning module that distils a frozen teacher CLIP into a smaller student.

It is a `CLIPTrainingModule` (same optimiser groups, schedule, non-finite-step handling, logging and
checkpoint record) whose step computes `DistillationLoss` instead of the contrastive loss: the student's
embeddings against the teacher's, which come from the teacher's forward pass or from side files precomputed
next to the shards (`clip_train.distillation.teacher_embeddings`).

Two modes. Image tower only (`train_text=False`, the default): the student keeps the teacher's text tower,
frozen, so its text embeddings are the teacher's and only the image tower learns. Both towers
(`train_text=True`): the student's text tower learns too. The teacher never enters the state dict, so
checkpoints hold the student alone and `clip_train.checkpoints.load_model` reads them as any other.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_train.distillation.loss import DistillationLoss, DistillationLossOutput, EmbeddingSizeError
from clip_train.distillation.student import load_teacher
from clip_train.distillation.teacher_embeddings import (
    TeacherEmbeddingTable,
    load_side_files,
    teacher_fingerprint,
)
from clip_train.models import CLIP
from clip_train.training.lightning_module import CLIPTrainingModule, OptimizerFactory, SchedulerFactory


class _WithExtraParameters:
    """An optimiser factory that adds parameters outside the model (the projection) to the decayed group;
    it keeps the wrapped partial's `keywords`, from which the training module reads the weight decay."""

    def __init__(self, factory: OptimizerFactory, extra: list[nn.Parameter]) -> None:
        self.factory, self.extra = factory, extra
        self.keywords = getattr(factory, "keywords", {})

    def __call__(self, groups: list[dict]) -> torch.optim.Optimizer:
        groups[0] = {**groups[0], "params": [*groups[0]["params"], *self.extra]}
        return self.factory(groups)


class DistillationModule(CLIPTrainingModule):
    """Distil `teacher` into `model` (the student).

    Args:
        model: the student CLIP (`clip_train.distillation.build_student`).
        loss: a `DistillationLoss`.
        optimizer, scheduler, gradient_clip_norm, max_consecutive_nonfinite, compile, grad_checkpointing:
            as in `CLIPTrainingModule`.
        teacher: a checkpoint path (anything `load_model` reads) or a CLIP model; frozen.
        train_text: train the student's text tower too; False keeps the teacher's, which the student must
            then hold (build_student copies it).
        teacher_embeddings: read the teacher's embeddings from the side files beside the training shards
            instead of running the teacher.
        projection: when student and teacher embed into spaces of different sizes, learn a linear map from
            the student's to the teacher's for the L1 term (kept in the checkpoint under "projection.").
        micro_batch_size: must be None: gradient caching does not apply to a loss over the teacher's
            distributions (accepted so the training config's common `module` keys fit).
    """

    # The step reads the student's towers and temperature outside the model's forward pass, where FSDP and
    # ZeRO-3 hold only shards of them; distillation runs under DDP (trainer=gpu).
    runs_under_sharded_strategies = False
    # Validation (the contrastive loss on data.val_shards) is the parent's; the distillation loss takes
    # other inputs, so a student is evaluated with clip_train.distillation.report instead.
    validation_step = pl.LightningModule.validation_step

    def __init__(
        self,
        model: CLIP,
        loss: DistillationLoss,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        *,
        teacher: str | Path | CLIP,
        train_text: bool = False,
        teacher_embeddings: bool = False,
        projection: bool = False,
        micro_batch_size: int | None = None,
        gradient_clip_norm: float | None = None,
        max_consecutive_nonfinite: int = 5,
        compile: bool = False,
        grad_checkpointing: bool = False,
        text_length_groups: int = 4,
    ) -> None:
        if micro_batch_size is not None:
            raise ValueError(
                "distillation does not support gradient caching (micro_batch_size): set micro_batch_size=null"
            )
        if not isinstance(loss, DistillationLoss):
            raise TypeError(f"DistillationModule needs a DistillationLoss, got {type(loss).__name__}")
        teacher_model = load_teacher(teacher)
        student_dim, teacher_dim = model.config.embed_dim, teacher_model.config.embed_dim
        if model.image_size != teacher_model.image_size:
            raise ValueError(
                f"the student takes {model.image_size}px images and the teacher "
                f"{teacher_model.image_size}px: both see the same batches, so give the student the "
                "teacher's image_size"
            )
        self.projection: nn.Linear | None = None
        if student_dim != teacher_dim:
            if not train_text:
                raise EmbeddingSizeError(
                    f"the student embeds into {student_dim} dimensions and the teacher into {teacher_dim}: "
                    "distilling the image tower alone keeps the teacher's text tower, so the student's image "
                    f"embeddings must be {teacher_dim}-d. Build the student with the teacher's embed_dim, or "
                    "train both towers (train_text=true) with projection=true"
                )
            if not projection and loss.l1_weight:
                raise EmbeddingSizeError(
                    f"the student embeds into {student_dim} dimensions and the teacher into {teacher_dim}, "
                    "and the L1 term compares the embeddings directly: set projection=true to learn a linear "
                    f"map from {student_dim} to {teacher_dim} dimensions, or l1_weight=0"
                )
            if projection:
                self_projection = nn.Linear(student_dim, teacher_dim, bias=False)
                optimizer = _WithExtraParameters(optimizer, [self_projection.weight])
        super().__init__(
            model,
            loss,
            optimizer,
            scheduler,
            micro_batch_size=None,
            gradient_clip_norm=gradient_clip_norm,
            max_consecutive_nonfinite=max_consecutive_nonfinite,
            compile=compile,
            text_length_groups=text_length_groups,
            grad_checkpointing=grad_checkpointing,
        )
        if student_dim != teacher_dim and projection:
            self.projection = self_projection
        if not train_text:
            if not _same_weights(model.text, teacher_model.text):
                raise ValueError(
                    "distilling the image tower alone keeps the teacher's text tower, but the student's text "
                    "tower holds other weights: build the student with build_student(teacher) (which copies "
                    "it), or set train_text=true"
                )
            for param in model.text.parameters():
                param.requires_grad_(False)
        # Not an attribute nn.Module registers: the teacher is neither trained nor saved with the student.
        teacher_model.check_token_values = False  # as the student's: the data module checks each batch
        self.__dict__["teacher"] = teacher_model
        self.teacher_source = str(teacher) if not isinstance(teacher, CLIP) else "<in-memory model>"
        self.train_text = train_text
        self.use_side_files = teacher_embeddings
        self.table: TeacherEmbeddingTable | None = None

    # ----------------------------------------------------------------------------------------- set-up
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device)
        if self.use_side_files and self.table is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            sources = getattr(datamodule, "sources", None)
            if not sources:
                raise ValueError(
                    "teacher_embeddings=true reads side files beside the training shards, but the trainer "
                    "has no WebDataset data module with shard sources"
                )
            shards = [url for source in sources for url in source.urls]
            self.table = load_side_files(shards, teacher_fingerprint(self.teacher))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distillation"] = {"teacher": self.teacher_source, "train_text": self.train_text}

    # ------------------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def teacher_embeddings(
        self,
        images: Tensor,
        tokens: Tensor,
        keys: list[str] | None,
        text_lengths: list[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, D) unit-norm teacher image and text embeddings of a batch: looked up, or computed."""
        if self.table is not None:
            if keys is None:
                raise ValueError("teacher side files need the batch's sample keys (batch[2]['keys'])")
            image, text = self.table.lookup(keys)
            return image.to(images.device), text.to(images.device)
        image = F.normalize(self.teacher.encode_image(images).float(), dim=-1)
        text = self.teacher.encode_text(tokens, text_lengths, self.text_length_groups)
        return image, F.normalize(text.float(), dim=-1)

    def distillation_output(self, batch) -> DistillationLossOutput:
        """The loss of one batch `(images, tokens[, info])`, with the graph for the backward pass."""
        images, tokens = batch[0], batch[1]
        keys = batch[2].get("keys") if len(batch) > 2 and isinstance(batch[2], dict) else None
        lengths = self._text_lengths(batch)
        teacher_image, teacher_text = self.teacher_embeddings(images, tokens, keys, lengths)
        student = getattr(self.model, "_orig_mod", self.model)
        student_image = F.normalize(self.model.encode_image(images), dim=-1)
        # Image tower only: the student's text tower is the teacher's, so its embeddings are the teacher's.
        student_text = (
            F.normalize(self.model.encode_text(tokens, lengths, self.text_length_groups), dim=-1)
            if self.train_text
            else teacher_text
        )
        projected_image = projected_text = None
        if self.projection is not None:
            projected_image = F.normalize(self.projection(student_image), dim=-1)
            projected_text = F.normalize(self.projection(student_text), dim=-1)
        student_scale, _ = student.logit_scale_and_bias()
        self._last_logit_scale = student_scale.detach()  # logged by the parent's _log_step
        teacher_scale, _ = self.teacher.logit_scale_and_bias()
        return self.loss(
            student_image,
            student_text,
            teacher_image,
            teacher_text,
            teacher_logit_scale=teacher_scale.detach(),
            student_logit_scale=student_scale,
            epoch=self.current_epoch,
            text_trained=self.train_text,
            projected_image=projected_image,
            projected_text=projected_text,
        )

    def forward_backward(self, batch):
        output = self.distillation_output(batch)
        self.manual_backward(output.loss)  # even when non-finite: every rank takes part in the all-reduce
        return output

    def _log_step(self, output, local_batch: int) -> None:
        super()._log_step(output, local_batch)
        parts = {"kl": output.kl, "l1": output.l1, "contrastive": output.contrastive}
        metrics = {f"distill/{name}": value for name, value in parts.items()}
        metrics["distill/temperature"] = torch.tensor(float(output.temperature))
        self.log_dict(metrics, prog_bar=False, sync_dist=False, rank_zero_only=True)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )
