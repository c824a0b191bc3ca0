"""Benchmark the AI labeller on the embedded model: cost and agreement with human choices.

    python benchmarks/bench_label.py [--n 198] [--principles harmless-ethical,...] [--speed 32]

Cost: soft labels for `--speed` hh-rlhf comparisons under one principle, both orders, batched;
prints comparisons/s and forward passes per comparison (budget: 2 per principle).
Quality: on the first `--n` comparisons of the hh-rlhf dev split, how often the labeller prefers the
human-chosen answer: one order only, debiased, and debiased with the constitution's few-shot examples.
"""

from __future__ import annotations

import argparse
import time

import cai
from cai.constitution import load_constitution
from cai.data import read_hh_rlhf
from cai.labels import Item, Labeller
from cai.metrics import wilson_interval
from cai.models import ModelSpec

HH_DEV = cai.ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def agreement(labeller: Labeller, comps, principles) -> tuple[float, dict[str, float]]:
    results = labeller.label([Item(c.conversation, c.chosen, c.rejected, principles) for c in comps])
    per = {p.id: sum(r["per_principle"][p.id] > 0.5 for r in results) / len(results) for p in principles}
    return sum(r["p_a"] > 0.5 for r in results) / len(results), per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=198)
    ap.add_argument("--principles", default="harmless-ethical")
    ap.add_argument("--speed", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", default=str(HH_DEV))
    args = ap.parse_args()
    spec = ModelSpec(name="smollm2_135m", source="embedded", dtype="float32")
    model, tok = spec.load_model(), spec.load_tokenizer()
    constitution = load_constitution(str(cai.CONSTITUTIONS / "default.yaml"))
    principles = tuple(constitution.rl_principle(p) for p in args.principles.split(","))
    comps = read_hh_rlhf(args.data)

    lab = Labeller(model, tok, "soft", batch_size=args.batch_size)
    t = time.perf_counter()
    lab.label([Item(c.conversation, c.chosen, c.rejected, principles[:1]) for c in comps[: args.speed]])
    secs = time.perf_counter() - t
    print(f"\n== labeller cost (embedded SmolLM2-135M, soft, 1 principle, both orders, batch {args.batch_size})")
    print(
        f"comparisons/s {args.speed / secs:.2f}; forward passes per comparison {lab.forward_passes / args.speed:.1f} (budget 2 per principle)"
    )

    data = comps[: args.n]
    print(f"\n== agreement with the human choice on {len(data)} hh-rlhf dev comparisons, principles {args.principles}")
    rows = [
        ("zero-shot, one order", Labeller(model, tok, "soft", debias=False, batch_size=args.batch_size)),
        ("zero-shot, debiased", Labeller(model, tok, "soft", debias=True, batch_size=args.batch_size)),
        ("few-shot, one order", Labeller(model, tok, "soft", constitution.rl_examples, debias=False, batch_size=args.batch_size)),
        ("few-shot, debiased", Labeller(model, tok, "soft", constitution.rl_examples, debias=True, batch_size=args.batch_size)),
    ]
    for name, labeller in rows:
        t = time.perf_counter()
        acc, per = agreement(labeller, data, principles)
        low, high = wilson_interval(acc, len(data))
        extra = "" if len(per) == 1 else "  per principle: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
        print(f"{name:24s} {acc:.3f} [{low:.3f}, {high:.3f}]  ({time.perf_counter() - t:.0f} s){extra}")


if __name__ == "__main__":
    main()
