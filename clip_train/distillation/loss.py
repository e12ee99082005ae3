"""The distillation loss: match the teacher's similarity distributions (KL at a temperature) and its
embeddings (L1), optionally plus the student's own contrastive loss.

Similarity distributions. For a batch of B image/text pairs each model gives a (B, B) matrix of logits
`scale · cos(image_i, text_j)` (`scale` the teacher's temperature, e.g. 100, for both models, so that the
student is asked to reproduce the teacher's distributions rather than its own temperature). Row i softened
at temperature T, softmax(logits_i / T), is image i's distribution over the batch's texts; column j is text
j's distribution over the images. The KL term is

    T² · ½ [ mean_i KL(p_teacher(row i) ‖ p_student(row i)) + mean_j KL(p_teacher(col j) ‖ p_student(col j)) ]

(the T² of Hinton et al., 2015, keeps the gradient's size the same when T changes). The L1 term is the
mean absolute difference between the student's and the teacher's unit-norm image embeddings (and text
embeddings when the text tower is trained too), summed over the embedding dimension and averaged over the
batch. PicCollage distilled CLIP ViT-B/32 with T = 4 for the first epochs, then T = 2:
`TemperatureSchedule([(0, 4.0), (2, 2.0)])`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_train.losses import ContrastiveLoss


class EmbeddingSizeError(ValueError):
    """Teacher and student embeddings of different sizes where the loss compares them directly."""


class TemperatureSchedule:
    """A piecewise-constant distillation temperature by epoch.

    `milestones`: (first epoch, temperature) pairs, e.g. [(0, 4.0), (2, 2.0)] — 4 in epochs 0 and 1, then 2;
    a single number means one temperature throughout. Epochs count from 0.
    """

    def __init__(self, milestones: float | Sequence[Sequence[float]]) -> None:
        if isinstance(milestones, int | float):
            milestones = [(0, float(milestones))]
        pairs = []
        for item in milestones:
            if len(item) != 2:
                raise ValueError(f"a temperature milestone is [first_epoch, temperature], got {list(item)}")
            epoch, temperature = int(item[0]), float(item[1])
            if temperature <= 0:
                raise ValueError(f"distillation temperatures must be positive, got {temperature}")
            pairs.append((epoch, temperature))
        pairs.sort()
        if not pairs or pairs[0][0] != 0:
            raise ValueError(f"the temperature schedule must start at epoch 0, got {pairs}")
        if len({e for e, _ in pairs}) != len(pairs):
            raise ValueError(f"the temperature schedule names an epoch twice: {pairs}")
        self.milestones = pairs

    def __call__(self, epoch: int) -> float:
        return next(t for e, t in reversed(self.milestones) if epoch >= e)

    def __repr__(self) -> str:
        return f"TemperatureSchedule({self.milestones})"


def similarity_kl(
    student_image: Tensor,
    student_text: Tensor,
    teacher_image: Tensor,
    teacher_text: Tensor,
    logit_scale: Tensor | float,
    temperature: float,
) -> Tensor:
    """The symmetric KL term of the module docstring (T² included); all embeddings (B, D·) unit-norm, the
    student's and the teacher's may differ in D. Returns a scalar, differentiable in the student's inputs."""
    scale = float(logit_scale) / temperature
    student = scale * student_image.float() @ student_text.float().T  # (B, B)
    with torch.no_grad():
        teacher = scale * teacher_image.float() @ teacher_text.float().T  # (B, B)
    rows = F.kl_div(
        F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean"
    )
    cols = F.kl_div(
        F.log_softmax(student.T, 1), F.log_softmax(teacher.T, 1), log_target=True, reduction="batchmean"
    )
    return temperature**2 * (rows + cols) / 2


def embedding_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """Σ_d |student − teacher| averaged over the batch; both (B, D)."""
    if student.shape != teacher.shape:
        raise EmbeddingSizeError(
            f"the L1 term compares student and teacher embeddings directly, but the student's are "
            f"{tuple(student.shape)} and the teacher's {tuple(teacher.shape)}: give the student the "
            "teacher's embed_dim, set projection=true on the distillation module (a learned linear map "
            "from the student's to the teacher's space), or l1_weight=0"
        )
    return (student.float() - teacher.float()).abs().sum(dim=1).mean()


class DistillationLossOutput(NamedTuple):
    """`ContrastiveLossOutput`'s fields (loss and the student's in-batch top-1 accuracies) plus the loss's
    parts; a named tuple like it (a named tuple cannot extend another with fields)."""

    loss: Tensor
    image_to_text_accuracy: Tensor
    text_to_image_accuracy: Tensor
    kl: Tensor
    l1: Tensor
    contrastive: Tensor
    temperature: float


class DistillationLoss(nn.Module):
    """kl_weight · KL + l1_weight · L1 (+ contrastive_weight · the student's contrastive loss).

    Args:
        temperature: a number or [[first_epoch, temperature], ...] (see `TemperatureSchedule`).
        kl_weight, l1_weight, contrastive_weight: weights of the three terms (non-negative; not all zero).
        gather: the contrastive term's cross-rank gathering (`ContrastiveLoss`). The KL term uses each
            rank's own batch, as the teacher's distributions are over that batch.
    """

    def __init__(
        self,
        temperature: float | Sequence[Sequence[float]] = ((0, 4.0), (2, 2.0)),
        kl_weight: float = 1.0,
        l1_weight: float = 1.0,
        contrastive_weight: float = 0.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        weights = {"kl_weight": kl_weight, "l1_weight": l1_weight, "contrastive_weight": contrastive_weight}
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0, got {bad}")
        if not any(weights.values()):
            raise ValueError("kl_weight, l1_weight and contrastive_weight are all 0: nothing to train on")
        self.schedule = TemperatureSchedule(temperature)
        self.kl_weight, self.l1_weight, self.contrastive_weight = kl_weight, l1_weight, contrastive_weight
        self.contrastive = ContrastiveLoss(gather=gather, check_finite=False)

    def forward(
        self,
        student_image: Tensor,
        student_text: Tensor,
        teacher_image: Tensor,
        teacher_text: Tensor,
        *,
        teacher_logit_scale: Tensor | float,
        student_logit_scale: Tensor | float,
        epoch: int = 0,
        text_trained: bool = False,
        projected_image: Tensor | None = None,
        projected_text: Tensor | None = None,
    ) -> DistillationLossOutput:
        """Embeddings (B, D) unit-norm. `projected_*`: the student's embeddings mapped into the teacher's
        space (when their sizes differ), used by the L1 term in place of `student_*`. `text_trained`: the
        student's text tower is trained too, so its text embeddings join the L1 term."""
        temperature = self.schedule(epoch)
        zero = student_image.new_zeros(())
        kl = similarity_kl(student_image, student_text, teacher_image, teacher_text, teacher_logit_scale,
                           temperature) if self.kl_weight else zero  # fmt: skip
        l1 = zero
        if self.l1_weight:
            l1 = embedding_l1(student_image if projected_image is None else projected_image, teacher_image)
            if text_trained:
                text = student_text if projected_text is None else projected_text
                l1 = (l1 + embedding_l1(text, teacher_text)) / 2
        # Computed even at weight 0 (without a graph): its accuracies say how well the student retrieves.
        with torch.enable_grad() if self.contrastive_weight else torch.no_grad():
            contrastive = self.contrastive(student_image, student_text, student_logit_scale)
        loss = self.kl_weight * kl + self.l1_weight * l1
        if self.contrastive_weight:
            loss = loss + self.contrastive_weight * contrastive.loss
        return DistillationLossOutput(
            loss=loss,
            image_to_text_accuracy=contrastive.image_to_text_accuracy,
            text_to_image_accuracy=contrastive.text_to_image_accuracy,
            kl=kl.detach(),
            l1=l1.detach(),
            contrastive=contrastive.loss.detach(),
            temperature=temperature,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.schedule.milestones}, kl_weight={self.kl_weight}, "
            f"l1_weight={self.l1_weight}, contrastive_weight={self.contrastive_weight}"
        )
