"""AI feedback: turn a feedback model's answer to "(A) or (B)?" into a preference label.

Pure functions (unit-tested on their own):
- `prefer_a`: P(response_a is better) from P(letter A) in one order (the order may be swapped);
- `clamp`: the paper's remedy for over-confident chain-of-thought labels;
- `combine`: average the two orders (position debiasing) and then the principles (ensembles);
- `hard_label`: 1 if a is preferred, else 0.

`Labeller` puts the questions to a model. Soft and hard labels cost one forward pass per question
and order, batched: the assistant turn is started with "The answer is: (", so the next token is the
option letter and its two logits give the probability. CoT labels first generate the reasoning
("Let's think step by step:"), then read the letter after "So the answer is: (".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cai.constitution import RLExample, RLPrinciple
from cai.data import Message
from cai.errors import CaiError
from cai.generation import SamplingParams
from cai.generation.hf import HFGenerator
from cai.templates import ANSWER_PREFIX, COT_ANSWER, COT_PREFIX, comparison_shots, comparison_turn
from cai.training import pad

KINDS = ("hard", "soft", "cot")


def prefer_a(p_letter_a: float, swapped: bool) -> float:
    """P(response_a preferred), given P(the model answered 'A') in an order that may be swapped."""
    return 1.0 - p_letter_a if swapped else p_letter_a


def clamp(p: float, low: float, high: float) -> float:
    return min(high, max(low, p))


def combine(per_principle: dict[str, Sequence[float]], debias: bool) -> tuple[float, dict[str, float]]:
    """Average the orders of each principle (or take the first order), then average the principles.

    per_principle: principle id -> [P(a preferred) in order AB, P(a preferred) in order BA].
    """
    each = {pid: (sum(ps) / len(ps) if debias else ps[0]) for pid, ps in per_principle.items()}
    return sum(each.values()) / len(each), each


def hard_label(p: float) -> float:
    return 1.0 if p > 0.5 else 0.0


@dataclass(frozen=True)
class Item:
    """One comparison to label."""

    conversation: list[Message]
    response_a: str
    response_b: str
    principles: tuple[RLPrinciple, ...]


class Labeller:
    """Asks a causal LM which of two answers is better, under one or more principles."""

    def __init__(
        self,
        model,
        tokenizer,
        kind: str = "soft",
        examples: Sequence[RLExample] = (),
        debias: bool = True,
        clamp_low: float = 0.0,
        clamp_high: float = 1.0,
        batch_size: int = 8,
        cot_max_new_tokens: int = 96,
    ) -> None:
        if kind not in KINDS:
            raise CaiError(f"label.kind: the labeller takes {', '.join(KINDS)}; got '{kind}'")
        self.model = model.eval()
        self.tok = tokenizer
        self.kind = kind
        self.examples = list(examples)
        self.debias = debias
        self.low, self.high = clamp_low, clamp_high
        self.batch_size = batch_size
        self.cot_max_new_tokens = cot_max_new_tokens
        self.forward_passes = 0  # counted, so the benchmark can check the 2*k budget

    # --- one question = one forward pass ---------------------------------------------------

    def _ids(self, text: str) -> tuple[list[int], int, int]:
        """Token ids up to the option letter, and the ids of the letters 'A' and 'B' that follow.

        Works for any tokenizer: both completions are tokenized, and they must differ only in their
        last token (otherwise the option letter is not a single next token).
        """
        with_a = self.tok(text + "A", add_special_tokens=False)["input_ids"]
        with_b = self.tok(text + "B", add_special_tokens=False)["input_ids"]
        if len(with_a) != len(with_b) or with_a[:-1] != with_b[:-1]:
            raise CaiError(
                "label: this tokenizer merges the option letter with the text before it; the answer prefix needs changing for this model"
            )
        return with_a[:-1], with_a[-1], with_b[-1]

    @torch.no_grad()
    def letter_probs(self, texts: Sequence[str]) -> list[float]:
        """P('A') / (P('A') + P('B')) at the next token after each text, batched and left-padded."""
        encoded = [self._ids(t) for t in texts]
        device = next(self.model.parameters()).device
        out: list[float] = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i][0]))  # similar lengths together
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = pad([encoded[i][0] for i in idx], self.tok.pad_token_id, side="left")  # (B, T): the letter comes next in every row
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1, :].float()  # (B, V)
            self.forward_passes += len(idx)
            for row, i in enumerate(idx):
                a_id, b_id = encoded[i][1], encoded[i][2]
                out[i] = torch.sigmoid(logits[row, a_id] - logits[row, b_id]).item()  # softmax over {A, B}
        return out

    def question_texts(self, questions: Sequence[tuple[list[Message], str, str, str]]) -> list[str]:
        """Chat-rendered questions, each ending right before the option letter."""
        cot = self.kind == "cot"
        conversations = [
            [*comparison_shots(self.examples, question, cot), comparison_turn(conversation, question, a, b)]
            for conversation, question, a, b in questions
        ]
        chats = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        if not cot:
            return [c + ANSWER_PREFIX for c in chats]
        # Chain of thought: the model reasons first (greedy, so labels are repeatable), then answers.
        gen = HFGenerator(self.model, self.tok, batch_size=self.batch_size)
        params = SamplingParams(max_new_tokens=self.cot_max_new_tokens, temperature=0)
        reasoning = gen.generate(conversations, params, prefixes=[COT_PREFIX] * len(conversations), desc="reasoning")
        return [c + COT_PREFIX + " " + r.text.split("So the answer is")[0].strip() + COT_ANSWER for c, r in zip(chats, reasoning)]

    # --- comparisons ----------------------------------------------------------------------

    def label(self, items: Sequence[Item], desc: str = "labelling") -> list[dict]:
        """Label comparisons: each principle of each item, in both orders when debiasing.

        Returns per item {p_a, per_principle, label}: p_a is P(response_a better) after debiasing,
        clamping (CoT) and averaging; label is p_a for soft/CoT labels and 0/1 for hard labels.
        """
        orders = (False, True) if self.debias else (False,)
        keys, questions = [], []
        for n, item in enumerate(items):
            for p in item.principles:
                for swapped in orders:
                    a, b = (item.response_b, item.response_a) if swapped else (item.response_a, item.response_b)
                    keys.append((n, p.id, swapped))
                    questions.append((item.conversation, p.question, a, b))
        probs: list[float] = []
        step = max(1, self.batch_size * 4)
        for start in tqdm(range(0, len(questions), step), desc=desc, unit="batch", leave=False):
            probs += self.letter_probs(self.question_texts(questions[start : start + step]))
        per_item: list[dict[str, list[float]]] = [{} for _ in items]
        for (n, pid, swapped), p_letter in zip(keys, probs):
            p = prefer_a(p_letter, swapped)
            if self.kind == "cot":
                p = clamp(p, self.low, self.high)
            per_item[n].setdefault(pid, []).append(p)
        out = []
        for by_principle in per_item:
            p_a, each = combine(by_principle, self.debias)
            out.append({"p_a": p_a, "per_principle": each, "label": hard_label(p_a) if self.kind == "hard" else p_a})
        return out
