"""One generation interface, two backends (`generation=hf` and `generation=vllm`).

Callers hand over chat conversations and seeded sampling parameters and get back texts and token
ids. Both backends render prompts with the same chat template and tokenizer, so they see the same
tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cai.errors import CaiError

Message = dict[str, str]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature=0 is greedy; seed makes sampling repeatable."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0

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
    """The interface stages call. Subclasses implement `_generate` on token ids."""

    def __init__(self, batch_size: int, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
        if batch_size < 1:
            raise CaiError(f"generation.batch_size: must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.defaults = SamplingParams(max_new_tokens, temperature, top_p, seed)

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
        return self._generate(prompts, params, desc)

    @abstractmethod
    def _generate(self, prompts: list[list[int]], params: SamplingParams, desc: str) -> list[Completion]: ...

    def close(self) -> None:  # noqa: B027  (optional hook: most backends hold nothing to free)
        """Free the model (and, for vLLM, the engine's workers)."""
