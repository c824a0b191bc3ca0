"""HF `generate` backend: batched, left-padded, KV-cached. The CPU default."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from cai.generation import Completion, Generator, LoadableModel, SamplingParams, derive_seed
from cai.models import placement
from cai.training import pad


class HFGenerator(Generator):
    """Generates with a transformers model held in this process.

    `model` is a ModelSpec (loaded here) or an already-loaded model, e.g. the PPO policy being
    trained, with its tokenizer. `sampling`: the default SamplingParams fields.
    """

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 16, truncate: bool = False, **sampling: Any) -> None:
        super().__init__(batch_size, truncate, **sampling)
        if isinstance(model, LoadableModel):
            tokenizer = tokenizer or model.load_tokenizer()
            model = model.load_model()
        if tokenizer is None:
            raise ValueError("HFGenerator needs a tokenizer when given a loaded model")
        self.model = model
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams, desc: str = "generating") -> list[Completion]:
        tok = self._tokenizer
        pad_id = tok.pad_token_id
        eos = tok.eos_token_id
        device = next(self.model.parameters()).device
        # Longest first: batches hold prompts of similar length (less padding), and the slowest
        # batch runs while the progress bar is still honest about the rest.
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        config = exact_sampling(params, pad_id, eos)
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
        try:  # closed on the way out of an interruption too, so the error line is the last thing printed
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                idx = order[start : start + self.batch_size]
                ids, mask = pad([prompts[i] for i in idx], pad_id, side="left")  # every prompt ends at the same column
                width = ids.shape[1]
                torch.manual_seed(derive_seed(params.seed, "batch", b))  # same seed and same prompts -> same text
                ids, mask = ids.to(device), mask.to(device)
                sampler = Sampler(params)
                with own_config_hidden(self.model):
                    cache = shared_prefill(self.model, ids, mask)
                    sequences = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=config,
                        logits_processor=LogitsProcessorList([sampler]),
                        **cache,
                    )
                logprobs = torch.stack(sampler.logprobs, 1).tolist() if params.logprobs else None  # (B, steps)
                for row, i in enumerate(idx):
                    new = sequences[row, width:].tolist()
                    finished = eos in new
                    if finished:
                        new = new[: new.index(eos) + 1]  # keep eos, drop the padding after it
                    text = tok.decode(new, skip_special_tokens=True).strip()
                    results[i] = Completion(text=text, token_ids=new, prompt_token_ids=list(prompts[i]), finished=finished)
                    if logprobs is not None:  # under the distribution sampled from (temperature, top-p)
                        results[i].logprobs = logprobs[row][: len(new)]
                bar.update(len(idx))
        finally:
            bar.close()
        self.model.train(was_training)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None

    def placement(self) -> dict:
        return placement(self.model)


def exact_sampling(params: SamplingParams, pad_id: int, eos: int) -> GenerationConfig:
    """A generation config that takes the most likely token of exactly the model's logits.

    Every processor that transformers would otherwise take from the model's generation_config or
    from its global defaults (top_k=50, repetition_penalty, min_length, no_repeat_ngram_size, ...)
    is set to its neutral value. Sampling is a `Sampler` among the logits processors, which leaves
    only the token it chose possible: generate's greedy step then takes it.
    """
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,  # so transformers adds none of its sampling warpers (top_k=50 by default, ...)
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos,
    )


class Sampler(LogitsProcessor):
    """Chooses each row's next token and leaves only it possible: the most likely one at temperature 0,
    else one drawn from softmax(logits / temperature), top-p cut.

    The same draw as transformers' sampling (`torch.multinomial`: the largest p_i / E_i over
    exponential draws E_i, an exponential race), with the exponentials made as -log(U) of uniforms:
    torch's own exponential sampler takes ~17 ms for 16 rows x 49k entries on two CPU cores, uniforms
    and a log ~5 ms: a decoding step of 16 rows of the 135M model is ~10% shorter. (An inverse-CDF
    draw, one uniform a row, is cheaper still, but moves to another token when float rounding shifts
    the cumulative sum: two runs equal up to rounding would sample apart.) The draw comes from torch's
    global generator, which `generate_ids` seeds per batch. With `params.logprobs`, each step's
    log-probs (B,) of the chosen tokens are kept in `logprobs`.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.greedy = params.temperature == 0
        self.warpers: list[LogitsProcessor] = []
        if not self.greedy and params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if not self.greedy and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))
        self.keep_logprobs = params.logprobs
        self.logprobs: list[torch.Tensor] = []  # per step: (B,) each row's chosen token's log-prob

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:  # scores: (B, V) float32
            scores = warp(input_ids, scores)
        if self.greedy:
            chosen = scores.argmax(-1, keepdim=True)  # (B, 1)
        else:
            probs = torch.softmax(scores, -1)  # (B, V); tokens cut by top-p are 0, so never win the race
            waits = torch.rand_like(probs).log_().neg_()  # (B, V) Exp(1) draws
            chosen = (probs / waits).argmax(-1, keepdim=True)  # (B, 1)
        if self.keep_logprobs:
            self.logprobs.append(torch.log_softmax(scores, -1).gather(1, chosen).squeeze(1))
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The KV cache of a batch whose prompts repeat (PPO's k answers to a prompt), each distinct prompt computed once.

    ids, mask: (B, W) left-padded. Returns {} when every prompt is distinct; else generate's cache
    argument: the cache of every prompt but its last token (generate computes that one, and samples
    from it), run on the distinct rows and copied to their repeats. Positions are those generate
    gives a left-padded row (cumsum of the mask), so the tokens sampled are those of a whole prefill
    up to float rounding; with k answers a prompt, the prompts cost a k-th of their forward.
    """
    index: dict[tuple, int] = {}  # a distinct prompt -> its number
    owner, distinct = [], []  # (B,) the distinct prompt each row repeats; (D,) the first row of each
    for row, prompt in enumerate(map(tuple, ids.tolist())):
        if prompt not in index:
            index[prompt] = len(distinct)
            distinct.append(row)
        owner.append(index[prompt])
    if len(distinct) == len(owner) or ids.shape[1] < 2:
        return {}
    ids, mask = ids[distinct, :-1], mask[distinct, :-1]  # (D, W-1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    accepts = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}  # the logits are not used
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.25 names it `cache`
    if not hasattr(cache, "batch_select_indices"):  # a legacy tuple cache: let generate prefill every row
        return {}
    cache.batch_select_indices(torch.tensor(owner, device=ids.device))  # (B, ...) each row gets its prompt's
    return {"cache" if "cache" in accepts else "past_key_values": cache}


@contextlib.contextmanager
def own_config_hidden(model):
    """Hide the model's own generation_config while it generates with an explicit one.

    transformers fills every field of the given config left at None from the model's
    generation_config, so an Instruct model's repetition_penalty or top_k would creep in; a blank
    one has nothing to add.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
