"""Linear probe: multinomial logistic regression on frozen image features (CLIP paper, appendix A.3).

The features are standardised with the training split's mean and standard deviation; the objective is the
mean cross-entropy plus (λ/2)·‖W‖² (the bias is not penalised), minimised with full-batch L-BFGS (the
problem is convex and smooth, so L-BFGS converges in a few dozen iterations). λ is chosen from a small
logarithmic sweep by accuracy on a held-out validation part of the training features; the probe is then
refitted on all training features with that λ and scored on the test features.

torch instead of scikit-learn: the features are already torch tensors (possibly on a GPU), and one
dependency fewer for one convex problem.

`evaluate_linear_probe` runs the whole protocol on image sets: it embeds a training and a test
`ClassificationSet` with the model (`embed_images`) and probes the frozen features;
`split_classification_set` makes the two sets from one labelled set when there is no separate training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_train.evaluation.datasets import ClassificationSet
from clip_train.evaluation.embedding import embed_images
from clip_train.models import CLIP

DEFAULT_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LogisticRegression:
    """A fitted probe: logits = ((x - mean) / std) @ weight.T + bias."""

    weight: Tensor  # (C, D)
    bias: Tensor  # (C,)
    mean: Tensor  # (D,)
    std: Tensor  # (D,)

    def logits(self, features: Tensor) -> Tensor:
        """(N, D) features → (N, C) logits."""
        x = (features.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(dim=1)


def probe_objective(model: LogisticRegression, features: Tensor, labels: Tensor, l2: float) -> Tensor:
    """Mean cross-entropy on standardised features + (l2/2)·‖weight‖² (what `fit_logistic_regression`
    minimises)."""
    return F.cross_entropy(model.logits(features), labels) + 0.5 * l2 * model.weight.pow(2).sum()


def fit_logistic_regression(
    features: Tensor, labels: Tensor, num_classes: int, l2: float, *, max_iter: int = 200, tol: float = 1e-7
) -> LogisticRegression:
    """Fit a probe on (N, D) features and (N,) int64 labels in [0, num_classes), in float64."""
    if features.ndim != 2 or labels.shape != (features.shape[0],) or features.shape[0] == 0:
        raise ValueError(
            f"expected features (N, D) and labels (N,), got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    if l2 < 0:
        raise ValueError(f"the L2 penalty must be >= 0, got {l2}")
    x = features.double()
    labels = labels.long().to(x.device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-8)
    d = x.shape[1]
    probe = LogisticRegression(
        weight=torch.zeros(num_classes, d, dtype=x.dtype, device=x.device, requires_grad=True),
        bias=torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True),
        mean=mean,
        std=std,
    )
    optimizer = torch.optim.LBFGS(
        [probe.weight, probe.bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = probe_objective(probe, x, labels, l2)
        loss.backward()
        return loss

    # Gradients on even when the caller evaluates under torch.no_grad() (as the embedding helpers do).
    with torch.enable_grad():
        optimizer.step(closure)
    return LogisticRegression(probe.weight.detach(), probe.bias.detach(), mean, std)


@dataclass
class LinearProbeResult:
    accuracy: float  # top-1 on the test features
    l2: float  # the chosen penalty
    validation_accuracy: dict[float, float] = field(
        default_factory=dict
    )  # λ → accuracy on the validation part
    probe: LogisticRegression | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "l2": self.l2,
            "validation_accuracy": {str(k): v for k, v in self.validation_accuracy.items()},
        }


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    l2_values: Sequence[float] = DEFAULT_L2,
    validation_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> LinearProbeResult:
    """Sweep `l2_values` on a random `validation_fraction` of the training features, refit on all of them
    with the best λ (ties: the larger λ), and report top-1 accuracy on the test features."""
    n = train_features.shape[0]
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    n_val = max(1, round(n * validation_fraction))
    if n - n_val < 1:
        raise ValueError(f"{n} training samples are too few to hold out a validation part")
    if not l2_values:
        raise ValueError("l2_values is empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    scores: dict[float, float] = {}
    for l2 in l2_values:
        probe = fit_logistic_regression(
            train_features[fit_idx], train_labels[fit_idx], num_classes, l2, max_iter=max_iter
        )
        predicted = probe.predict(train_features[val_idx]).cpu()
        scores[float(l2)] = (predicted == train_labels[val_idx].cpu()).double().mean().item()
    best = max(scores, key=lambda l2: (scores[l2], l2))
    probe = fit_logistic_regression(train_features, train_labels, num_classes, best, max_iter=max_iter)
    accuracy = (probe.predict(test_features).cpu() == test_labels.cpu()).double().mean().item()
    return LinearProbeResult(accuracy=accuracy, l2=best, validation_accuracy=scores, probe=probe)


def split_classification_set(
    dataset: ClassificationSet, test_fraction: float = 0.3, *, seed: int = 0
) -> tuple[ClassificationSet, ClassificationSet]:
    """(train, test) parts of one labelled set, stratified: of each class's n images, round(n ·
    `test_fraction`) chosen at random (at least one when n >= 2, never all) go to the test part, so that
    every class with two or more images is both trained on and tested."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    test_idx = []
    for label in range(len(dataset.classnames)):
        members = (dataset.labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = min(max(1, round(len(members) * test_fraction)), len(members) - 1)
        test_idx += members[:n_test].tolist()
    is_test = torch.zeros(len(dataset), dtype=torch.bool)
    is_test[test_idx] = True
    if is_test.all() or not is_test.any():
        raise ValueError(f"{dataset.name}: too few images per class to split into training and test parts")

    def part(mask: Tensor, suffix: str) -> ClassificationSet:
        indices = mask.nonzero().flatten().tolist()  # original order kept
        return ClassificationSet(
            name=f"{dataset.name}[{suffix}]",
            images=[dataset.images[i] for i in indices],
            labels=dataset.labels[indices],
            classnames=list(dataset.classnames),
        )

    return part(~is_test, "train"), part(is_test, "test")


def evaluate_linear_probe(
    model: CLIP,
    train: ClassificationSet,
    test: ClassificationSet,
    *,
    l2_values: Sequence[float] = DEFAULT_L2,
    validation_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> LinearProbeResult:
    """Linear-probe top-1 of `model`'s frozen image features: embed both sets, sweep `l2_values` on a
    `validation_fraction` of the training features, refit, score the test set (`linear_probe`)."""
    if list(train.classnames) != list(test.classnames):
        raise ValueError(
            f"the probe's training set {train.name!r} and test set {test.name!r} must have the same classes "
            f"in the same order, got {train.classnames} and {test.classnames}"
        )
    common = {"batch_size": batch_size, "num_workers": num_workers, "device": device}
    train_features = embed_images(
        model, train.images, progress=f"{train.name}: images" if progress else None, **common
    )  # (N_train, D)
    test_features = embed_images(
        model, test.images, progress=f"{test.name}: images" if progress else None, **common
    )  # (N_test, D)
    return linear_probe(
        train_features,
        train.labels,
        test_features,
        test.labels,
        len(train.classnames),
        l2_values=l2_values,
        validation_fraction=validation_fraction,
        seed=seed,
        max_iter=max_iter,
    )
