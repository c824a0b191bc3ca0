"""One generation interface, two backends (`generation=hf` and `generation=vllm`).

Callers hand over chat conversations and seeded sampling parameters and get back texts and token
ids. Both backends render prompts with the same chat template and tokenizer, so they see the same
tokens.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from cai.config import SamplingConfig
from cai.data import Message
from cai.errors import CaiError
from cai.usage import add_generated

log = logging.getLogger(__name__)


@runtime_checkable
class LoadableModel(Protocol):
    """What a generator (or a trainer) can be handed instead of a loaded model: a ModelSpec."""

    def load_model(self) -> Any: ...

    def load_tokenizer(self) -> Any: ...


def derive_seed(*parts) -> int:
    """A seed for one stream of random numbers, from the parts that name it (run seed, stage, iteration
    or shard, step, rank, batch or request): a hash, so no two names share a stream, as `seed + i + j`
    did (iteration i's request k and iteration i+1's request k-1 drew the same numbers)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclass
class SamplingParams(SamplingConfig):
    """How to sample (the fields are SamplingConfig's). temperature=0 is greedy; seed makes sampling repeatable.

    Exactly this: the model's own generation_config (repetition penalty, top-k, min length, ...)
    never applies, so PPO's recomputed log-probs are those of the distribution that was sampled.
    """

    logprobs: bool = False  # also return each sampled token's log-prob under the sampling distribution

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CaiError(f"generation.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CaiError(f"generation.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CaiError(f"generation.top_p: must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One generated answer: its text and the ids of the prompt and of the new tokens."""

    text: str
    token_ids: list[int]  # new tokens, eos included when the model stopped by itself
    prompt_token_ids: list[int]
    finished: bool  # True when the model emitted eos before max_new_tokens
    logprobs: list[float] | None = None  # per new token, when SamplingParams.logprobs asked for them


def render_prompts(tokenizer, conversations: Sequence[list[Message]], prefixes: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each conversation under the chat template, ready for the assistant's turn.

    A prefix, if given, is text the assistant's turn starts with (e.g. "Let's think step by step:").
    """
    if not conversations:
        return []
    if prefixes is not None and len(prefixes) != len(conversations):
        raise ValueError("prefixes must match conversations one to one")
    out = []
    for i, conv in enumerate(conversations):
        if not conv or any(not m.get("content", "").strip() for m in conv if m["role"] == "user"):
            raise CaiError(f"conversation {i}: empty prompt; every user turn needs text")
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        if prefixes is not None and prefixes[i]:
            text += prefixes[i]
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


class Generator(ABC):
    """The interface stages call. Subclasses implement `generate_ids` on token ids.

    `sampling` holds the default SamplingParams fields (the `generation` config group's).
    """

    def __init__(self, batch_size: int, truncate: bool = False, **sampling: Any) -> None:
        if batch_size < 1:
            raise CaiError(f"generation.batch_size: must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.truncate = truncate  # a prompt too long for the context: cut it (True) or refuse it (False)
        self.defaults = SamplingParams(**sampling)

    @property
    def context_length(self) -> int | None:
        """How many tokens (prompt and answer) the model can attend to; None if it does not say."""
        return None

    def fit_context(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Every prompt with room for its answer in the model's context, or one clear line.

        Past the context a model generates from positions it never saw in training (RoPE past
        max_position_embeddings): garbage, slowly, that would be marked complete. With
        `data.truncate=true` a long prompt keeps its start and its last tokens (where the chat
        template opens the answer) and loses its middle.
        """
        limit = self.context_length
        if limit is None:
            return prompts
        room = limit - params.max_new_tokens
        long = [i for i, p in enumerate(prompts) if len(p) > room]
        if not long:
            return prompts
        if not self.truncate or room < 32:
            worst = max(long, key=lambda i: len(prompts[i]))
            raise CaiError(
                f"data: {len(long)} prompt(s) do not fit the model's context of {limit} tokens with {params.max_new_tokens} "
                f"new tokens (the longest, number {worst}, is {len(prompts[worst])} tokens); shorten them in the prompt file, "
                f"lower max_new_tokens, or set data.truncate=true to cut their middle"
            )
        tail = 16  # the end of the user's turn and the assistant header the template adds
        log.warning("%d prompt(s) longer than the context (%d tokens) were cut to %d tokens (data.truncate=true)", len(long), limit, room)
        return [p[: room - tail] + p[-tail:] if len(p) > room else p for p in prompts]

    def params(self, **overrides) -> SamplingParams:
        """The configured sampling parameters with some fields replaced (e.g. a stage's max_new_tokens)."""
        return replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    @property
    @abstractmethod
    def tokenizer(self): ...

    def generate(
        self,
        conversations: Sequence[list[Message]],
        params: SamplingParams | None = None,
        prefixes: Sequence[str] | None = None,
        desc: str = "generating",
    ) -> list[Completion]:
        """Answer every conversation (batched), in the order given."""
        params = params or self.defaults
        prompts = render_prompts(self.tokenizer, conversations, prefixes)
        if not prompts:
            return []
        prompts = self.fit_context(prompts, params)
        completions = self.generate_ids(prompts, params, desc)
        add_generated(sum(len(c.token_ids) for c in completions))  # for the stage's usage in its manifest
        return completions

    @abstractmethod
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams, desc: str = "generating") -> list[Completion]:
        """Answer prompts given as token ids (already rendered), in the order given."""

    def close(self) -> None:  # noqa: B027  (optional hook: most backends hold nothing to free)
        """Free the model (and, for vLLM, the engine's workers)."""

    @abstractmethod
    def placement(self) -> dict:
        """Where the model generates, for manifests: {"device": ..., "dtype": ...}."""
