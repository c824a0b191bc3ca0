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

Likelihood labels ask no question. Each answer is scored by its mean (`label.reduce=sum`: summed)
token log-likelihood as the assistant's reply, with the principle as the system turn;
p(a) = sigmoid((ll_a - ll_b) / T), two forward passes per principle and no letter bias. The sum is
the answer's whole log-likelihood, so it prefers shorter answers. Contrastive labels subtract each answer's
likelihood under a framing that violates the principle (in the spirit of RLCD), four passes.
"""

from __future__ import annotations

import inspect
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean

import torch
from tqdm.auto import tqdm

from cai.config import uses_vllm
from cai.constitution import RLExample, RLPrinciple
from cai.data import Message, human_pairs
from cai.errors import CaiError, check_choice
from cai.generation import SamplingParams
from cai.generation.hf import HFGenerator
from cai.metrics import expected_calibration_error, human_agreement
from cai.models import logits_where, placement
from cai.templates import (
    COT_ANSWER,
    COT_PREFIX,
    HELPFUL_QUESTION,
    LETTERS,
    MAX_RESPONSE_CHARS,
    WORSE_TEMPLATE,
    OptionFormat,
    comparison_shots,
    comparison_turn,
)
from cai.training import pad

KINDS = ("hard", "soft", "cot", "likelihood", "contrastive")
ASKS = ("better", "worse", "both")
REDUCES = ("mean", "sum")
OPTION_NAMES = {"letters": ("A", "B"), "numbers": ("1", "2")}
LIKELIHOOD_KINDS = ("likelihood", "contrastive")
# The system turns the likelihood labels score answers under: the principle, and (contrastive) its opposite.
FOLLOW_SYSTEM = "You are an AI assistant. Every reply you give is the best answer to this question: {question}"
VIOLATE_SYSTEM = "You are an AI assistant. Every reply you give is the worst answer to this question: {question}"


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


def likelihood_preference(score_a: float, score_b: float, temperature: float) -> float:
    """P(a preferred) from two answers' scores (mean token log-likelihoods, or their contrasts)."""
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / temperature))


def answer_logprob(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int, reduce: str = "mean") -> torch.Tensor:
    """Mean (or summed) log-probability of each row's answer tokens.

    logits: (N, V) at the N positions that predict answer tokens, targets: (N,) those tokens,
    rows: (N,) the row each belongs to. Returns (n_rows,); a row without answer tokens gets 0.
    The sum is the answer's log-likelihood, which favours short answers; the mean does not.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    total = torch.zeros(n_rows, device=logp.device).index_add(0, rows, logp)  # (n_rows,)
    count = torch.zeros(n_rows, device=logp.device).index_add(0, rows, torch.ones_like(logp))
    return total if reduce == "sum" else total / count.clamp(min=1)


# A shared stretch of tokens runs once only when that saves enough: on a CPU a forward pass has a
# fixed cost of about 50 tokens' worth (30 layers of small kernels). Measured with the embedded model
# on 2 cores (benchmarks/bench_hotpaths.py).
MIN_SHARED_PREFIX = 16  # tokens a group of rows must share beyond the batch's common prefix
MIN_TOKENS_SAVED = 128  # (rows - 1) x shared tokens, summed over a level, for that level to run on its own


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares."""
    first, n = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        n = next((k for k in range(n) if row[k] != first[k]), n)
    return n


STEP_BATCHES = 16  # batches' worth of questions sorted and batched together: several whole prompts' worth


def prefix_batches(rows: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Sorted rows cut into batches of at most `size` consecutive rows, where neighbours share least.

    A batch's shared stretches run once (`next_token_logits`), so a batch should hold one prompt's
    questions rather than the end of one and the start of the next: a run longer than `size` is cut
    at its weakest link (neighbours sharing the fewest leading tokens, within MIN_SHARED_PREFIX of
    the fewest), choosing among those cuts the one that leaves the fewest batches, then the most even.
    """
    links = [common_prefix_length([a, b]) for a, b in zip(rows, rows[1:])]  # links[k - 1]: rows k - 1 and k

    def split(lo: int, hi: int) -> list[list[int]]:
        if hi - lo <= size:
            return [list(range(lo, hi))]
        weakest = min(links[lo : hi - 1])
        cuts = [k for k in range(lo + 1, hi) if links[k - 1] < weakest + MIN_SHARED_PREFIX]
        k = min(cuts, key=lambda k: (-(-(k - lo) // size) - (-(hi - k) // size), abs(2 * k - lo - hi)))
        return split(lo, k) + split(k, hi)

    return split(0, len(rows)) if rows else []


def cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` from transformers 5.20, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def shared_groups(rows: Sequence[Sequence[int]], start: int) -> tuple[list[int], list[int]]:
    """Rows grouped by a stretch of MIN_SHARED_PREFIX or more tokens they share after `start` (answer A).

    Returns each row's group (-1 for a row that shares no such stretch) and each group's shared
    length; every row keeps at least one token of its own after its group's stretch.
    """
    by_key: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        by_key.setdefault(tuple(row[start : start + MIN_SHARED_PREFIX]), []).append(i)
    group_of, lengths = [-1] * len(rows), []
    for members in by_key.values():
        shared = min(common_prefix_length([rows[i] for i in members]), min(len(rows[i]) for i in members) - 1) - start
        if len(members) > 1 and shared >= MIN_SHARED_PREFIX:
            for i in members:
                group_of[i] = len(lengths)
            lengths.append(shared)
    return group_of, lengths


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits (B, V) of the token that would follow each row of ids; shared stretches run once.

    Comparison questions start alike: the chat template and conversation (every question about one
    prompt), then answer A (the questions that put one answer first). Three batched passes, each
    level skipped when it would save little: the batch's common prefix at batch 1; each group's
    shared stretch, one row per group on that prefix's KV cache; then every row's own tokens on its
    group's cache rows (padding inside the cache masked, positions given). The LM head runs at each
    row's last token only.
    """
    device = next(model.parameters()).device
    n, key = len(rows), cache_argument(model)
    root = min(common_prefix_length(rows), min(len(r) for r in rows) - 1)  # every row keeps >= 1 token of its own
    root = root if (n - 1) * root >= MIN_TOKENS_SAVED else 0
    cache = (
        model.base_model(input_ids=torch.tensor([list(rows[0][:root])], device=device), use_cache=True).past_key_values if root else None
    )
    group_of, lengths = shared_groups(rows, root)
    seen = torch.ones(n, root, dtype=torch.long)  # (B, cached): which cached positions each row attends to
    starts = [root] * n  # where each row's own tokens begin
    if sum((group_of.count(g) - 1) * m for g, m in enumerate(lengths)) >= MIN_TOKENS_SAVED:
        first = [group_of.index(g) for g in range(len(lengths))]
        ids, mask = pad([rows[i][root : root + m] for i, m in zip(first, lengths)], pad_id, side="right")  # (G, M)
        mask = torch.cat([torch.ones(len(first), root, dtype=mask.dtype), mask], dim=1)  # (G, root + M)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": True}
        if cache is not None:
            cache.batch_repeat_interleave(len(first))
            inputs[key] = cache
        cache = model.base_model(**inputs).past_key_values  # (G, heads, root + M, d) per layer
        # Each row takes its group's cache row; a row of no group takes any, sees only the prefix of it.
        cache.batch_select_indices(torch.tensor([max(g, 0) for g in group_of], device=device))
        alone = torch.cat([torch.ones(root, dtype=mask.dtype), torch.zeros(ids.shape[1], dtype=mask.dtype)])
        seen = torch.stack([mask[g] if g >= 0 else alone for g in group_of])  # (B, root + M)
        starts = [root + lengths[g] if g >= 0 else root for g in group_of]
    elif cache is not None:
        cache.batch_repeat_interleave(n)
    ids, mask = pad([r[s:] for r, s in zip(rows, starts)], pad_id, side="right")  # (B, S)
    select = torch.zeros(ids.shape, dtype=torch.bool)  # (B, S): each row's last token
    select[torch.arange(n), torch.tensor([len(r) - s - 1 for r, s in zip(rows, starts)])] = True
    positions = torch.tensor(starts)[:, None] + torch.arange(ids.shape[1])[None, :]  # (B, S): padding in the cache is not a position
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.cat([seen, mask], dim=1).to(device),
        "position_ids": positions.to(device),
    }
    if cache is not None:
        inputs[key] = cache
    logits, _ = logits_where(model, select.to(device), **inputs)
    return logits  # (B, V), rows in order


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
        temperature: float = 1.0,
        max_length: int = 512,
        options: OptionFormat = LETTERS,
        random_order: bool = False,
        ask: str = "better",
        reduce: str = "mean",
        engine=None,
    ) -> None:
        if kind not in KINDS:
            raise CaiError(f"label.kind: the labeller takes {', '.join(KINDS)}; got '{kind}'")
        # engine: a VLLMGenerator that reads the option log-probs (and writes CoT reasoning) instead of the
        # HF model, which may then be None (label.engine=vllm: multiple-choice kinds only).
        self.engine = engine
        self.model = model.eval() if model is not None else None
        self.tok = tokenizer
        self.kind = kind
        self.examples = list(examples)
        self.debias = debias
        self.low, self.high = clamp_low, clamp_high
        self.batch_size = batch_size
        self.cot_max_new_tokens = cot_max_new_tokens
        self.temperature = temperature  # likelihood kinds: the sigmoid's temperature (fitted on tuning data)
        self.max_length = max_length  # likelihood kinds: tokens per scored transcript (long ones keep their end)
        # Multiple-choice variants: how options are named, one random order per question instead of
        # both (with debias off), and whether to ask for the better answer, the worse, or both.
        check_choice("label.ask", ask, ASKS)
        check_choice("label.reduce", reduce, REDUCES)
        self.reduce = reduce  # likelihood kinds: an answer's score is the mean or the sum of its token log-likelihoods
        self.options, self.random_order, self.ask = options, random_order, ask
        self.forward_passes = 0  # counted, so the benchmark can check the 2*k budget

    # --- one question = one forward pass ---------------------------------------------------

    def _ids(self, text: str) -> tuple[list[int], int, int]:
        """Token ids up to the option letter, and the ids of the letters 'A' and 'B' that follow.

        Works for any tokenizer: both completions are tokenized, and they must differ only in their
        last token (otherwise the option letter is not a single next token).
        """
        with_a = self.tok(text + self.options.token(0), add_special_tokens=False)["input_ids"]
        with_b = self.tok(text + self.options.token(1), add_special_tokens=False)["input_ids"]
        if len(with_a) != len(with_b) or with_a[:-1] != with_b[:-1]:
            raise CaiError(
                "label: this tokenizer merges the option letter with the text before it; the answer prefix needs changing for this model"
            )
        return with_a[:-1], with_a[-1], with_b[-1]

    @torch.no_grad()
    def letter_probs(self, texts: Sequence[str]) -> list[float]:
        """P('A') / (P('A') + P('B')) at the next token after each text, batched.

        Texts are sorted by their tokens, so questions that start alike (the template, the same
        conversation, the same answer A) are neighbours, and batches are cut where neighbours share
        least (`prefix_batches`): a batch holds one prompt's questions, whose shared stretches run once.
        """
        encoded = [self._ids(t) for t in texts]
        if self.engine is not None:  # vLLM: every question in one call; its prefix cache shares the common starts
            self.forward_passes += len(encoded)
            pairs = self.engine.option_logprobs([e[0] for e in encoded], [(e[1], e[2]) for e in encoded])
            return torch.sigmoid(torch.tensor([lp_a - lp_b for lp_a, lp_b in pairs])).tolist()  # softmax over {A, B}, as below
        out: list[float] = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: encoded[i][0])
        for batch in prefix_batches([encoded[i][0] for i in order], self.batch_size):
            idx = [order[k] for k in batch]
            logits = next_token_logits(self.model, [encoded[i][0] for i in idx], self.tok.pad_token_id).float()  # (B, V)
            self.forward_passes += len(idx)
            for row, i in enumerate(idx):
                a_id, b_id = encoded[i][1], encoded[i][2]
                out[i] = torch.sigmoid(logits[row, a_id] - logits[row, b_id]).item()  # softmax over {A, B}
        return out

    def shots(self, question: str) -> Sequence[RLExample]:
        """The few-shot examples for a question. The constitution's RL examples are harmlessness
        comparisons (a refusal as the better answer): shown before the helpfulness question they would
        teach that a refusal is the more helpful reply, so helpfulness is asked zero-shot."""
        return () if question.startswith(HELPFUL_QUESTION) else self.examples

    def question_texts(self, questions: Sequence[tuple[list[Message], str, str, str]]) -> list[str]:
        """Chat-rendered questions, each ending right before the option letter."""
        cot = self.kind == "cot"
        options = LETTERS if cot else self.options
        conversations = [
            [*comparison_shots(self.shots(question), question, cot, options), comparison_turn(conversation, question, a, b, options)]
            for conversation, question, a, b in questions
        ]
        chats = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        if not cot:
            return [c + options.answer_prefix for c in chats]
        # Chain of thought: the model reasons first (greedy, so labels are repeatable), then answers.
        gen = self.engine or HFGenerator(self.model, self.tok, batch_size=self.batch_size)
        params = SamplingParams(max_new_tokens=self.cot_max_new_tokens, temperature=0)
        reasoning = gen.generate(conversations, params, prefixes=[COT_PREFIX] * len(conversations), desc="reasoning")
        return [c + COT_PREFIX + " " + r.text.split("So the answer is")[0].strip() + COT_ANSWER for c, r in zip(chats, reasoning)]

    # --- likelihood kinds: each answer scored as the assistant's reply -------------------------

    def _answer_ids(self, system: str, conversation: list[Message], answer: str) -> tuple[list[int], int]:
        """Ids of the chat (system turn, conversation, answer as the assistant turn) and where the answer starts."""
        turns = [{"role": "system", "content": system}, *conversation]
        prompt = self.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = self.tok.apply_chat_template([*turns, {"role": "assistant", "content": answer.strip()[:MAX_RESPONSE_CHARS]}], tokenize=False)
        if not full.startswith(prompt):
            raise CaiError("label: this chat template does not extend the prompt with the answer; likelihood labels need one that does")
        head = self.tok(prompt, add_special_tokens=False)["input_ids"]
        ids = head + self.tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        cut = max(0, len(ids) - self.max_length)  # keep the end: the answer
        return ids[cut:], max(0, len(head) - cut)

    @torch.no_grad()
    def answer_scores(self, requests: Sequence[tuple[str, list[Message], str]]) -> list[float]:
        """Mean (label.reduce=sum: summed) token log-likelihood of each (system, conversation, answer), batched by length.

        The LM head runs only at the positions that predict answer tokens.
        """
        encoded = [self._answer_ids(*r) for r in requests]
        device = next(self.model.parameters()).device
        out = [0.0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = pad([encoded[i][0] for i in idx], self.tok.pad_token_id, side="right")  # (B, T)
            select = torch.zeros(ids.shape, dtype=torch.bool)  # (B, T): position t predicts token t + 1, an answer token
            for row, i in enumerate(idx):
                select[row, max(encoded[i][1], 1) - 1 : len(encoded[i][0]) - 1] = True
            logits, _ = logits_where(self.model, select.to(device), input_ids=ids.to(device), attention_mask=mask.to(device))  # (N, V)
            self.forward_passes += len(idx)
            targets = ids[:, 1:][select[:, :-1]]  # (N,)
            rows = select.nonzero()[:, 0]  # (N,) in the same row-major order as the logits
            for i, score in zip(idx, answer_logprob(logits, targets.to(device), rows.to(device), len(idx), self.reduce).tolist()):
                out[i] = score
        return out

    def likelihood_probs(self, items: Sequence[Item], desc: str) -> list[dict[str, list[float]]]:
        """Per item and principle, [P(a preferred)] from the answers' (contrasted) likelihoods."""
        framings = [FOLLOW_SYSTEM] + ([VIOLATE_SYSTEM] if self.kind == "contrastive" else [])
        keys, requests = [], []
        for n, item in enumerate(items):
            for p in item.principles:
                for f, framing in enumerate(framings):
                    for side, answer in (("a", item.response_a), ("b", item.response_b)):
                        keys.append((n, p.id, f, side))
                        requests.append((framing.format(question=p.question), item.conversation, answer))
        scores: dict[tuple, float] = {}
        step = max(1, self.batch_size * 4)
        for start in tqdm(range(0, len(requests), step), desc=desc, unit="batch", leave=False):
            scores.update(zip(keys[start : start + step], self.answer_scores(requests[start : start + step])))
        per_item: list[dict[str, list[float]]] = [{} for _ in items]
        for n, item in enumerate(items):
            for p in item.principles:
                # contrastive: an answer's likelihood under the principle minus under its opposite
                a, b = (sum((1 if f == 0 else -1) * scores[(n, p.id, f, side)] for f in range(len(framings))) for side in "ab")
                per_item[n][p.id] = [likelihood_preference(a, b, self.temperature)]
        return per_item

    # --- comparisons ----------------------------------------------------------------------

    def placement(self) -> dict:
        """Where the labeller's model runs (for manifests): the vLLM engine's, or the HF model's."""
        return self.engine.placement() if self.engine is not None else placement(self.model)

    def close(self) -> None:
        """Release the vLLM engine (its GPU memory) now, not when the labeller is collected."""
        if self.engine is not None:
            self.engine.close()

    def label(self, items: Sequence[Item], desc: str = "labelling") -> list[dict]:
        """Label comparisons: each principle of each item, in both orders when debiasing.

        Returns per item {p_a, per_principle, first_order, label}: p_a is P(response_a better) after
        debiasing, clamping (CoT) and averaging; first_order is each principle's first question alone
        (what letter bias leaves); label is p_a for soft/CoT/likelihood labels and 0/1 for hard labels.
        """
        if self.kind in LIKELIHOOD_KINDS:  # no question, so no order to debias
            return [self._result(by_principle) for by_principle in self.likelihood_probs(items, desc)]
        keys, questions = [], []
        asks = ("better", "worse") if self.ask == "both" else (self.ask,)
        for n, item in enumerate(items):
            for p in item.principles:
                for swapped in self._orders(item, p):
                    for ask in asks:
                        a, b = (item.response_b, item.response_a) if swapped else (item.response_a, item.response_b)
                        keys.append((n, p.id, swapped, ask))
                        question = WORSE_TEMPLATE.format(question=p.question) if ask == "worse" else p.question
                        questions.append((item.conversation, question, a, b))
        probs: list[float] = []
        step = max(1, self.batch_size * STEP_BATCHES)
        for start in tqdm(range(0, len(questions), step), desc=desc, unit="step", leave=False):
            probs += self.letter_probs(self.question_texts(questions[start : start + step]))
        per_item: list[dict[str, list[float]]] = [{} for _ in items]
        for (n, pid, swapped, ask), p_letter in zip(keys, probs):
            p = prefer_a(p_letter, swapped)
            p = 1.0 - p if ask == "worse" else p  # the worse question names the answer not preferred
            if self.kind == "cot":
                p = clamp(p, self.low, self.high)
            per_item[n].setdefault(pid, []).append(p)
        return [self._result(by_principle) for by_principle in per_item]

    def _orders(self, item: Item, principle: RLPrinciple) -> tuple[bool, ...]:
        """The orders a question is asked in: both (debias), the given one, or one drawn per question."""
        if self.debias:
            return (False, True)
        if not self.random_order:
            return (False,)
        draw = zlib.crc32(f"{principle.id}|{item.response_a}|{item.response_b}".encode())  # stable across runs and processes
        return (bool(draw & 1),)

    def _result(self, by_principle: dict[str, list[float]]) -> dict:
        p_a, each = combine(by_principle, debias=True)  # each list holds only what was asked: average it all
        first = {pid: ps[0] for pid, ps in by_principle.items()}  # the first order alone: what letter bias does
        return {"p_a": p_a, "per_principle": each, "first_order": first, "label": hard_label(p_a) if self.kind == "hard" else p_a}


# --- measuring a labeller against human choices ------------------------------------------------


def split_half(comparisons: Sequence, which: str) -> list:
    """The fixed tuning/reporting split of a comparison file: even positions tune, odd ones report."""
    check_choice("label.report_split", which, ("all", "tune", "report"))
    return list(comparisons) if which == "all" else list(comparisons)[0 if which == "tune" else 1 :: 2]


def _agreement_stats(p_chosen: Sequence[float]) -> dict:
    stats = human_agreement(p_chosen)
    return {"agreement": stats["agreement"], "interval_95": stats["interval_95"], "mean_confidence": mean(abs(p - 0.5) for p in p_chosen)}


def labeller_report(labeller: Labeller, comparisons: Sequence, principles: Sequence[RLPrinciple], seed: int = 0) -> dict:
    """How far to trust a labeller: its labels of human comparisons, against the human choice.

    The chosen answer goes to a random side (seeded), so one-order agreement shows letter bias and
    calibration has both outcomes. Per principle and for the ensemble (their mean): agreement with
    its 95% interval, agreement in the first order alone, mean |p - 0.5|, ECE; and the cost per
    comparison in forward passes and seconds.
    """
    rows = human_pairs(list(comparisons), seed)  # {conversation, response_a, response_b, label}: label 1 = a chosen
    items = [Item(r["conversation"], r["response_a"], r["response_b"], tuple(principles)) for r in rows]
    passes, t0 = labeller.forward_passes, time.perf_counter()
    results = labeller.label(items, desc="labeller report")
    seconds = time.perf_counter() - t0

    def chosen(p_a: float, row: dict) -> float:
        return p_a if row["label"] == 1.0 else 1.0 - p_a

    def measure(p_as: list[float], firsts: list[float]) -> dict:
        outcomes = [r["label"] for r in rows]
        return {
            **_agreement_stats([chosen(p, r) for p, r in zip(p_as, rows)]),
            "one_order_agreement": _agreement_stats([chosen(p, r) for p, r in zip(firsts, rows)])["agreement"],
            "ece": expected_calibration_error(p_as, outcomes),
        }

    per = {p.id: measure([r["per_principle"][p.id] for r in results], [r["first_order"][p.id] for r in results]) for p in principles}
    ensemble = measure([r["p_a"] for r in results], [mean(r["first_order"].values()) for r in results])
    return {
        "comparisons": len(rows),
        "label_type": labeller.kind,
        "debias": labeller.debias and labeller.kind not in LIKELIHOOD_KINDS,
        "few_shot": bool(labeller.examples),
        "temperature": labeller.temperature if labeller.kind in LIKELIHOOD_KINDS else None,
        "principles": [p.id for p in principles],
        "ensemble": ensemble,
        "per_principle": per,
        "forward_passes_per_comparison": (labeller.forward_passes - passes) / max(1, len(rows)),
        "seconds_per_comparison": seconds / max(1, len(rows)),
        # the labels themselves, for plots and for ensembles of any subset of the principles
        "calibration": {
            "p_a": [r["p_a"] for r in results],
            "a_chosen": [r["label"] for r in rows],
            "per_principle": {p.id: [r["per_principle"][p.id] for r in results] for p in principles},
        },
    }


def report_principles(constitution) -> tuple[RLPrinciple, ...]:
    """The principles a report measures: `constitution.principle` alone if set, else every RL principle."""
    return (constitution.rl_principle(constitution.principle),) if constitution.principle else tuple(constitution.rl_principles)


def labeller_from_config(cfg, constitution) -> Labeller:
    """The labeller that `label=` and `feedback_model=` describe, on the run's device."""
    from cai.config import instantiate

    return labeller_for(
        cfg,
        instantiate(cfg.feedback_model),
        kind=cfg.label.kind,
        examples=constitution.rl_examples if cfg.label.few_shot else (),
        debias=cfg.label.debias,
        clamp_low=cfg.label.clamp_low,
        clamp_high=cfg.label.clamp_high,
        batch_size=cfg.label.batch_size,
        cot_max_new_tokens=cfg.label.cot_max_new_tokens,
        temperature=cfg.label.temperature,
        max_length=cfg.label.max_length,
        options=option_format(cfg.label.options, cfg.label.brackets),
        random_order=cfg.label.random_order,
        ask=cfg.label.ask,
        reduce=cfg.label.reduce,
    )


def labeller_for(cfg, spec, **options) -> Labeller:
    """A Labeller of `spec`'s model with these Labeller options: on a vLLM engine under label.engine=vllm,
    else the HF model loaded in this process. The label stage and the eval stage's feedback judge build theirs here."""
    engine = label_engine(cfg, spec)
    return Labeller(None if engine else spec.load_model(), spec.load_tokenizer(), engine=engine, **options)


ENGINES = ("hf", "vllm")


def engine_identity(cfg) -> dict | None:
    """What label.engine adds to the identity of a label or a verdict: None for HF (the feedback model's
    spec says it all), else the vLLM engine's dtype (auto resolved: a CPU's and a GPU's differ), since its
    numbers differ from HF's within float tolerance."""
    if cfg.label.engine != "vllm":
        return None
    from cai.generation.vllm import engine_dtype  # imports no vLLM

    return {"vllm": engine_dtype(cfg.generation.dtype)}


def label_engine(cfg, spec):
    """label.engine=vllm: a vLLM engine for the feedback model, built with `generation=vllm`'s settings; else None (HF)."""
    if engine_identity(cfg) is None:
        return None
    from cai.config import instantiate

    return instantiate(cfg.generation, model=spec)


def check_engine(cfg) -> None:
    """label.engine: hf, or vllm with generation=vllm and a multiple-choice label kind."""
    engine = cfg.label.engine
    check_choice("label.engine", engine, ENGINES)
    if engine == "vllm" and not uses_vllm(cfg):
        raise CaiError("label.engine=vllm: the engine is built with generation=vllm's settings; add generation=vllm")
    if engine == "vllm" and cfg.label.kind in LIKELIHOOD_KINDS:
        raise CaiError(
            f"label.engine=vllm reads option log-probs (kinds soft, hard, cot); label={cfg.label.kind} scores answers: use label.engine=hf"
        )


def check_options(label) -> None:
    """label.options and label.brackets, checked against the label kind (the `label` config section)."""
    option_format(label.options, label.brackets)
    if label.kind == "cot" and (label.options != "letters" or not label.brackets):
        # The chain of thought ends in "So the answer is: (", so its question shows (A)/(B) and the answer is read there.
        raise CaiError(
            "label.options/label.brackets: label=cot asks with (A)/(B) and reads the letter after its reasoning; "
            "remove label.options and label.brackets, or choose label=soft or label=hard for the other option formats"
        )


def option_format(names: str, brackets: bool) -> OptionFormat:
    """label.options (letters | numbers) and label.brackets as the question's OptionFormat."""
    check_choice("label.options", names, OPTION_NAMES)
    return OptionFormat(OPTION_NAMES[names], brackets)
