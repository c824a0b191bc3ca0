"""Stage `eval`: harmlessness and helpfulness Elo of every snapshot of a run, and the frontier plot.

1. Snapshots: the initial model, the SFT model, and the PPO policy every `ppo.snapshot_every`
   iterations plus the final one.
2. Answers: each snapshot answers the held-out (test split) red-team and helpfulness prompts, in one
   batched call, with a seed fixed per run, so the answers are repeatable.
3. Judgements: every pair of snapshots is compared on every prompt, round robin.
   - `eval.judge=feedback` (default): the feedback model is asked a fixed harmlessness question on
     red-team prompts and a helpfulness question on helpful prompts, zero-shot, in both orders
     (debiased, as for the labels).
   - `eval.judge=pm`: the preference model scores both answers; P(a) = sigmoid(r_a - r_b).
   The verdict counts as a win for the preferred answer, or a tie when exactly undecided or when the two
   answers are the same text.
4. Elo: one Bradley–Terry fit per axis (cai/elo.py), anchored at the initial model, with 95%
   bootstrap intervals that resample prompts.
5. Outputs: `elo.json`, `frontier.png`, `answers.jsonl`, a W&B table of answers and judgements, and
   per-snapshot refusal rate, boilerplate rate, mean length and mean PM score.

Answers and judgements are cached under `${paths.artifacts}/eval_cache/`, keyed by content, so the
snapshots shared by several runs (the initial model, one SFT model) are answered once, and the
cross-run frontier (`stage=frontier`, cai/stages/frontier.py) judges only the pairs not judged yet.
The judging and rating machinery is shared with that stage: cai/arena.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai.arena import (
    AXES,
    PMJudge,
    Snapshot,
    answer,
    check_arena,
    conversation,
    external_players,
    judge_quality,
    log_results,
    make_judge,
    parse_external,
    rate,
    report,
    reward_dir,
)
from cai.artifacts import Upstream, file_hash, fingerprint, write_json, write_jsonl
from cai.config import instantiate
from cai.data import load_prompts, source_hash
from cai.distributed import is_rank_zero
from cai.metrics import boilerplate_rate, refusal_rate
from cai.models import placement
from cai.reward import PreferenceModel, score
from cai.rl import own_policy
from cai.stages import Context, Stage

log = logging.getLogger(__name__)


def snapshots(cfg: DictConfig, sft: Upstream | None, ppo: Upstream) -> list[Snapshot]:
    """The run's snapshots in training order: initial, SFT (or `ppo.policy`, where RL started), PPO every
    ppo.snapshot_every and the final policy."""
    initial = OmegaConf.to_container(cfg.model, resolve=True)
    out = [Snapshot(fingerprint({"role": "initial", "model": instantiate(cfg.model).identity()}), "initial", 0, initial)]

    def local(path: Path) -> dict:
        return {"name": path.name, "source": "local", "path": str(path), "dtype": cfg.model.dtype, "cache": cfg.paths.cache}

    # Keyed by the weights each was saved with (the digests the manifests recorded), not by the config
    # that asked for them: a retrained policy is a new player with new answers.
    if (start := own_policy(cfg)) is not None:
        out.append(Snapshot(fingerprint({"role": "policy", "model": start.identity()}), "policy", 1, dataclasses.asdict(start)))
    else:
        out.append(Snapshot(fingerprint({"role": "sft", "weights": sft.digest_under(sft.model_dir)}), "sft", 1, local(sft.model_dir)))
    final = ppo.manifest["counts"]["iterations"]
    saved = [(int(p.name.split("-")[1]), p) for p in sorted((ppo.path / "snapshots").glob("iter-*"))]
    # The final iteration is the saved policy itself, whether or not a snapshot was also taken then.
    points = [(it, p) for it, p in saved if it < final] + [(final, ppo.model_dir)]
    out += [
        Snapshot(fingerprint({"role": "ppo", "weights": ppo.digest_under(p), "iteration": it}), f"ppo@{it}", 1 + it, local(p))
        for it, p in points
    ]
    return out


def eval_prompts(cfg: DictConfig) -> list[dict]:
    """The held-out prompts every snapshot answers: the test splits, never seen in training.

    Drawn with seed 0 whatever `seed` is, so the runs of a seed sweep are rated on the same prompts.
    """
    red = load_prompts("red_team", cfg.data.red_team, "test", cfg.eval.n_red_team, seed=0)
    helpful = load_prompts("helpful", cfg.data.helpful, "test", cfg.eval.n_helpful, seed=0)
    return [{"id": f"{kind}:{p.id}", "kind": kind, "prompt": p.text} for kind, ps in (("red_team", red), ("helpful", helpful)) for p in ps]


def absolute_metrics(cfg: DictConfig, answers: list[dict], pm=None) -> dict:
    """Refusal and boilerplate rates, mean length (tokens) and mean PM score of one snapshot's answers."""
    red = [r["response"] for r in answers if r["kind"] == "red_team"]
    out = {
        "refusal_rate": refusal_rate(red) if red else 0.0,
        "boilerplate_rate": boilerplate_rate([r["response"] for r in answers]),
    }
    if all(r.get("tokens") is not None for r in answers):  # another system's answers come without token counts
        out["mean_length"] = sum(r["tokens"] for r in answers) / len(answers)
    if pm is not None:
        model, tok = pm
        transcripts = [(conversation(r), r["response"]) for r in answers]
        scores = score(model, tok, transcripts, cfg.pm.max_length, cfg.pm.batch_size)
        out["pm_score"] = sum(scores) / len(scores)
    return out


def point_run_at(cfg: DictConfig, eval_dir: Path, run_name: str | None) -> None:
    """A pointer in the run's own output dir, so `stage=frontier eval.runs=[<multirun dir>]` finds this eval."""
    Path(cfg.paths.output).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.paths.output) / "eval.json", {"eval_dir": str(eval_dir), "run": run_name})


def build(ctx: Context) -> dict | None:
    cfg, out, tracker = ctx.cfg, ctx.out, ctx.tracker
    snaps = snapshots(cfg, ctx.upstream.get("sft"), ctx.upstream["ppo"])
    prompts = eval_prompts(cfg)
    ctx.extra["prompt_ids"] = {kind: [p["id"] for p in prompts if p["kind"] == kind] for kind in ("red_team", "helpful")}
    judge = make_judge(cfg, ctx.upstream.get("pm"))
    judge_info = {**judge.describe(), "quality": judge_quality(cfg, judge)}
    externals, external_answers = external_players(cfg, prompts, own_prompts=False)
    answers = {**answer(cfg, snaps, prompts), **external_answers}
    players = snaps + externals
    ratings, table = rate(cfg, players, answers, judge)
    judge.close()  # every verdict is in: its engine's memory goes before the PM loads
    if not is_rank_zero():  # the answers and verdicts are on disk; rank 0 alone scores, writes the report and logs
        return None  # (several ranks writing frontier.png at once let rank 0 read a half-written one)
    # This run's PM scores every answer; when it is also the judge, the copy the judge loaded serves.
    pm = judge.model() if isinstance(judge, PMJudge) and judge.is_reward else PreferenceModel.load(reward_dir(cfg, ctx.upstream.get("pm")))
    metrics = {s.key: absolute_metrics(cfg, answers[s.key], pm) for s in tqdm(players, desc="eval metrics", unit="snapshot")}
    run_name = tracker.name or "this run"
    title = f"{run_name}: Elo (judge: {judge.identity})"
    runs = {run_name: [s.key for s in snaps], **{s.label: [s.key] for s in externals}}
    rows = report(players, ratings, metrics, runs, out.path, title, judge_info)
    answer_rows = [{"snapshot": s.label, **r} for s in players for r in answers[s.key]]
    write_jsonl(out.path / "answers.jsonl", answer_rows)
    columns = ["snapshot", "kind", "prompt", "response"]
    tracker.table("eval/answers", columns, [[r[k] for k in columns] for r in answer_rows])
    log_results(tracker, "eval", rows, table, out.path)
    last = rows[len(snaps) - 1]  # the final policy
    tracker.log({f"eval/summary/{axis}_elo": last[f"{axis}_elo"] for axis in AXES.values()})  # the sweeps' metric
    tracker.summary(
        {"eval/judge/identity": judge.identity, "eval/judge/independent": not judge.shares, **quality_metrics(judge_info["quality"])}
    )
    summary = f"{last['label']}: harmless Elo {last['harmless_elo']:+.0f}, helpful Elo {last['helpful_elo']:+.0f}"
    summary += f" ({judge.caveat()})" if judge.caveat() else ""
    ctx.extra["run"] = run_name
    generated = [s.ran_on for s in snaps if s.ran_on]
    ctx.extra["models"] = {"pm_scores": placement(pm[0])}
    ctx.extra["models"].update({"answers": generated[0]} if generated else {})
    ctx.extra["models"].update({"judge": judge.ran_on} if judge.ran_on else {})
    return {"snapshots": len(snaps), "external": len(externals), "prompts": len(prompts), **ratings["games"], "summary": summary}


def quality_metrics(quality: dict[str, dict]) -> dict[str, float]:
    """eval/judge/<axis>_agreement (and its interval) for W&B."""
    out = {}
    for axis, q in quality.items():
        out[f"eval/judge/{axis}_agreement"] = q["agreement"]
        out[f"eval/judge/{axis}_agreement_low"], out[f"eval/judge/{axis}_agreement_high"] = q["interval_95"]
    return out


def inputs(cfg: DictConfig) -> dict:
    """The held-out prompts' content, the judge's identity (its model and questions, or its PM's content) and check files."""
    own_pm = cfg.eval.judge == "pm" and not cfg.eval.judge_pm  # this run's PM: its fingerprint is an input already
    checks = {f: source_hash(cfg.eval[f], f"eval.{f}") for f in ("judge_check", "judge_check_helpful") if cfg.eval[f]}
    external = {name: file_hash(path) for name, path, _ in parse_external(cfg)}
    judge = cfg.eval.judge if own_pm else make_judge(cfg).key
    return {"prompts": fingerprint(eval_prompts(cfg)), "judge": judge, **checks, **({"external": external} if external else {})}


STAGE = Stage(
    name="eval",
    writes="`elo.json` (per snapshot: both Elos with intervals, refusal and boilerplate rates, length, PM score; the judge), `frontier.png`, `answers.jsonl`",
    description="Elo evaluation and the frontier",
    build=build,
    after="ppo",
    lineage=("eval",),
    logging_only=("eval.runs",),
    # The PM is the reward its answers are scored by; neither it nor SFT is read when you bring your own.
    reads=lambda cfg: (() if cfg.ppo.policy else ("sft",)) + ("ppo",) + (() if cfg.ppo.reward_model else ("pm",)),
    inputs=inputs,
    check=check_arena,
    metric=lambda c: c["summary"],
    output="frontier.png",
    artifact=("eval", "evaluation", ""),
    announce=lambda ctx: point_run_at(ctx.cfg, ctx.out.path, ctx.tracker.name or ctx.extra.get("run")),
)
