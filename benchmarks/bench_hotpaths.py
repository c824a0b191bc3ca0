"""The main job's hot paths (the judge, PPO scoring), before and after issue 16, measured in one run on the same machine.

    python benchmarks/bench_hotpaths.py ROOT [--judge-n 0] [--ppo-repeats 2] [--ppo-iterations 2]

ROOT is the `paths.root` of a finished main job (`python benchmarks/bench_main.py ROOT`). Each path
runs twice on the same inputs: with the code as it is, and with a baseline that is the code before
issue 16, swapped in by this script (not kept in the package):

- the eval judge: the feedback model judges ROOT's eval answers, every pair of snapshots on every
  prompt, both orders, through `cai.arena.verdicts_for` with an empty verdict cache. Baseline:
  questions sorted by length in steps of 4 batches, fixed batches, each one left-padded forward
  over every position with full-vocabulary logits. Now: questions sorted by their tokens in steps
  of 16 batches, batches cut where neighbours share least (one prompt's questions together), each
  batch's shared stretches run once (KV cache), the LM head at the last token only. Prints
  comparisons/s and how far the verdicts moved.
- PPO scoring (`PPOModule.make_experience`: PM reward, actor log-probs and values, ref log-probs,
  GAE) on one batch of rollouts from ROOT's SFT policy, against ROOT's PM. Baseline: log-probs from
  the full (B, L, V) logits, float32 ref and PM. Now: the LM head and log-softmax on response
  positions only, the ref and PM stored in `ppo.frozen_dtype` (bf16).
- where one iteration's scoring goes: the first batch's tokens (prompt, answer, shared prefix, padding)
  and each model's pass over it (ref, PM, actor without and with grad), each timed alone.
- a PPO iteration's scoring + update (`train_ppo`, a few iterations per run), with the update's
  forward also serving as the sampling-time log-probs and values (`PPOModule.one_step`, the
  quickstart's one step per iteration) and without (a separate no-grad actor forward in scoring).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import cai
import cai.config  # noqa: F401  (registers the typed config schema)
import cai.labels
import cai.stages.ppo
from cai import arena
from cai.losses import logprobs_and_entropy
from cai.models import DTYPES, frozen
from cai.reward import PreferenceModel, pm_reward
from cai.stages.ppo import PPOModule, train_ppo, train_prompts
from cai.training import pad


def baseline_letter_probs(self, texts):
    """Before: questions sorted by length, fixed batches, one left-padded forward each, logits at every position."""
    encoded = [self._ids(t) for t in texts]
    device = next(self.model.parameters()).device
    out = [0.0] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), self.batch_size):
        idx = order[start : start + self.batch_size]
        ids, mask = pad([encoded[i][0] for i in idx], self.tok.pad_token_id, side="left")
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1, :].float()
        self.forward_passes += len(idx)
        for row, i in enumerate(idx):
            out[i] = torch.sigmoid(logits[row, encoded[i][1]] - logits[row, encoded[i][2]]).item()
    return out


def baseline_response_logprobs(model, batch, with_entropy=False, entropy_grad=True):
    """Before: log-probs (and entropies) from the full (B, L, V) logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    logp, entropy = logprobs_and_entropy(out.logits[:, :-1], batch["input_ids"][:, 1:], with_entropy)
    return logp, entropy, out.hidden_states[-1]


def judge(cfg, answers_file: Path, n: int) -> tuple[float, dict]:
    """Seconds and verdicts of the feedback judge over the answers in answers_file (an empty verdict cache)."""
    answers: dict[str, list[dict]] = {}
    for line in answers_file.read_text().splitlines():
        row = json.loads(line)
        answers.setdefault(row["snapshot"], []).append(row)
    snaps = [arena.Snapshot(key=k, label=k, order=i, model={}) for i, k in enumerate(answers)]
    if n:
        ids = sorted({r["id"] for rows in answers.values() for r in rows})[:n]
        answers = {k: [r for r in rows if r["id"] in ids] for k, rows in answers.items()}
    t = time.perf_counter()
    verdicts = arena.verdicts_for(snaps, answers, arena.FeedbackJudge(cfg))
    return time.perf_counter() - t, verdicts


def compose_cfg(root: Path, artifacts: str):
    overrides = [f"paths.root={root}", f"paths.artifacts={artifacts}", f"paths.output={artifacts}/out", "logger=none"]
    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        return compose(config_name="train", overrides=overrides)


def bench_judge(root: Path, n: int) -> None:
    answers_file = root / "artifacts" / "eval" / "latest" / "answers.jsonl"
    runs = {}
    for name in ("baseline", "now"):
        cai.labels.Labeller.letter_probs = baseline_letter_probs if name == "baseline" else NOW_LETTER_PROBS
        cai.labels.STEP_BATCHES = 4 if name == "baseline" else NOW_STEP_BATCHES  # questions sorted together: 4 batches' worth before
        seconds, verdicts = judge(compose_cfg(root, tempfile.mkdtemp(prefix="cai-judge-")), answers_file, n)
        runs[name] = (seconds, verdicts)
        ties = sum(v == 0.5 for v in verdicts.values())
        print(
            f"judge {name:8s}: {len(verdicts) - ties} comparisons judged in {seconds:.1f} s = {(len(verdicts) - ties) / seconds:.2f} comparisons/s",
            flush=True,
        )
    cai.labels.Labeller.letter_probs, cai.labels.STEP_BATCHES = NOW_LETTER_PROBS, NOW_STEP_BATCHES
    (t0, v0), (t1, v1) = runs["baseline"], runs["now"]
    moved = max(abs(v0[k] - v1[k]) for k in v0)
    flipped = sum((v0[k] > 0.5) != (v1[k] > 0.5) for k in v0)
    print(f"judge speed-up {t0 / t1:.2f}x; verdicts moved by at most {moved:.2e}, {flipped} of {len(v0)} changed side")


def ppo_module(root: Path, cfg, frozen_dtype: torch.dtype | None) -> PPOModule:
    """A PPOModule on ROOT's SFT policy and PM, built as the ppo stage builds it (frozen_dtype: its ref and PM's storage)."""
    sft, pm_dir = root / "artifacts" / "sft" / "latest" / "model", root / "artifacts" / "pm" / "latest" / "model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor, tok = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32), AutoTokenizer.from_pretrained(sft)
    pm, pm_tok = PreferenceModel.load(pm_dir)
    reward = pm_reward(frozen(pm, frozen_dtype or torch.float32, torch.float32), pm_tok, cfg.pm.max_length, cfg.pm.batch_size)
    args = (actor.train(), tok, reward, train_prompts(cfg), cfg.ppo, cfg.seed)
    return PPOModule(*args, generation_batch_size=cfg.generation.batch_size, frozen_dtype=frozen_dtype)


def bench_scoring(root: Path, repeats: int) -> None:
    """make_experience: pre-issue-16 log-probs with a float32 ref and PM, against the stage's (bf16-stored ref and PM).

    First, on the same rollouts, where the scoring time goes (`bench_breakdown`).
    """
    cfg = compose_cfg(root, str(root / "artifacts"))
    modules = {"baseline": ppo_module(root, cfg, None), "now": ppo_module(root, cfg, DTYPES[cfg.ppo.frozen_dtype])}
    conversations, completions = modules["now"].rollout(0)
    batch = modules["now"].rollout_batch(completions)
    bench_breakdown(modules["now"], conversations, completions, batch, repeats + 1)
    out = {}
    for name in ("baseline", "now", "baseline", "now")[: 2 * max(1, repeats)]:
        cai.stages.ppo.response_logprobs = baseline_response_logprobs if name == "baseline" else NOW_RESPONSE_LOGPROBS
        t = time.perf_counter()
        exp = modules[name].make_experience(conversations, completions, batch)
        out.setdefault(name, []).append((time.perf_counter() - t, exp))
    cai.stages.ppo.response_logprobs = NOW_RESPONSE_LOGPROBS
    tokens = exp.batch["input_ids"].numel()
    best = {name: min(s for s, _ in runs) for name, runs in out.items()}
    for name, s in best.items():
        print(f"ppo scoring {name:8s}: {s:.2f} s for {len(completions)} rollouts ({tokens} padded tokens), best of {len(out[name])}")
    e0, e1 = out["baseline"][-1][1], out["now"][-1][1]
    mask = e0.mask.bool()
    logp, logp_mean = float((e0.old_logp - e1.old_logp)[mask].abs().max()), float((e0.old_logp - e1.old_logp)[mask].abs().mean())
    scores = float((e0.scores - e1.scores).abs().max())  # the PM's bf16 weights move its scores (and so the advantages)
    kl = float((e0.kl - e1.kl).sum(1).abs().max())
    print(
        f"ppo scoring speed-up {best['baseline'] / best['now']:.2f}x; actor log-probs differ by at most {logp:.2e} (mean {logp_mean:.1e}), "
        f"PM scores by {scores:.3f} (std {float(e0.scores.std()):.3f}), KL per answer by {kl:.3f} nats"
    )


def bench_iteration(root: Path, iterations: int) -> None:
    """A PPO iteration's scoring + update, with the update's forward reused for scoring (`one_step`) and without."""
    cfg = compose_cfg(root, str(root / "artifacts"))
    per_iteration: dict[str, list[float]] = {}
    for name, reuse in (("two actor forwards", False), ("one, reused", True)) * 2:
        module = ppo_module(root, cfg, DTYPES[cfg.ppo.frozen_dtype])
        PPOModule.one_step = property(lambda self, reuse=reuse: reuse and NOW_ONE_STEP.fget(self))
        train_ppo(module, iterations, Path(tempfile.mkdtemp(prefix="cai-ppo-")), 0, cfg)
        seconds = [h["ppo/time/scoring_s"] + h["ppo/time/update_s"] for h in module.history]
        per_iteration.setdefault(name, []).append(sum(seconds) / len(seconds))
    PPOModule.one_step = NOW_ONE_STEP
    for name, runs in per_iteration.items():
        print(f"ppo scoring + update, {name:18s}: {min(runs):.2f} s per iteration (best of {len(runs)} runs of {iterations})")
    two, one = (min(v) for v in per_iteration.values())
    print(f"ppo scoring + update speed-up from reusing the update's forward: {two / one:.2f}x")


def bench_breakdown(module: PPOModule, conversations, completions, batch: dict, repeats: int) -> None:
    """Where one iteration's scoring goes: the batch's tokens (prompt, answer, shared, padding) and each model's pass."""
    mask, attention = batch["action_mask"], batch["attention_mask"].bool()
    rows = [ids[keep].tolist() for ids, keep in zip(batch["input_ids"], attention)]
    answer, real = int(mask.sum()), int(attention.sum())
    print(
        f"ppo batch: {len(rows)} rollouts, {batch['input_ids'].numel()} padded tokens, {real} real: {real - answer} prompt, "
        f"{answer} answer; {cai.labels.common_prefix_length(rows)} shared by every row; "
        f"{len({str(c) for c in conversations})} distinct prompts"
    )

    def best(fn) -> float:
        seconds = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t)
        return min(seconds)

    with torch.no_grad():
        passes = {
            "ref (log-probs)": best(lambda: NOW_RESPONSE_LOGPROBS(module.ref, batch)),
            "reward (PM)": best(lambda: module.reward_fn(conversations, completions)),
            "actor, no grad": best(lambda: module.actor_forward(batch, with_entropy=False)),
            "ref body alone": best(lambda: module.ref.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])),
        }
    passes["actor, with grad"] = best(lambda: module.actor_forward(batch))  # the one-step update's forward
    print(f"ppo scoring passes (best of {max(1, repeats)}): " + ", ".join(f"{k} {v:.2f} s" for k, v in passes.items()))


NOW_LETTER_PROBS, NOW_STEP_BATCHES = cai.labels.Labeller.letter_probs, cai.labels.STEP_BATCHES
NOW_RESPONSE_LOGPROBS = cai.stages.ppo.response_logprobs
NOW_ONE_STEP = PPOModule.one_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--judge-n", type=int, default=0, help="prompts judged (0 = all of the eval's)")
    ap.add_argument("--ppo-repeats", type=int, default=2, help="timed make_experience calls per variant (the best counts)")
    ap.add_argument("--ppo-iterations", type=int, default=2, help="PPO iterations per run of the reuse comparison")
    args = ap.parse_args()
    torch.manual_seed(0)
    bench_scoring(args.root.resolve(), args.ppo_repeats)
    bench_iteration(args.root.resolve(), args.ppo_iterations)
    bench_judge(args.root.resolve(), args.judge_n)


if __name__ == "__main__":
    main()
