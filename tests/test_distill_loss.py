"""The distillation loss against brute-force formulas, the temperature schedule, the student's
architecture, and the agreement measures of the report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_train.distillation import (
    DistillationLoss,
    EmbeddingSizeError,
    TemperatureSchedule,
    embedding_l1,
    image_tower_parameters,
    similarity_kl,
    student_config,
)
from clip_train.distillation.report import ranking_agreement
from clip_train.models import CLIP, get_model_config


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1
    )


def _brute_force_kl(si, st, ti, tt, scale, temperature) -> float:
    """T² · ½ (mean over rows + mean over columns) of KL(teacher ‖ student), with explicit loops."""
    n = si.shape[0]

    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return [e / sum(exps) for e in exps]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    s = [[scale * float(si[i] @ st[j]) / temperature for j in range(n)] for i in range(n)]
    t = [[scale * float(ti[i] @ tt[j]) / temperature for j in range(n)] for i in range(n)]
    rows = sum(kl(softmax(t[i]), softmax(s[i])) for i in range(n)) / n
    cols = (
        sum(kl(softmax([t[i][j] for i in range(n)]), softmax([s[i][j] for i in range(n)])) for j in range(n))
        / n
    )
    return temperature**2 * (rows + cols) / 2


@pytest.mark.parametrize("temperature", [4.0, 2.0, 1.0])
def test_kl_at_a_temperature_matches_the_brute_force_formula(temperature):
    si, st, ti, tt = (_unit(6, 8, seed=s) for s in range(4))
    got = similarity_kl(si, st, ti, tt, logit_scale=20.0, temperature=temperature)
    expected = _brute_force_kl(si, st, ti, tt, 20.0, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_kl_compares_distributions_so_embedding_sizes_may_differ_and_is_zero_on_agreement():
    ti, tt = _unit(5, 8, seed=0), _unit(5, 8, seed=1)
    assert similarity_kl(ti, tt, ti, tt, 100.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    si, st = _unit(5, 4, seed=2), _unit(5, 4, seed=3)  # a 4-d student against an 8-d teacher
    assert similarity_kl(si, st, ti, tt, 100.0, 4.0).item() > 0


def test_l1_sums_over_dimensions_and_refuses_different_sizes_naming_the_projection():
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.0, 0.5]])
    assert embedding_l1(a, b).item() == pytest.approx((2.5 + 0.5) / 2)
    with pytest.raises(EmbeddingSizeError, match="projection=true"):
        embedding_l1(torch.zeros(2, 4), torch.zeros(2, 8))


def test_the_loss_combines_its_terms_with_their_weights_and_only_grads_the_student():
    si = _unit(4, 8, seed=0).float().requires_grad_()
    tt, ti = _unit(4, 8, seed=1).float(), _unit(4, 8, seed=2).float()
    loss = DistillationLoss(
        temperature=[[0, 4.0], [1, 2.0]], kl_weight=0.5, l1_weight=2.0, contrastive_weight=1.0
    )
    out = loss(si, tt, ti, tt, teacher_logit_scale=50.0, student_logit_scale=torch.tensor(50.0), epoch=1)
    assert out.temperature == 2.0
    assert out.loss.item() == pytest.approx(
        0.5 * out.kl.item() + 2.0 * out.l1.item() + out.contrastive.item(), rel=1e-5
    )
    out.loss.backward()
    assert si.grad is not None and si.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="all 0"):
        DistillationLoss(kl_weight=0, l1_weight=0)


def test_the_temperature_schedule_follows_its_milestones_and_rejects_bad_ones():
    schedule = TemperatureSchedule([[0, 4.0], [2, 2.0]])  # PicCollage: 4 for the first epochs, then 2
    assert [schedule(e) for e in range(5)] == [4.0, 4.0, 2.0, 2.0, 2.0]
    assert TemperatureSchedule(3.0)(7) == 3.0
    with pytest.raises(ValueError, match="start at epoch 0"):
        TemperatureSchedule([[1, 4.0]])
    with pytest.raises(ValueError, match="positive"):
        TemperatureSchedule([[0, 0.0]])


def test_the_default_student_of_vit_b32_is_picCollages_half_width_half_depth():
    teacher = get_model_config("ViT-B/32")
    config = student_config(teacher)
    assert (config.vision.width, config.vision.layers, config.vision.heads) == (384, 6, 12)
    assert config.text == teacher.text and config.embed_dim == teacher.embed_dim
    assert student_config(teacher, heads="double").vision.heads == 24
    with torch.device("meta"):
        ratio = image_tower_parameters(CLIP(config)) / image_tower_parameters(CLIP(teacher))
    assert ratio <= 0.30  # the bound; ~0.25 (the conv stem and projection shrink only by half)
    resnet = student_config(get_model_config("RN50"))
    assert resnet.vision.layers == (2, 2, 3, 2) and resnet.vision.width == 32
    with pytest.raises(ValueError, match="heads"):
        student_config(teacher, heads="triple")


def test_agreement_is_perfect_for_the_same_ranking_and_average_precision_matches_by_hand():
    scores = torch.randn(7, 20, generator=torch.Generator().manual_seed(0))
    same = ranking_agreement(scores, scores * 3 + 1, k=5)  # a monotone map keeps the ranking
    assert same.top_k_overlap == 1.0 and same.map_at_teacher == pytest.approx(1.0)
    assert ranking_agreement(scores, -scores, k=5).top_k_overlap == 0.0
    teacher = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])  # teacher's top-2: items 0 and 1
    student = torch.tensor([[0.0, 3.0, 4.0, 1.0, 2.0]])  # student ranks 2, 1, 4, 3, 0
    got = ranking_agreement(teacher, student, k=2)
    assert got.top_k_overlap == 0.5
    assert got.map_at_teacher == pytest.approx((1 / 2 + 2 / 5) / 2)  # item 1 at rank 2, item 0 at rank 5
    with pytest.raises(ValueError, match="k must lie"):
        ranking_agreement(teacher, student, k=6)
