"""How good is each judge? The feedback model, an AI-labelled PM and a human-label PM, on held-out human choices.

    python benchmarks/bench_judges.py [ROOT] [--data FILE] [--n N] [--all] [--max-length 256]

The hh-rlhf dev comparisons (default: the shared dev split, 1,146) are split once, by position:
even rows tune (train the PMs), odd rows report. On the report half it prints, with 95% intervals
and wall times:
- the feedback-model judge (the embedded SmolLM2-135M, the eval's harmlessness question, zero-shot,
  both orders): how often it prefers the human-chosen answer;
- a human-label PM: `label=human` on the tune half, then `stage=pm pm.trainable=head` (frozen
  backbone), scored with `pm.eval_data` = the report half;
- an AI-labelled PM: the same, on the tune half ordered by the feedback model's choice: debiased soft
  labels, or `--label-kind likelihood|contrastive` (with `--reduce sum`: summed token log-likelihoods).
With --all, the human-label PM is trained again with `pm.trainable=all`: the accuracy that the frozen
backbone costs and the training time it saves, on the same data.
PMs are trained through `python train.py`, in ROOT (a temp dir unless given).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cai
from cai.arena import QUESTIONS
from cai.data import Comparison, read_hh_rlhf
from cai.labels import Item, Labeller
from cai.metrics import human_agreement
from cai.models import ModelSpec

# A linear head on frozen features takes a large step; fine-tuning the whole 135M model a small one.
LR = {"head": 1e-3, "last_block": 1e-4, "all": 1e-5}
HH_DEV = cai.ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def write_hh(path: Path, comps: list[Comparison], flip: list[bool] | None = None) -> Path:
    """Comparisons back to the hh-rlhf format; flip[i] swaps chosen and rejected (an AI's choice)."""

    def transcript(conv: list[dict], answer: str) -> str:
        turns = [*conv, {"role": "assistant", "content": answer}]
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, c in enumerate(comps):
            chosen, rejected = (c.rejected, c.chosen) if flip and flip[i] else (c.chosen, c.rejected)
            f.write(json.dumps({"chosen": transcript(c.conversation, chosen), "rejected": transcript(c.conversation, rejected)}) + "\n")
    return path


def train(root: Path, *overrides: str) -> float:
    """`python train.py` with these overrides in ROOT; returns the wall time."""
    env = {**os.environ, "CAI_ROOT": str(root), "WANDB_MODE": "disabled"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", "logger=none", *overrides], cwd=cai.ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train.py {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def pm_accuracy(root: Path, data: Path, report: Path, args, trainable: str = "head") -> tuple[dict, float]:
    """Train a PM on `data` (label=human) and score it on `report`; (pm/hh metrics, seconds)."""
    common = ("label=human", f"label.data={data}", f"pm.trainable={trainable}", f"pm.max_length={args.max_length}", "pm.epochs=1")
    seconds = train(root, "stage=label", *common)
    seconds += train(root, "stage=pm", *common, f"pm.lr={LR[trainable]}", "pm.batch_size=8", f"pm.eval_data={report}")
    metrics = json.loads(next((root / "artifacts" / "pm").glob("latest/metrics.json")).read_text())
    return metrics, seconds


def line(name: str, q: dict, seconds: float) -> str:
    low, high = q["interval_95"]
    return f"{name:34s} {q['agreement']:.3f} [{low:.3f}, {high:.3f}]  n={q['comparisons']}  {seconds:7.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default=None)
    ap.add_argument("--data", default=str(HH_DEV))
    ap.add_argument("--n", type=int, default=0, help="comparisons used (0 = all)")
    ap.add_argument("--all", action="store_true", help="also train the human-label PM with pm.trainable=all (slow)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--label-kind", default="soft", help="the labeller of the AI-labelled PM: soft (debiased), likelihood or contrastive")
    ap.add_argument(
        "--reduce", default="mean", help="likelihood kinds: an answer's score is the mean or the sum of its token log-likelihoods"
    )
    ap.add_argument("--skip-judge", action="store_true", help="skip the feedback-model judge (it does not depend on --label-kind)")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="cai-judges-")).resolve()
    comps = read_hh_rlhf(args.data)[: args.n or None]
    tune, report = comps[0::2], comps[1::2]
    files = root / "data"
    files.mkdir(parents=True, exist_ok=True)
    report_file = write_hh(files / "report.jsonl.gz", report)
    print(f"== judges on {len(report)} held-out comparisons of {args.data} (odd rows; the {len(tune)} even rows train the PMs)")
    results = {
        "data": os.path.relpath(args.data, cai.ROOT),
        "split": "tune = rows 0, 2, 4, ...; report = rows 1, 3, 5, ...",
        "tune": len(tune),
        "report": len(report),
    }

    spec = ModelSpec(name="smollm2_135m", source="embedded", dtype="float32", cache=os.environ.get("CAI_CACHE", "~/.cache/cai"))
    labeller = Labeller(spec.load_model(), spec.load_tokenizer(), "soft", debias=True, batch_size=8)
    question = (QUESTIONS["red_team"],)
    if not args.skip_judge:
        t = time.perf_counter()
        judged = labeller.label([Item(c.conversation, c.chosen, c.rejected, question) for c in report], desc="feedback judge")
        results["feedback_judge"] = {**human_agreement([r["p_a"] for r in judged]), "seconds": time.perf_counter() - t}
        print(line("feedback-model judge (135M)", results["feedback_judge"], results["feedback_judge"]["seconds"]), flush=True)

    t = time.perf_counter()
    if args.label_kind != "soft":  # the tuning half labelled by another kind (cai/labels.py), the same question
        labeller = Labeller(labeller.model, labeller.tok, args.label_kind, debias=False, batch_size=8, reduce=args.reduce)
    results["label_kind"], results["reduce"] = args.label_kind, args.reduce
    ai = labeller.label([Item(c.conversation, c.chosen, c.rejected, question) for c in tune], desc="AI labels")
    ai_seconds = time.perf_counter() - t
    ai_file = write_hh(files / "tune-ai.jsonl.gz", tune, flip=[r["p_a"] < 0.5 for r in ai])
    results["ai_label_agreement_on_tune"] = human_agreement([r["p_a"] for r in ai])
    human_file = write_hh(files / "tune-human.jsonl.gz", tune)
    runs = (
        ("human-label PM (head)", human_file, 0.0, "head"),
        (f"AI-labelled PM (head, {args.label_kind}{', sum' if args.reduce == 'sum' else ''})", ai_file, ai_seconds, "head"),
        ("human-label PM (all)", human_file, 0.0, "all"),
    )
    for name, data, extra, trainable in runs[: None if args.all else 2]:
        where = root / name.replace(" ", "_").replace("(", "").replace(")", "")
        metrics, seconds = pm_accuracy(where, data, report_file, args, trainable)
        q = {"agreement": metrics["pm/hh/accuracy"], "interval_95": [metrics["pm/hh/accuracy_low"], metrics["pm/hh/accuracy_high"]]}
        q["comparisons"] = len(report)
        manifest = json.loads((where / "artifacts" / "pm" / "latest" / "manifest.json").read_text())
        results[name] = {**q, "seconds": seconds + extra, "train_seconds": manifest["counts"]["seconds"]}
        print(line(name, q, seconds + extra) + f"  (PM training {manifest['counts']['seconds']:.0f} s)", flush=True)
    if args.all:
        head, full = results["human-label PM (head)"], results["human-label PM (all)"]
        print(
            f"\npm.trainable=head vs all: training {full['train_seconds'] / head['train_seconds']:.1f}x faster, "
            f"agreement {head['agreement']:.3f} vs {full['agreement']:.3f}"
        )
    (root / "judges.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {root / 'judges.json'}")


if __name__ == "__main__":
    main()
