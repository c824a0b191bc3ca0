"""PPO's roles, named as in verl, apart from the PPO loop that uses them (cai/stages/ppo.py).

- rollout: `Rollout` samples the actor's answers through a generation backend (HF on the actor
  itself, or a vLLM engine whose weights are synced from the actor first);
- critic: `ValueHead` (a head on the actor's last hidden states) and `CriticModel` (a separate
  backbone with a head, initialised from the PM) share one interface:
  `critic(batch, actor_hidden) -> values (B, L-1)`; `shares_actor` says whether it needs the
  actor's hidden states;
- reward: any `RewardFn(conversations, completions) -> scores` (cai.reward.pm_reward is the PM's);
- experience: `Experience` holds what one iteration learns from; `batch_rollouts` and
  `response_logprobs` build it. The maths (GAE, KL, whitening, losses) is in cai/losses.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cai.data import Message
from cai.generation import Completion, Generator, SamplingParams
from cai.generation.hf import HFGenerator
from cai.losses import logprobs_and_entropy
from cai.models import logits_where, packed_attention_mask, packing_problem, rescales_logits
from cai.training import gathered_state_dict, pack_shared_prefix, pad


def own_policy(cfg) -> Any:
    """`ppo.policy`: the policy RL starts from when it is not this run's SFT model, as a ModelSpec (None if unset)."""
    from cai.models import ModelSpec

    if not cfg.ppo.policy:
        return None
    return ModelSpec(name="policy", source="hf", name_or_path=cfg.ppo.policy, dtype=cfg.model.dtype, cache=cfg.paths.cache)


RewardFn = Callable[[Sequence[list[Message]], Sequence[Completion]], list[float]]  # (conversations, answers) -> scores


# --- critic ----------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """The critic as a scalar head on the actor's backbone (`ppo.value_model=head`), zero-initialised."""

    shares_actor = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, torch.Tensor], actor_hidden: torch.Tensor | None) -> torch.Tensor:
        """actor_hidden (B, L, H) -> values (B, L-1) at the positions that predict each next token."""
        return self.head(actor_hidden[:, :-1].to(self.head.weight.dtype)).squeeze(-1)


class CriticModel(nn.Module):
    """The critic as a separate value model (`ppo.value_model=critic`): a backbone with a scalar head at every position."""

    shares_actor = False

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict[str, torch.Tensor], actor_hidden: torch.Tensor | None = None) -> torch.Tensor:
        hidden = body_hidden(self.backbone, batch)  # (B, L, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)[:, :-1]  # (B, L-1)


Critic = ValueHead | CriticModel


# --- rollout ---------------------------------------------------------------------------------------


class Rollout:
    """Samples answers from the actor: with HF generate on the actor itself, or through a vLLM engine."""

    def __init__(self, actor: nn.Module, tokenizer: Any, batch_size: int, engine: Generator | None = None, weights=None) -> None:
        self.actor, self.tok, self.batch_size, self.engine = actor, tokenizer, batch_size, engine
        self.weights = weights  # () -> the actor's full state dict (LoRA merged in); None: the actor's own

    def __call__(self, conversations: list[list[Message]], params: SamplingParams, strategy: Any, desc: str) -> list[Completion]:
        if self.engine is not None:  # vLLM: push this iteration's weights into the engine (no disk)
            state = self.weights() if self.weights is not None else gathered_state_dict(self.actor, strategy)
            self.engine.load_weights(state.items())
            return self.engine.generate(conversations, params, desc=desc)
        gen = HFGenerator(self.actor, self.tok, batch_size=self.batch_size)
        if getattr(strategy, "zero_stage_3", False):  # never generate from sharded weights
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.actor.parameters())):
                return gen.generate(conversations, params, desc=desc)
        return gen.generate(conversations, params, desc=desc)


# --- experience ------------------------------------------------------------------------------------


def batch_rollouts(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, group: int = 1) -> dict[str, Any]:
    """Right-padded prompt+response ids, and masks aligned with the *predicted* tokens.

    input_ids, attention_mask: (B, L). action_mask: (B, L-1), 1 where token j+1 is a response token,
    so that position j of log-prob/value tensors (computed from logits at j) scores that token.
    group > 1 (answers in consecutive groups of that many to one prompt): also "packed", the groups
    packed by `pack_shared_prefix` (each prompt once), which `body_hidden` runs where the model can.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids, attn = pad(seqs, pad_id)  # (B, L)
    action = torch.zeros((ids.shape[0], ids.shape[1] - 1))  # (B, L-1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        action[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": attn, "action_mask": action}
    if group > 1:
        batch["packed"] = pack_shared_prefix([seqs[i : i + group] for i in range(0, len(seqs), group)], pad_id)
    return batch


def body_hidden(body: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The transformer body's last hidden states (B, L, H) of a rollout batch: from its packed rows
    (each prompt once) when it has them and the body can run them (`packing_problem`), put back in
    the batch's layout; else from the batch itself."""
    packed = batch.get("packed")
    if packed is None or packing_problem(body) is not None:
        return body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, L, H)
    mask = packed_attention_mask(body, packed["attention_mask"], "ppo.share_prompt")  # (G, 1, T, T)
    hidden = body(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"]).last_hidden_state  # (G, T, H)
    return hidden[packed["row"][:, None], packed["columns"]]  # (B, L, H); past a sequence's end: column 0, masked by every use


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token j+1 | prefix) for every position j. logits (B, L, V), ids (B, L) -> (B, L-1).

    The full computation, kept as the reference that `response_logprobs` is tested against.
    """
    return logprobs_and_entropy(logits[:, :-1], input_ids[:, 1:], with_entropy=False)[0]


HEAD_CHUNK = 256  # response positions per chunk of the LM head when training


def _head_logprobs(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, with_entropy: bool, entropy_grad: bool):
    """Log-probs (and entropies) of targets (N,) from hidden rows (N, H) through the LM head."""
    return logprobs_and_entropy(head(rows), targets, with_entropy, entropy_grad)


def response_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs (and entropies) of the response tokens, with the LM head run on response positions only.

    What PPO scores and trains on is the answer; the prompt's positions need the body (attention)
    but not the vocabulary-wide head and log-softmax. Returns logp (B, L-1) and entropy (B, L-1) or
    None, both 0 outside `action_mask`, and the last hidden states (B, L, H) for a value head.
    entropy_grad=False: the entropy is for logging only and stays out of the autograd graph.
    """
    mask = batch["action_mask"].bool()  # (B, L-1): position j predicts token j+1
    select = nn.functional.pad(mask, (0, 1))  # (B, L): the same positions, on the model's input
    targets = batch["input_ids"][:, 1:][mask]  # (N,)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if rescales_logits(model):  # the whole forward (logits rescaled after the head), unpacked
        logits, hidden = logits_where(model, select, **inputs)  # (N, V)
        logp, entropy = logprobs_and_entropy(logits, targets, with_entropy, entropy_grad)  # (N,), (N,) or None
    elif torch.is_grad_enabled():
        # Training: the head runs in chunks whose (chunk, V) logits are recomputed in backward rather
        # than kept, the largest tensors of a PPO step after the weights (~0.4 GB at the quickstart's size).
        hidden = body_hidden(model.base_model, batch)  # (B, L, H)
        rows, head = hidden[select], model.get_output_embeddings()  # (N, H)
        parts = [
            checkpoint(
                _head_logprobs, head, rows[i : i + HEAD_CHUNK], targets[i : i + HEAD_CHUNK], with_entropy, entropy_grad, use_reentrant=False
            )
            for i in range(0, len(rows), HEAD_CHUNK)
        ]
        logp = torch.cat([p[0] for p in parts])
        entropy = torch.cat([p[1] for p in parts]) if with_entropy else None
    else:  # the head on the answers' positions only, as `logits_where`
        hidden = body_hidden(model.base_model, batch)  # (B, L, H)
        logits = model.get_output_embeddings()(hidden[select])  # (N, V)
        logp, entropy = logprobs_and_entropy(logits, targets, with_entropy, entropy_grad)  # (N,), (N,) or None

    def spread(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (B, L-1), zeros off the answers
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

    return spread(logp), spread(entropy) if entropy is not None else None, hidden


@dataclass
class Experience:
    """One iteration's rollouts, scored: what the PPO update learns from. Tensors are (B, L-1) unless noted."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask (B, L); action_mask
    old_logp: torch.Tensor  # the actor's log-probs at sampling time
    old_values: torch.Tensor  # the critic's values at sampling time
    kl: torch.Tensor  # per-token KL(actor || ref) estimate, masked
    advantages: torch.Tensor  # GAE, whitened
    returns: torch.Tensor
    scores: torch.Tensor  # (B,) raw reward-model scores
    truncated: torch.Tensor  # (B,) 1 where the answer was cut at max_new_tokens (no eos)

    @property
    def mask(self) -> torch.Tensor:
        return self.batch["action_mask"]

    def minibatch(self, idx: torch.Tensor) -> Experience:
        """The rows idx of every tensor."""
        return Experience(
            {k: v[idx] for k, v in self.batch.items() if k != "packed"},  # a subset of rows breaks the packed groups
            self.old_logp[idx],
            self.old_values[idx],
            self.kl[idx],
            self.advantages[idx],
            self.returns[idx],
            self.scores[idx.cpu()],
            self.truncated[idx.cpu()],
        )
