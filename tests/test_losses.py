"""Long-tail losses against hand values (ride.md section 2.4) and direct formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ltroute.datasets import long_tailed_counts
from ltroute.losses import (
    balanced_softmax_loss,
    cross_entropy,
    effective_number_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    log_class_prior,
    logit_adjusted_loss,
    ride_diversity_loss,
    weighted_mean,
)

CIFAR100_LT = long_tailed_counts(500, 100, 100)
# (class index, n_c, LDAM margin m_c, DRW weight w_c) from the RIDE spec's table.
HAND_VALUES = [
    (0, 500, 0.1581, 0.0449),
    (34, 102, 0.2353, 0.2157),
    (35, 98, 0.2376, 0.2244),
    (69, 20, 0.3536, 1.0954),
    (70, 19, 0.3581, 1.1530),
    (99, 5, 0.5000, 4.3783),
]


@pytest.mark.parametrize("c, n_c, margin, weight", HAND_VALUES)
def test_ldam_margins_and_drw_weights_match_the_spec_table(c, n_c, margin, weight):
    assert CIFAR100_LT[c] == n_c
    assert ldam_margins(CIFAR100_LT)[c].item() == pytest.approx(margin, abs=5e-5)
    assert effective_number_weights(CIFAR100_LT)[c].item() == pytest.approx(weight, abs=5e-5)


def test_drw_weights_sum_to_number_of_classes_and_beta_zero_is_uniform():
    assert effective_number_weights(CIFAR100_LT).sum().item() == pytest.approx(100, rel=1e-6)
    assert_close(effective_number_weights([7, 300, 2], beta=0.0), torch.ones(3))


def test_ldam_margin_formula_by_hand():
    # m_c = 0.5 * n_c^-1/4 / max_j n_j^-1/4: rarest class gets 0.5.
    m = ldam_margins([16, 1], max_margin=0.5)
    assert_close(m, torch.tensor([0.5 * 16 ** -0.25, 0.5]))


def test_ldam_loss_subtracts_scaled_margin_from_true_logit_only():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    target = torch.tensor([0, 2])
    margins = torch.tensor([0.1, 0.2, 0.4])
    shifted = torch.tensor([[2.0 - 30 * 0.1, 1.0, 0.0], [0.5, 0.5, 3.0 - 30 * 0.4]])
    assert_close(ldam_loss(logits, target, margins=margins, scale=30.0),
                 F.cross_entropy(shifted, target))


def test_weighted_reduction_normalises_by_weights_of_present_labels():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.3, 0.1]])
    target = torch.tensor([0, 1, 1])
    weight = torch.tensor([2.0, 0.5])
    per = F.cross_entropy(logits, target, reduction="none")
    expected = (2.0 * per[0] + 0.5 * per[1] + 0.5 * per[2]) / (2.0 + 0.5 + 0.5)
    assert_close(cross_entropy(logits, target, weight=weight), expected)
    assert_close(weighted_mean(per, target, weight), expected)


def test_focal_loss_hand_value_and_gamma_zero_is_cross_entropy():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p_y = 0.75 for y = 0
    target = torch.tensor([0])
    expected = (1 - 0.75) ** 2 * -math.log(0.75)
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    z = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    w = torch.rand(4) + 0.5
    assert_close(focal_loss(z, y, gamma=0.0, weight=w), F.cross_entropy(z, y, weight=w))


def test_logit_adjustment_adds_tau_log_prior_and_equals_balanced_softmax_at_tau_one():
    counts = torch.tensor([90.0, 9.0, 1.0])
    log_prior = log_class_prior(counts)
    assert_close(log_prior, torch.log(torch.tensor([0.9, 0.09, 0.01])))
    z = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 2, 1])
    assert_close(logit_adjusted_loss(z, y, log_prior=log_prior, tau=2.0),
                 F.cross_entropy(z + 2.0 * log_prior, y))
    # Balanced Softmax: -log(n_y e^{z_y} / sum_j n_j e^{z_j}).
    balanced = -torch.log_softmax(z + torch.log(counts), dim=1)[torch.arange(5), y].mean()
    assert_close(balanced_softmax_loss(z, y, log_prior=log_prior), balanced)
    assert_close(logit_adjusted_loss(z, y, log_prior=log_prior, tau=1.0), balanced)


@pytest.mark.parametrize("counts, match", [([], "non-empty"), ([3, 0], "positive"),
                                           ([[1, 2]], "1-D")])
def test_bad_class_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        effective_number_weights(counts)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights([1, 2], beta=1.0)


def test_diversity_loss_takes_a_temperature_as_number_tensor_array_or_list():
    """A scalar temperature divides as a number (no tensor made on the device per step);
    every other form of the same temperature gives the same loss, and per class as well."""
    z = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    reference = ride_diversity_loss(z, temperature=torch.tensor(1.5))
    for same in (1.5, np.float32(1.5), np.full(5, 1.5), [1.5] * 5):
        assert_close(ride_diversity_loss(z, temperature=same), reference)
    per_class = torch.linspace(0.5, 2.0, 5)
    assert_close(ride_diversity_loss(z, temperature=per_class.numpy()),
                 ride_diversity_loss(z, temperature=per_class))
    assert not torch.allclose(ride_diversity_loss(z, temperature=per_class), reference)
