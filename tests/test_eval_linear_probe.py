"""Linear probe: L-BFGS reaches the optimum of the regularised objective, the sweep picks λ on held-out
data, and separable features are classified almost perfectly."""

from __future__ import annotations

import pytest
import torch

from clip_train.evaluation.linear_probe import fit_logistic_regression, linear_probe, probe_objective


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
    # λ = 100 flattens the probe towards the prior: it must score below the chosen λ.
    assert result.validation_accuracy[100.0] <= result.validation_accuracy[result.l2]
    assert result.to_dict()["accuracy"] == result.accuracy


def test_bad_arguments():
    x, y = _blobs(2, seed=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        linear_probe(x, y, x, y, 3, validation_fraction=1.5)
    with pytest.raises(ValueError, match="L2 penalty"):
        fit_logistic_regression(x, y, 3, -1.0)
    with pytest.raises(ValueError, match="expected features"):
        fit_logistic_regression(x, y[:-1], 3, 0.1)
