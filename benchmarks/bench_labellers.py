"""Which labeller agrees with people? Every label kind and variant on the shared hh-rlhf dev split.

    python benchmarks/bench_labellers.py [--methods soft,likelihood,likelihood-sum,...] [--n-tune 200] [--n-report 0]
        [--ensemble-n 120] [--out benchmarks/results/labellers.json]

The protocol: the dev comparisons are split once by position (`label.report_split`: even positions
tune, odd ones report). On the tuning half each method's temperature is fitted (likelihood kinds:
the one that minimises the log-loss of the human choices; it changes calibration, never agreement)
and the methods are compared; every method is then reported on the reporting half, winners and
losers alike, with one principle (`harmless-ethical`). Then, for the best method on the tuning half,
ensembles of 1, 4 and 16 principles on the first `--ensemble-n` reporting comparisons (one run under
all 16, the smaller ensembles from its per-principle labels). The embedded SmolLM2-135M labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import cai
from cai.constitution import load_constitution
from cai.data import read_hh_rlhf
from cai.labels import Labeller, labeller_report, split_half
from cai.metrics import human_agreement
from cai.models import ModelSpec
from cai.templates import OptionFormat

HH_DEV = cai.ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
PRINCIPLE = "harmless-ethical"
# name -> Labeller arguments (besides the model); `few_shot` uses the constitution's RL examples.
METHODS = {
    "soft": dict(kind="soft", debias=True),  # the paper's: (A)/(B), both orders
    "soft-one-order": dict(kind="soft", debias=False),
    "soft-random-order": dict(kind="soft", debias=False, random_order=True),
    "soft-ask-both": dict(kind="soft", debias=False, ask="both"),
    "soft-numbers": dict(kind="soft", debias=True, options=OptionFormat(("1", "2"), brackets=False)),
    "soft-space-letters": dict(kind="soft", debias=True, options=OptionFormat(("A", "B"), brackets=False)),
    "soft-few-shot": dict(kind="soft", debias=True, few_shot=True),
    "likelihood": dict(kind="likelihood"),
    "likelihood-sum": dict(kind="likelihood", reduce="sum"),
    "contrastive": dict(kind="contrastive"),
}
LIKELIHOOD = ("likelihood", "contrastive")


def fit_temperature(p_a: list[float], a_chosen: list[float]) -> float:
    """The temperature that minimises the log-loss of the human choices, given labels made at temperature 1."""
    diffs = [math.log(p / (1 - p)) if 0 < p < 1 else math.copysign(30.0, p - 0.5) for p in p_a]  # the score differences
    signs = [1.0 if c == 1.0 else -1.0 for c in a_chosen]

    def loss(t: float) -> float:
        return sum(math.log1p(math.exp(-s * d / t)) if -s * d / t < 30 else -s * d / t for d, s in zip(diffs, signs)) / len(diffs)

    return min((10 ** (k / 20) for k in range(-60, 41)), key=loss)  # 0.001 to 100, 20 steps a decade


def shorter_wins(comparisons) -> dict:
    """Agreement of "the shorter answer (in characters) is the better one" with the human choice; a tie counts half."""
    return human_agreement(
        [1.0 if len(c.chosen) < len(c.rejected) else 0.5 if len(c.chosen) == len(c.rejected) else 0.0 for c in comparisons]
    )


def make(model, tok, examples, spec: dict, temperature: float = 1.0) -> Labeller:
    args = {k: v for k, v in spec.items() if k != "few_shot"}
    return Labeller(model, tok, examples=examples if spec.get("few_shot") else (), temperature=temperature, batch_size=8, **args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(HH_DEV))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-tune", type=int, default=200, help="tuning comparisons used (0 = the whole half)")
    ap.add_argument("--n-report", type=int, default=0, help="reporting comparisons used (0 = the whole half)")
    ap.add_argument("--ensemble-n", type=int, default=120, help="reporting comparisons for the 1/4/16-principle ensembles (0 = skip)")
    ap.add_argument("--out", default=str(cai.ROOT / "benchmarks" / "results" / "labellers.json"))
    args = ap.parse_args()
    spec = ModelSpec(name="smollm2_135m", source="embedded", dtype="float32", cache=os.environ.get("CAI_CACHE", "~/.cache/cai"))
    model, tok = spec.load_model(), spec.load_tokenizer()
    constitution = load_constitution(str(cai.CONSTITUTIONS / "default.yaml"))
    one = (constitution.rl_principle(PRINCIPLE),)
    comps = read_hh_rlhf(args.data)
    tune, report = split_half(comps, "tune")[: args.n_tune or None], split_half(comps, "report")[: args.n_report or None]
    print(f"{len(comps)} comparisons: tuning on {len(tune)}, reporting on {len(report)}; principle {PRINCIPLE}", flush=True)
    results: dict = {
        "data": os.path.relpath(args.data, cai.ROOT),
        "n_tune": len(tune),
        "n_report": len(report),
        "principle": PRINCIPLE,
        "methods": {},
    }
    # A reference that reads no model: the shorter answer wins. What a labeller must beat to show it reads more than length.
    shorter = {name: shorter_wins(half) for name, half in (("tune", tune), ("report", report))}
    results["shorter_answer"] = shorter
    low, high = shorter["report"]["interval_95"]
    print(
        f"{'shorter answer wins':24s} tune {shorter['tune']['agreement']:.3f} | report {shorter['report']['agreement']:.3f} [{low:.3f}, {high:.3f}] (no model)",
        flush=True,
    )
    for name in args.methods.split(","):
        method = METHODS[name]
        t0 = time.perf_counter()
        tuned = labeller_report(make(model, tok, constitution.rl_examples, method), tune, one)
        temperature = (
            fit_temperature(tuned["calibration"]["p_a"], tuned["calibration"]["a_chosen"]) if method["kind"] in LIKELIHOOD else None
        )
        reported = labeller_report(make(model, tok, constitution.rl_examples, method, temperature or 1.0), report, one)
        row = {
            "tune_agreement": tuned["ensemble"]["agreement"],
            "temperature": temperature,
            **{k: reported["ensemble"][k] for k in ("agreement", "interval_95", "one_order_agreement", "mean_confidence", "ece")},
            "forward_passes_per_comparison": reported["forward_passes_per_comparison"],
            "seconds_per_comparison": reported["seconds_per_comparison"],
        }
        results["methods"][name] = row
        low, high = row["interval_95"]
        print(
            f"{name:24s} tune {row['tune_agreement']:.3f} | report {row['agreement']:.3f} [{low:.3f}, {high:.3f}] one order "
            f"{row['one_order_agreement']:.3f} |p-.5| {row['mean_confidence']:.3f} ECE {row['ece']:.3f} T {temperature} "
            f"{row['forward_passes_per_comparison']:.1f} passes {row['seconds_per_comparison']:.2f} s/comparison ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.ensemble_n:
        best = max(results["methods"], key=lambda m: results["methods"][m]["tune_agreement"])  # chosen on the tuning half
        method = METHODS[best]
        labeller = make(model, tok, constitution.rl_examples, method, results["methods"][best]["temperature"] or 1.0)
        data = report[: args.ensemble_n]
        full = labeller_report(labeller, data, tuple(constitution.rl_principles))
        a_chosen, per = full["calibration"]["a_chosen"], full["calibration"]["per_principle"]
        ids = [p.id for p in constitution.rl_principles]
        ensembles = {}
        for k in (1, 4, 16):
            chosen_ids = [PRINCIPLE, *[i for i in ids if i != PRINCIPLE]][:k]  # the principle above, then the file's order
            ps = [sum(per[i][n] for i in chosen_ids) / k for n in range(len(data))]
            agree = human_agreement([p if c == 1.0 else 1 - p for p, c in zip(ps, a_chosen)])
            ensembles[k] = {"agreement": agree["agreement"], "interval_95": agree["interval_95"], "principles": chosen_ids}
            print(
                f"ensemble of {k:2d} ({best}): {agree['agreement']:.3f} [{agree['interval_95'][0]:.3f}, {agree['interval_95'][1]:.3f}]",
                flush=True,
            )
        results["ensembles"] = {"method": best, "comparisons": len(data), **{str(k): v for k, v in ensembles.items()}}
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
