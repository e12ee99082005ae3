"""Linear probe: L-BFGS reaches the optimum of the regularised objective, the sweep picks λ on held-out
data, separable features are classified almost perfectly, and the protocol runs on image sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_support import colour_model, write_colour_folder

from clip_train.evaluation import image_folder
from clip_train.evaluation.linear_probe import (
    evaluate_linear_probe,
    fit_logistic_regression,
    linear_probe,
    probe_objective,
    split_classification_set,
)


def _blobs(n_per_class: int, seed: int, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0]]) * 3 + 5  # far from the origin
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), 4, generator=g) * torch.tensor(
        [1, 1, 1, 30]
    )
    return features, labels


def test_fit_reaches_the_optimum():
    features, labels = _blobs(40, seed=0, spread=2.0)  # overlapping: a finite, non-trivial optimum
    l2 = 1e-2
    probe = fit_logistic_regression(features, labels, 3, l2)
    weight = probe.weight.clone().requires_grad_(True)
    bias = probe.bias.clone().requires_grad_(True)
    probe.weight, probe.bias = weight, bias
    probe_objective(probe, features, labels, l2).backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5


def test_sweep_and_accuracy_on_separable_features():
    train_x, train_y = _blobs(30, seed=1)
    test_x, test_y = _blobs(20, seed=2)
    l2_values = (1e-4, 1e-2, 1.0, 100.0)
    result = linear_probe(train_x, train_y, test_x, test_y, 3, l2_values=l2_values)
    assert result.accuracy >= 0.95
    assert set(result.validation_accuracy) == set(l2_values)
    assert result.l2 in l2_values and result.validation_accuracy[result.l2] == max(
        result.validation_accuracy.values()
    )
    assert result.to_dict()["accuracy"] == result.accuracy


def _correlated(n_per_class: int, seed: int):
    """Two classes told apart only by x1 - x2: both features share a large common term, and the class
    shifts x1 by 1. A strongly penalised probe's weights follow the class means (x1 alone, swamped by the
    common term); only a weakly penalised one learns to subtract x2."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat(n_per_class)
    common = 5 * torch.randn(len(labels), generator=g)
    x1 = common + labels + 0.2 * torch.randn(len(labels), generator=g)
    x2 = common + 0.2 * torch.randn(len(labels), generator=g)
    return torch.stack([x1, x2], dim=1), labels


def test_the_sweep_rejects_an_over_strong_penalty():
    train_x, train_y = _correlated(60, seed=0)
    test_x, test_y = _correlated(40, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, 2, l2_values=(1e-4, 1e-2, 1.0, 100.0))
    # λ = 100 is near chance on the validation part, far below the λ the sweep chose.
    assert result.l2 < 1.0
    assert result.validation_accuracy[100.0] < 0.7 < 0.9 < result.validation_accuracy[result.l2]
    assert result.accuracy > 0.85


def test_bad_arguments():
    x, y = _blobs(2, seed=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        linear_probe(x, y, x, y, 3, validation_fraction=1.5)
    with pytest.raises(ValueError, match="L2 penalty"):
        fit_logistic_regression(x, y, 3, -1.0)
    with pytest.raises(ValueError, match="expected features"):
        fit_logistic_regression(x, y[:-1], 3, 0.1)


def test_split_is_stratified_disjoint_and_complete(tmp_path):
    dataset = image_folder(write_colour_folder(tmp_path / "c", per_class=5))
    train, test = split_classification_set(dataset, 0.4, seed=3)
    assert sorted(r.path for r in train.images + test.images) == sorted(r.path for r in dataset.images)
    assert torch.bincount(test.labels, minlength=3).tolist() == [2, 2, 2]  # round(5 × 0.4) per class
    for part in (train, test):
        for ref, label in zip(part.images, part.labels.tolist()):
            assert Path(ref.path).parent.name == dataset.classnames[label]
    again = split_classification_set(dataset, 0.4, seed=3)[1]
    assert [r.path for r in again.images] == [r.path for r in test.images]
    with pytest.raises(ValueError, match="test_fraction"):
        split_classification_set(dataset, 1.0)


def test_probe_of_a_model_that_reads_colours_is_perfect(tmp_path):
    # The colour model's image features are the images' mean RGB: a linear probe separates the colours.
    train = image_folder(write_colour_folder(tmp_path / "train", per_class=6))
    test = image_folder(write_colour_folder(tmp_path / "test", per_class=2, seed_offset=50))
    result = evaluate_linear_probe(colour_model(), train, test, l2_values=(1e-3, 1e-1))
    assert result.accuracy == 1.0
    assert set(result.validation_accuracy) == {1e-3, 1e-1}
    other = image_folder(write_colour_folder(tmp_path / "other", per_class=1), ["a", "b", "c"])
    with pytest.raises(ValueError, match="same classes"):
        evaluate_linear_probe(colour_model(), train, other)
