"""The maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cai.losses import bradley_terry_loss
from cai.metrics import calibration_bins, expected_calibration_error, pairwise_accuracy, wilson_interval


def test_bradley_terry_loss_hand_computed():
    # margin 1, p = 1: -log sigma(1) = log(1 + e^-1) = 0.313262
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    # margin 1, p = 0: -log sigma(-1) = log(1 + e) = 1.313262
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(1.3132617, abs=1e-6)
    # soft target p = 0.7, margin 2: 0.7 * log(1 + e^-2) + 0.3 * log(1 + e^2)
    expected = 0.7 * math.log(1 + math.exp(-2)) + 0.3 * math.log(1 + math.exp(2))
    assert bradley_terry_loss(torch.tensor([0.5]), torch.tensor([-1.5]), torch.tensor([0.7])).item() == pytest.approx(expected, abs=1e-6)
    # batch mean; equal rewards give log 2 whatever the target
    batch = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.3]))
    assert batch.item() == pytest.approx((0.3132617 + math.log(2)) / 2, abs=1e-6)
    # stable at huge margins
    assert torch.isfinite(bradley_terry_loss(torch.tensor([1e4]), torch.tensor([-1e4]), torch.tensor([0.0])))


def test_bradley_terry_gradient_moves_rewards_toward_the_target():
    r_a, r_b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    bradley_terry_loss(r_a, r_b, torch.tensor([0.8])).backward()
    # d/dr_a = -(p - sigma(margin)) = -(0.8 - 0.5)
    assert r_a.grad.item() == pytest.approx(-0.3) and r_b.grad.item() == pytest.approx(0.3)


def test_pairwise_accuracy_counts_ties_half_and_swaps_exactly():
    margins = [1.0, -2.0, 0.0, 3.0]
    assert pairwise_accuracy(margins) == pytest.approx(2.5 / 4)
    assert pairwise_accuracy([-m for m in margins]) == pytest.approx(1 - 2.5 / 4)


def test_wilson_interval():
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0


def test_expected_calibration_error():
    # perfectly calibrated: in the 0.8 bin, 4 of 5 outcomes are 1
    assert expected_calibration_error([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx(0.0)
    # always 0.9 confident, right half the time: ECE = 0.4
    assert expected_calibration_error([0.9] * 4, [1, 0, 1, 0]) == pytest.approx(0.4)
    # two bins: 0.2 (outcome 0 -> gap 0.2) and 0.7 (outcome 1 -> gap 0.3), equal weight
    assert expected_calibration_error([0.2, 0.7], [0, 1]) == pytest.approx(0.25)
    assert len(calibration_bins([0.05, 1.0], [0, 1])) == 10
