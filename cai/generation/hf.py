"""HF `generate` backend: batched, left-padded, KV-cached. The CPU default."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from cai.generation import Completion, Generator, LoadableModel, SamplingParams
from cai.training import pad


class HFGenerator(Generator):
    """Generates with a transformers model held in this process.

    `model` is a ModelSpec (loaded here) or an already-loaded model, e.g. the PPO policy being
    trained, with its tokenizer. `sampling`: the default SamplingParams fields.
    """

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 16, **sampling: Any) -> None:
        super().__init__(batch_size, **sampling)
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
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start : start + self.batch_size]
            ids, mask = pad([prompts[i] for i in idx], pad_id, side="left")  # every prompt ends at the same column
            width = ids.shape[1]
            torch.manual_seed(params.seed + b)  # same seed and same prompts -> same text
            sample = params.temperature > 0
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=params.max_new_tokens,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=eos,
            )
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                finished = eos in new
                if finished:
                    new = new[: new.index(eos) + 1]  # keep eos, drop the padding after it
                text = tok.decode(new, skip_special_tokens=True).strip()
                results[i] = Completion(text=text, token_ids=new, prompt_token_ids=list(prompts[i]), finished=finished)
            bar.update(len(idx))
        bar.close()
        self.model.train(was_training)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
