"""The maths, as pure functions with shape comments, unit-tested without Lightning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss against soft targets, averaged over the batch.

    r_a, r_b: (B,) scalar rewards of the two answers; p_a: (B,) probability that a is preferred.
    loss = -[p * log sigma(r_a - r_b) + (1 - p) * log sigma(r_b - r_a)]
    With p in {0, 1} this is the usual pairwise loss; logsigmoid keeps it stable for large margins.
    """
    margin = r_a - r_b  # (B,)
    return -(p_a * F.logsigmoid(margin) + (1 - p_a) * F.logsigmoid(-margin)).mean()


# --- PPO -------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1. x, mask: same shape."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean if shift_mean) over the masked positions.

    x, mask: (B, T). Masked-out positions come back as 0. Advantages are whitened with the mean
    shifted; rewards are usually scaled only, so their sign keeps its meaning.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs. (B, T) -> (B, T).

    k1 = log p - log q           (unbiased, can be negative; the usual RLHF penalty)
    k2 = (log p - log q)^2 / 2   (biased, low variance, always >= 0)
    k3 = (q/p - 1) - log(q/p)    (unbiased, always >= 0; Schulman's estimator)
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}'; choose k1, k2 or k3")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta * KL at every response token, plus the PM score at the last one.

    score: (B,), kl and mask: (B, T) over response tokens -> (B, T).
    """
    rewards = -beta * kl * mask  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # (B,) index of each response's last token (responses follow prompts)
    rewards[torch.arange(rewards.shape[0]), last] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. rewards, values, mask: (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}
    with V and A zero past the last response token. Returns (advantages, returns = A + V), (B, T).
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # past the end of a response (m = 0) nothing flows back
        next_value = values[:, t] * m
        next_adv = adv * m
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, k: int, kind: str, eps: float = 1e-4) -> torch.Tensor:
    """Critic-free advantages: each answer against the other answers to its prompt. rewards: (B,) -> (B,).

    The batch holds B/k groups of k answers to one prompt, each group contiguous.
    grpo: (r_i - mean_g) / (std_g + eps), the group's mean and (unbiased) std: GRPO (Shao et al., 2024; TRL's default).
    rloo: r_i - mean_{j != i} r_j = k/(k-1) * (r_i - mean_g), the leave-one-out baseline (Ahmadian et al., 2024).
    """
    if k < 2 or rewards.shape[0] % k:
        raise ValueError(f"group_advantages: need k >= 2 answers per prompt and B divisible by k, got B={rewards.shape[0]}, k={k}")
    groups = rewards.view(-1, k)  # (B/k, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if kind == "grpo":
        out = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif kind == "rloo":
        out = centred * k / (k - 1)
    else:
        raise ValueError(f"group_advantages: unknown kind '{kind}' (grpo | rloo)")
    return out.reshape(-1)


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), masked mean. (B, T) inputs.

    Also returns clipfrac (share of tokens where the clip was active) and approx_kl (k3 of old vs new).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_estimate(old_logp, logp, "k3"), mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2), masked mean."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = True, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy of the next-token distribution at each position.

    logits: (..., V), targets: (...) -> (...), (...) or None. One log-softmax serves both.
    entropy_grad=False computes the entropy outside the autograd graph (for logging only): its
    vocabulary-wide intermediates are then not kept for the backward pass.
    """
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, -(logp_all.exp() * logp_all).sum(-1)


class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update).

    For `ppo.reward_norm=running`: scores are normalised by statistics that move slowly across
    iterations, not by each small batch's own. The state is saved in PPO checkpoints.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> tuple[float, float]:
        """Fold a batch in; return the (mean, std) of everything seen, this batch included."""
        n = len(values)
        batch_mean = sum(values) / n
        batch_m2 = sum((v - batch_mean) ** 2 for v in values)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        return self.mean, self.std

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.

    With adaptive=False, beta stays fixed. The state (beta) is saved in PPO checkpoints.
    """

    def __init__(self, beta: float, target: float, horizon: int, adaptive: bool = True) -> None:
        self.beta, self.target, self.horizon, self.adaptive = beta, target, horizon, adaptive

    def update(self, kl: float, n_steps: int) -> float:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]
