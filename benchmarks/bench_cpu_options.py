"""Do bf16 or torch.compile pay on this CPU? Forwards of a model's body at the main job's shapes.

    python benchmarks/bench_cpu_options.py MODEL_DIR [--no-compile]

MODEL_DIR is any HF checkpoint, e.g. ROOT/artifacts/sft/latest/model of a finished main job
(`python benchmarks/bench_main.py ROOT`). For each shape (batch x tokens of random ids), no-grad
forwards of the body, best of 3, the variants alternating so that machine noise hits them alike:
float32 against bfloat16 weights and compute, and eager against `torch.compile(dynamic=True)`
(whose compile time, on the first call, is printed too).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM

from cai.models import cast_weights

SHAPES = ((1, 40), (8, 100), (16, 97), (8, 123))  # a judge prefix, a judge batch, PPO scoring, a longer batch


def seconds(body, batch: int, tokens: int) -> float:
    ids = torch.randint(100, 40000, (batch, tokens))
    with torch.no_grad():
        t = time.perf_counter()
        body(input_ids=ids)
        return time.perf_counter() - t


def best(body, batch: int, tokens: int) -> float:
    return min(seconds(body, batch, tokens) for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--no-compile", action="store_true", help="only bf16 against float32")
    args = ap.parse_args()
    torch.manual_seed(0)
    body = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval().base_model
    variants = {"float32": body, "bfloat16": cast_weights(copy.deepcopy(body), torch.bfloat16)}  # RoPE buffers stay float32
    if not args.no_compile:
        compiled = torch.compile(body, dynamic=True)
        t = time.perf_counter()
        seconds(compiled, *SHAPES[1])
        print(f"torch.compile (dynamic shapes): first call {time.perf_counter() - t:.1f} s", flush=True)
        variants["compiled float32"] = compiled
    for batch, tokens in SHAPES:
        for v in variants.values():  # warm every variant at this shape first
            seconds(v, batch, tokens)
        times = {name: best(v, batch, tokens) for name, v in variants.items()}
        rest = ", ".join(f"{name} {s:.3f} s ({times['float32'] / s:.2f}x)" for name, s in times.items() if name != "float32")
        print(f"batch {batch:2d} x {tokens:3d} tokens: float32 {times['float32']:.3f} s; {rest}", flush=True)


if __name__ == "__main__":
    main()
