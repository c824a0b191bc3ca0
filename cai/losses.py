"""The maths, as pure functions with shape comments, unit-tested without Lightning."""

from __future__ import annotations

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
