"""Zero-shot classification (Radford et al., 2021, section 3.1): class names × prompt templates → one text
classifier per class, scored against image features.

Prompt ensembling: each of a class's prompts is embedded and L2-normalised, the embeddings are averaged
and the mean is re-normalised — a class's weight vector is the direction of its average prompt. An image's
predicted class is the one whose weight vector has the largest cosine similarity with its features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_train.evaluation.datasets import ClassificationSet, ImageRef
from clip_train.evaluation.distributed import AllGather, gather_embeddings, rank_range
from clip_train.evaluation.embedding import (
    TextTokenizer,
    embed_images,
    embed_texts,
    model_device,
    tokenizer_for,
)
from clip_train.evaluation.templates import check_classnames, check_templates, fill_templates
from clip_train.models import CLIP


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The C × T prompts, class-major: prompt c·T + t is template t filled with class c."""
    classnames = check_classnames(list(classnames))
    templates = check_templates(list(templates))
    return [prompt for name in classnames for prompt in fill_templates(name, templates)]


def classifier_from_text_embeddings(text_embeds: Tensor, num_classes: int) -> Tensor:
    """(C·T, D) prompt embeddings, class-major → (C, D) unit-norm class weights (normalise, mean over the T
    templates, re-normalise)."""
    if text_embeds.shape[0] % num_classes:
        raise ValueError(f"{text_embeds.shape[0]} prompt embeddings do not split into {num_classes} classes")
    per_class = F.normalize(text_embeds.float(), dim=-1).view(
        num_classes, -1, text_embeds.shape[-1]
    )  # (C,T,D)
    return F.normalize(per_class.mean(dim=1), dim=-1)  # (C, D)


def zero_shot_classifier(
    model: CLIP,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: str | None = None,
) -> Tensor:
    """(C, D) unit-norm class weights of `classnames` under the prompt ensemble `templates`."""
    prompts = class_prompts(classnames, templates)
    embeds = embed_texts(
        model,
        tokenizer or tokenizer_for(model),
        prompts,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    return classifier_from_text_embeddings(embeds, len(classnames))


@dataclass
class ClassificationMetrics:
    """Scores of N predictions over C classes.

    top1/top5: fraction of images whose class is among the 1 / min(5, C) highest-scoring classes.
    mean_per_class_recall: the mean, over classes with at least one image, of the fraction of that class's
    images predicted as it (insensitive to class imbalance). per_class_recall: NaN for classes without images.
    confusion: int64 (C, C), row = true class, column = predicted class.
    """

    num_samples: int
    top1: float
    top5: float
    mean_per_class_recall: float
    per_class_recall: list[float]
    confusion: Tensor

    def to_dict(self, classnames: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(classnames) if classnames is not None else [str(i) for i in range(len(self.confusion))]
        return {
            "num_samples": self.num_samples,
            "top1": self.top1,
            "top5": self.top5,
            "mean_per_class_recall": self.mean_per_class_recall,
            "per_class_recall": {
                n: (None if math.isnan(r) else r) for n, r in zip(names, self.per_class_recall, strict=True)
            },
            "confusion_matrix": self.confusion.tolist(),
        }


def classification_metrics(logits: Tensor, labels: Tensor) -> ClassificationMetrics:
    """Metrics of (N, C) scores against (N,) int64 labels in [0, C)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    n, c = logits.shape
    if n == 0:
        raise ValueError("no samples to score")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got values in [{labels.min()}, {labels.max()}]")
    top = logits.topk(min(5, c), dim=1).indices  # (N, k)
    hits = top == labels[:, None]  # (N, k)
    predicted = top[:, 0]
    confusion = torch.bincount(labels * c + predicted, minlength=c * c).view(c, c)
    support = confusion.sum(dim=1)
    recall = confusion.diagonal().double() / support.double()  # NaN where a class has no images
    present = support > 0
    return ClassificationMetrics(
        num_samples=n,
        top1=hits[:, 0].float().mean().item(),
        top5=hits.any(dim=1).float().mean().item(),
        mean_per_class_recall=recall[present].mean().item(),
        per_class_recall=recall.tolist(),
        confusion=confusion,
    )


@dataclass
class ZeroShotResult:
    dataset: str
    classnames: list[str]
    num_templates: int
    metrics: ClassificationMetrics
    predictions: Tensor  # (N,) int64 top-1 class per image
    probabilities: Tensor  # (N, C) softmax over classes at the model's temperature

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "num_classes": len(self.classnames),
            "num_templates": self.num_templates,
            **self.metrics.to_dict(self.classnames),
        }


def zero_shot_scores(image_embeds: Tensor, classifier: Tensor, logit_scale: float) -> Tensor:
    """(N, D) unit-norm image features × (C, D) class weights → (N, C) logits (cosine × temperature)."""
    return logit_scale * image_embeds.float() @ classifier.float().T


@torch.no_grad()
def evaluate_zero_shot(
    model: CLIP,
    dataset: ClassificationSet,
    templates: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
    all_gather: AllGather | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy of `model` on `dataset` with the prompt ensemble `templates`.

    With `world` > 1, this rank embeds only its `rank_range` of the prompts and of the images, and
    `all_gather` (see `clip_train.evaluation.distributed`) assembles the rest; every rank returns the same
    result. Call it on every rank."""
    prompts = class_prompts(dataset.classnames, templates)
    mine = rank_range(len(prompts), rank, world)
    prompt_embeds = embed_texts(
        model,
        tokenizer or tokenizer_for(model),
        prompts[mine.start : mine.stop],
        device=device,
        progress=f"{dataset.name}: class prompts" if progress else None,
    )
    prompt_embeds = gather_embeddings(
        prompt_embeds, len(prompts), rank, world, all_gather, model_device(model)
    )
    classifier = classifier_from_text_embeddings(prompt_embeds, len(dataset.classnames))
    mine = rank_range(len(dataset.images), rank, world)
    image_embeds = embed_images(
        model,
        dataset.images[mine.start : mine.stop],
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=f"{dataset.name}: images" if progress else None,
    )
    image_embeds = gather_embeddings(
        image_embeds, len(dataset.images), rank, world, all_gather, model_device(model)
    )
    return zero_shot_result(dataset, len(templates), image_embeds, classifier, model_logit_scale(model))


def zero_shot_result(
    dataset: ClassificationSet,
    num_templates: int,
    image_embeds: Tensor,
    classifier: Tensor,
    logit_scale: float,
) -> ZeroShotResult:
    """Score already computed features (the callback gathers them across ranks first)."""
    logits = zero_shot_scores(image_embeds, classifier, logit_scale)  # (N, C)
    return ZeroShotResult(
        dataset=dataset.name,
        classnames=list(dataset.classnames),
        num_templates=num_templates,
        metrics=classification_metrics(logits, dataset.labels),
        predictions=logits.argmax(dim=1),
        probabilities=logits.softmax(dim=1),
    )


def model_logit_scale(model: CLIP) -> float:
    """The temperature exp(logit_scale) the model uses, clamped as in its forward pass."""
    return float(model.logit_scale.detach().float().clamp(max=model.config.max_logit_scale).exp())


@torch.no_grad()
def caption_probabilities(
    model: CLIP,
    images: Sequence[ImageRef],
    texts: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: str | None = None,
) -> Tensor:
    """(N, T) float32 on the CPU: for each of the N images, the probability of each of the T texts — the
    softmax over the texts of the cosine similarities times the model's temperature (zero-shot with each
    text as its own class and prompt). A SigLIP bias is the same for every text, so it cancels out."""
    texts = list(texts)
    if not texts:
        raise ValueError("caption_probabilities needs at least one text")
    text_embeds = embed_texts(model, tokenizer or tokenizer_for(model), texts, device=device)  # (T, D)
    image_embeds = embed_images(
        model, images, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress
    )  # (N, D)
    return zero_shot_scores(image_embeds, text_embeds, model_logit_scale(model)).softmax(dim=1)
