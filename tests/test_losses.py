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


# --- PPO ---------------------------------------------------------------------------------------

from cai.losses import (  # noqa: E402
    AdaptiveKLController,
    gae,
    kl_estimate,
    logprobs_and_entropy,
    masked_mean,
    ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def test_gae_and_returns_hand_computed():
    # one response of 3 tokens (a 4th position is padding), gamma = 1, lambda = 0.5
    r = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    # deltas: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.4 - 0.2 = 0.2; d0 = 0 + 0.2 - 0.5 = -0.3
    # A2 = 0.6; A1 = 0.2 + 0.5 * 0.6 = 0.5; A0 = -0.3 + 0.5 * 0.5 = -0.05
    assert adv.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.45, 0.7, 1.0, 0.0])
    # lambda = 1, gamma = 1: advantages are (sum of future rewards) - V
    adv1, _ = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv1.tolist()[0] == pytest.approx([0.5, 0.8, 0.6, 0.0])
    # discounting: gamma = 0.5, lambda = 1 -> A0 = 0.25 * 1 - 0.5
    adv2, _ = gae(r, v, m, gamma=0.5, lam=1.0)
    assert adv2[0, 0].item() == pytest.approx(-0.25)


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = token_rewards(torch.tensor([2.0, -1.0]), kl, m, beta=0.5)
    assert out.flatten().tolist() == pytest.approx([-0.05, -0.1, 1.85, -1.25, 0.0, 0.0])
    # responses start after their prompt: the score still lands on the last response token
    after_prompt = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    out = token_rewards(torch.tensor([3.0]), torch.zeros(1, 4), after_prompt, beta=0.5)
    assert out.flatten().tolist() == [0.0, 0.0, 3.0, 0.0]


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    # mean 2, variance 2/3 over the three masked-in values
    assert w.tolist()[0] == pytest.approx([-1.224744, 0.0, 1.224744, 0.0], abs=1e-5)
    assert whiten(x, m, shift_mean=False).tolist()[0] == pytest.approx([0.775256, 2.0, 3.224744, 0.0], abs=1e-5)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # q/p - 1 - log(q/p)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    # k1 and k3 are unbiased: their means over samples from p approach KL(p || q)
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    exact = (p * (p / q).log()).sum().item()
    for kind in ("k1", "k3"):
        mean = (p * kl_estimate(p.log(), q.log(), kind)).sum().item()
        assert mean == pytest.approx(exact, abs=1e-6)


def test_ppo_policy_loss_clips():
    m = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.0]]))  # ratios 1.5, 0.9, 1.0
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, m, clip=0.2)
    # token 0: ratio 1.5 clipped to 1.2 (A>0) -> -1.2; token 1: -min(-0.9, -0.9) -> 0.9; token 2: -2
    assert loss.item() == pytest.approx((-1.2 + 0.9 - 2.0) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() > 0


def test_value_loss_clips():
    m = torch.ones(1, 2)
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # token 0: max((1-0)^2, (0+0.2-0)^2) = 1; token 1: max(1, 1) = 1 -> 0.5 * mean = 0.5
    assert value_loss(v, old, ret, m, clip=0.2).item() == pytest.approx(0.5)
    v2 = torch.tensor([[0.5, 0.5]])
    # token 0: max(0.25, 0.04) = 0.25; token 1: max(0.25, (0.2-1)^2 = 0.64) = 0.64
    assert value_loss(v2, old, ret, m, clip=0.2).item() == pytest.approx(0.5 * (0.25 + 0.64) / 2)


def test_entropy_and_masked_mean():
    uniform = torch.zeros(1, 1, 4)
    logp, entropy = logprobs_and_entropy(uniform, torch.tensor([[2]]))
    assert entropy.item() == pytest.approx(math.log(4)) and logp.item() == pytest.approx(-math.log(4))
    assert logprobs_and_entropy(uniform, torch.tensor([[2]]), with_entropy=False)[1] is None
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 2.0


def test_adaptive_kl_controller():
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=100)
    c.update(kl=12.0, n_steps=10)  # KL too high: error clipped to +0.2 -> beta * 1.02
    assert c.beta == pytest.approx(0.102)
    c.update(kl=3.0, n_steps=10)  # too low: -0.2 -> * 0.98
    assert c.beta == pytest.approx(0.102 * 0.98)
    fixed = AdaptiveKLController(0.1, 6.0, 100, adaptive=False)
    assert fixed.update(100.0, 10) == 0.1
    restored = AdaptiveKLController(1.0, 6.0, 100)
    restored.load_state_dict(c.state_dict())
    assert restored.beta == c.beta


def test_running_moments_equal_the_moments_of_everything_seen():
    from cai.losses import RunningMoments

    m = RunningMoments()
    assert m.std == 1.0  # nothing seen: no scaling
    assert m.update([1.0, 3.0]) == pytest.approx((2.0, 2**0.5))  # mean 2, sample std sqrt(2)
    mean, std = m.update([5.0, 7.0, 9.0])  # all five: 1 3 5 7 9
    assert mean == pytest.approx(5.0) and std == pytest.approx(10**0.5)  # sample variance 40 / 4
    again = RunningMoments()
    again.load_state_dict(m.state_dict())
    assert again.update([5.0]) == m.update([5.0])


def test_group_advantages_hand_computed():
    from cai.losses import group_advantages

    # Two prompts, two answers each. GRPO: (r - mean) / (std + 1e-4), unbiased std of [1, 3] = sqrt(2).
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0])
    grpo = group_advantages(rewards, 2, "grpo")
    assert grpo.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0], abs=1e-6)
    # RLOO: each answer minus the mean of the others: 1 - 3, 3 - 1; a group of equal scores learns nothing.
    assert group_advantages(rewards, 2, "rloo").tolist() == pytest.approx([-2.0, 2.0, 0.0, 0.0])
    # Three answers: 1 - mean(2, 6) = -3, 2 - mean(1, 6) = -1.5, 6 - mean(1, 2) = 4.5; GRPO's std is sqrt(7).
    three = torch.tensor([1.0, 2.0, 6.0])
    assert group_advantages(three, 3, "rloo").tolist() == pytest.approx([-3.0, -1.5, 4.5])
    assert group_advantages(three, 3, "grpo").tolist() == pytest.approx([x / (math.sqrt(7) + 1e-4) for x in (-2, -1, 3)], abs=1e-6)
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(three, 1, "grpo")
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(rewards, 3, "rloo")
