"""Stage `eval`: harmlessness and helpfulness Elo of every snapshot of a run, and the frontier plot.

1. Snapshots: the initial model, the SFT model, and the PPO policy every `eval.snapshot_every`
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
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai.artifacts import StageDir, chunked, fingerprint, read_jsonl, require_complete, stage_path, write_json, write_jsonl
from cai.constitution import RLPrinciple
from cai.data import load_prompts
from cai.elo import bootstrap_elo
from cai.errors import CaiError
from cai.frontier import plot_frontier
from cai.metrics import boilerplate_rate, refusal_rate
from cai.models import ModelSpec
from cai.pipeline import instantiate
from cai.prompts import COMPARISON_TEMPLATE, HARMLESS_QUESTION, HELPFUL_QUESTION
from cai.tracking import Tracker

log = logging.getLogger(__name__)
STAGE = "eval"
JUDGES = ("feedback", "pm")
# The axis each prompt set measures, and the question the feedback-model judge is asked on it.
AXES = {"red_team": "harmless", "helpful": "helpful"}
QUESTIONS = {
    "red_team": RLPrinciple(id="harmlessness", question=HARMLESS_QUESTION),
    "helpful": RLPrinciple(id="helpfulness", question=HELPFUL_QUESTION),
}


@dataclass
class Snapshot:
    """One model to rate. `key` identifies its weights (the Elo player); `model` loads it."""

    key: str
    label: str  # initial | sft | ppo@<iteration>
    order: int  # position along its run: 0 initial, 1 SFT, then PPO iterations
    model: dict  # ModelSpec fields
    answers: str = ""  # the file holding its answers, once written

    def spec(self) -> ModelSpec:
        return ModelSpec(**{k: v for k, v in self.model.items() if k != "_target_"})


def snapshots(cfg: DictConfig) -> list[Snapshot]:
    """The run's snapshots in training order: initial, SFT, PPO every eval.snapshot_every and the final policy."""
    sft = require_complete(cfg, "sft", STAGE)
    ppo = require_complete(cfg, "ppo", STAGE)
    initial = OmegaConf.to_container(cfg.model, resolve=True)
    out = [Snapshot(fingerprint({"role": "initial", "model": instantiate(cfg.model).identity()}), "initial", 0, initial)]

    def local(path: Path) -> dict:
        return {"name": path.name, "source": "local", "path": str(path), "dtype": cfg.model.dtype, "cache": cfg.paths.cache}

    out.append(Snapshot(fingerprint({"role": "sft", "fingerprint": sft["fingerprint"]}), "sft", 1, local(stage_path(cfg, "sft") / "model")))
    ppo_dir = stage_path(cfg, "ppo")
    final = ppo["counts"]["iterations"]
    saved = [(int(p.name.split("-")[1]), p) for p in sorted((ppo_dir / "snapshots").glob("iter-*"))]
    # The final iteration is the saved policy itself, whether or not a snapshot was also taken then.
    points = [(it, p) for it, p in saved if it < final] + [(final, ppo_dir / "model")]
    out += [
        Snapshot(fingerprint({"role": "ppo", "fingerprint": ppo["fingerprint"], "iteration": it}), f"ppo@{it}", 1 + it, local(p))
        for it, p in points
    ]
    return out


def eval_prompts(cfg: DictConfig) -> list[dict]:
    """The held-out prompts every snapshot answers: the test splits, never seen in training."""
    red = load_prompts("red_team", cfg.data.red_team, "test", cfg.eval.n_red_team)
    helpful = load_prompts("helpful", cfg.data.helpful, "test", cfg.eval.n_helpful)
    return [{"id": f"{kind}:{p.id}", "kind": kind, "prompt": p.text} for kind, ps in (("red_team", red), ("helpful", helpful)) for p in ps]


def cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts).expanduser() / "eval_cache"


def answer(cfg: DictConfig, snaps: Sequence[Snapshot], prompts: list[dict]) -> dict[str, list[dict]]:
    """Each snapshot's answers to the prompts (cached by snapshot, prompts and sampling)."""
    sampling = {
        "max_new_tokens": cfg.eval.max_new_tokens,
        "temperature": cfg.generation.temperature,
        "top_p": cfg.generation.top_p,
        "seed": cfg.seed,
    }
    out = {}
    for snap in tqdm(snaps, desc="eval answers", unit="snapshot"):
        path = cache_dir(cfg) / "answers" / f"{fingerprint({'snapshot': snap.key, 'prompts': prompts, 'sampling': sampling})}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            gen = instantiate(cfg.generation, model=snap.spec())
            try:
                params = gen.params(max_new_tokens=sampling["max_new_tokens"], seed=cfg.seed * 31 + 7)
                done = gen.generate([[{"role": "user", "content": p["prompt"]}] for p in prompts], params, desc=f"answers {snap.label}")
            finally:
                gen.close()
            write_jsonl(path, [{**p, "response": c.text, "tokens": len(c.token_ids)} for p, c in zip(prompts, done)])
        snap.answers = str(path)
        out[snap.key] = read_jsonl(path)
    return out


class Judge:
    """Compares two answers to one prompt; verdicts are cached by (judge, a, b, prompt)."""

    def __init__(self, cfg: DictConfig) -> None:
        if cfg.eval.judge not in JUDGES:
            raise CaiError(f"eval.judge: choose one of {', '.join(JUDGES)}, got '{cfg.eval.judge}'")
        self.cfg = cfg
        self.kind = cfg.eval.judge
        if self.kind == "feedback":
            ident = {
                "model": instantiate(cfg.feedback_model).identity(),
                "template": COMPARISON_TEMPLATE,
                "questions": [HARMLESS_QUESTION, HELPFUL_QUESTION],
            }
        else:
            ident = {"pm": require_complete(cfg, "pm", STAGE)["fingerprint"]}
        self.key = fingerprint({"judge": self.kind, **ident})
        self.path = cache_dir(cfg) / "judgements" / f"{self.kind}-{self.key}.jsonl"
        self._impl = None

    def cached(self) -> dict[tuple[str, str, str], float]:
        """(a, b, prompt id) -> P(a better). A torn last line (a crash mid-write) is skipped."""
        out = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out[(row["a"], row["b"], row["id"])] = row["p_a"]
        return out

    def model(self):
        """The judging model, loaded on first use: a Labeller, or the (PM, tokenizer) pair."""
        if self._impl is None:
            if self.kind == "feedback":
                from cai.labels import Labeller

                spec = instantiate(self.cfg.feedback_model)
                self._impl = Labeller(
                    spec.load_model(), spec.load_tokenizer(), kind="soft", debias=True, batch_size=self.cfg.label.batch_size
                )
            else:
                from cai.reward import PreferenceModel

                self._impl = PreferenceModel.load(stage_path(self.cfg, "pm") / "model")
        return self._impl

    def judge(self, todo: list[tuple[str, str, dict, dict]]) -> dict[tuple[str, str, str], float]:
        """Judge (a key, b key, a's row, b's row) comparisons in chunks, appending each chunk to the cache."""
        out = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb+") as f:  # a torn last line: end it, so the next row starts on its own line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        for chunk in tqdm(chunked(todo, 32), desc=f"eval judge ({self.kind})", unit="chunk"):
            if self.kind == "feedback":
                from cai.labels import Item

                items = [
                    Item([{"role": "user", "content": ra["prompt"]}], ra["response"], rb["response"], (QUESTIONS[ra["kind"]],))
                    for _, _, ra, rb in chunk
                ]
                ps = [r["p_a"] for r in self.model().label(items, desc="judging")]
            else:
                from cai.reward import score

                pm, tok = self.model()
                pairs = [([{"role": "user", "content": ra["prompt"]}], r["response"]) for _, _, ra, rb in chunk for r in (ra, rb)]
                s = score(pm, tok, pairs, self.cfg.pm.max_length, self.cfg.pm.batch_size, desc="judging")
                ps = [1.0 / (1.0 + math.exp(-(s[2 * i] - s[2 * i + 1]))) for i in range(len(chunk))]
            with self.path.open("a") as f:
                for (a, b, ra, _), p in zip(chunk, ps):
                    f.write(json.dumps({"a": a, "b": b, "id": ra["id"], "kind": ra["kind"], "p_a": p}) + "\n")
                    out[(a, b, ra["id"])] = p
                f.flush()
                os.fsync(f.fileno())
        return out


def outcome(p_a: float) -> float:
    """A verdict as a game result: a win, a loss, or a tie when the judge is exactly undecided."""
    return 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5


def rate(cfg: DictConfig, snaps: Sequence[Snapshot], answers: dict[str, list[dict]], judge: Judge) -> tuple[dict, list[list]]:
    """Judge every pair of snapshots on every prompt (round robin) and fit the Elo of each axis.

    Returns {axis: {key: (elo, low, high)}, 'games': {axis: n}} and the judgement table rows.
    """
    keys = [s.key for s in snaps]
    cached = judge.cached()
    todo, verdicts = [], {}
    for i in range(len(snaps)):
        for j in range(i + 1, len(snaps)):
            for ra, rb in zip(answers[keys[i]], answers[keys[j]]):
                key, flipped = (keys[i], keys[j], ra["id"]), (keys[j], keys[i], ra["id"])
                if ra["response"].strip() == rb["response"].strip():
                    verdicts[key] = 0.5  # the same answer: a tie, no question needed
                elif key in cached:
                    verdicts[key] = cached[key]
                elif flipped in cached:
                    verdicts[key] = 1.0 - cached[flipped]
                else:
                    todo.append((keys[i], keys[j], ra, rb))
    log.info("eval: %d comparisons, %d cached or tied, %d to judge", len(verdicts) + len(todo), len(verdicts), len(todo))
    if todo:
        verdicts.update(judge.judge(todo))
    kind_of = {r["id"]: r["kind"] for r in answers[keys[0]]}
    index = {k: n for n, k in enumerate(keys)}
    result: dict = {"games": {}}
    for kind, axis in AXES.items():
        games = [(index[a], index[b], outcome(p), pid) for (a, b, pid), p in verdicts.items() if kind_of[pid] == kind]
        if not games:
            raise CaiError(f"eval.n_{kind}: no {kind} prompts were compared; set it above 0")
        point, low, high = bootstrap_elo(
            len(keys), [g[:3] for g in games], groups=[g[3] for g in games], n_boot=cfg.eval.bootstrap, seed=cfg.seed
        )
        result[axis] = {k: (float(point[n]), float(low[n]), float(high[n])) for n, k in enumerate(keys)}
        result["games"][axis] = len(games)
    text = {(k, r["id"]): r for k in keys for r in answers[k]}
    label = {s.key: s.label for s in snaps}
    rows = [
        [kind_of[pid], text[(a, pid)]["prompt"], label[a], label[b], text[(a, pid)]["response"], text[(b, pid)]["response"], p, outcome(p)]
        for (a, b, pid), p in sorted(verdicts.items())
    ]
    return result, rows


def absolute_metrics(cfg: DictConfig, answers: list[dict], pm=None) -> dict:
    """Refusal and boilerplate rates, mean length (tokens) and mean PM score of one snapshot's answers."""
    red = [r["response"] for r in answers if r["kind"] == "red_team"]
    out = {
        "refusal_rate": refusal_rate(red) if red else 0.0,
        "boilerplate_rate": boilerplate_rate([r["response"] for r in answers]),
        "mean_length": sum(r["tokens"] for r in answers) / len(answers),
    }
    if pm is not None:
        from cai.reward import score

        model, tok = pm
        scores = score(
            model, tok, [([{"role": "user", "content": r["prompt"]}], r["response"]) for r in answers], cfg.pm.max_length, cfg.pm.batch_size
        )
        out["pm_score"] = sum(scores) / len(scores)
    return out


def report(
    snaps: Sequence[Snapshot], ratings: dict, metrics: dict[str, dict], runs: dict[str, list[str]], out: Path, title: str
) -> list[dict]:
    """Write elo.json and frontier.png; return the per-snapshot rows."""
    rows = []
    for s in snaps:
        row = {**asdict(s)}
        for axis in AXES.values():
            row[f"{axis}_elo"], row[f"{axis}_low"], row[f"{axis}_high"] = ratings[axis][s.key]
        row.update(metrics.get(s.key, {}))
        rows.append(row)
    write_json(out / "elo.json", {"snapshots": rows, "runs": runs, "games": ratings["games"], "anchor": snaps[0].key})
    plot_frontier(rows, runs, out / "frontier.png", title)
    return rows


def log_results(tracker: Tracker, prefix: str, rows: list[dict], table: list[list], out: Path) -> None:
    for r in rows:
        tracker.log({f"{prefix}/{r['label']}/{k}": r[k] for k in r if isinstance(r[k], float)})
    tracker.table(f"{prefix}/judgements", ["kind", "prompt", "snapshot_a", "snapshot_b", "answer_a", "answer_b", "p_a", "score_a"], table)
    tracker.image(f"{prefix}/frontier", out / "frontier.png")


def point_run_at(cfg: DictConfig, eval_dir: Path, run_name: str | None) -> None:
    """A pointer in the run's own output dir, so `stage=frontier eval.runs=[<multirun dir>]` finds this eval."""
    Path(cfg.paths.output).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.paths.output) / "eval.json", {"eval_dir": str(eval_dir), "run": run_name})


def run(cfg: DictConfig, tracker: Tracker) -> dict:
    snaps = snapshots(cfg)
    prompts = eval_prompts(cfg)
    judge = Judge(cfg)
    config = {"eval": {k: v for k, v in OmegaConf.to_container(cfg.eval).items() if k != "runs"}, "seed": cfg.seed}
    out = StageDir(cfg, STAGE, config, {"snapshots": [s.key for s in snaps], "prompts": fingerprint(prompts), "judge": judge.key})
    if out.is_complete():
        log.info("eval: up to date at %s, skipping", out.path)
        point_run_at(cfg, out.path, tracker.name or out.manifest().get("run"))
        return {"metric": out.manifest()["counts"]["summary"] + " (cached)", "path": str(out.path / "frontier.png")}
    out.open()

    answers = answer(cfg, snaps, prompts)
    ratings, table = rate(cfg, snaps, answers, judge)
    from cai.reward import PreferenceModel

    # The PM scores every answer; when it is also the judge, the one already loaded serves.
    pm = judge.model() if judge.kind == "pm" else PreferenceModel.load(stage_path(cfg, "pm") / "model")
    metrics = {s.key: absolute_metrics(cfg, answers[s.key], pm) for s in tqdm(snaps, desc="eval metrics", unit="snapshot")}
    run_name = tracker.name or "this run"
    rows = report(snaps, ratings, metrics, {run_name: [s.key for s in snaps]}, out.path, f"{run_name}: Elo (judge: {judge.kind})")
    answer_rows = [{"snapshot": s.label, **r} for s in snaps for r in answers[s.key]]
    write_jsonl(out.path / "answers.jsonl", answer_rows)
    tracker.table(
        "eval/answers",
        ["snapshot", "kind", "prompt", "response"],
        [[r[k] for k in ("snapshot", "kind", "prompt", "response")] for r in answer_rows],
    )
    log_results(tracker, "eval", rows, table, out.path)
    last = rows[-1]
    tracker.log({"eval/summary/harmless_elo": last["harmless_elo"], "eval/summary/helpful_elo": last["helpful_elo"]})  # the sweeps' metric
    summary = f"{last['label']}: harmless Elo {last['harmless_elo']:+.0f}, helpful Elo {last['helpful_elo']:+.0f}"
    out.complete({"snapshots": len(snaps), "prompts": len(prompts), **ratings["games"], "summary": summary}, {"run": run_name})
    point_run_at(cfg, out.path, run_name)
    tracker.artifact(out.path, name="eval", type="evaluation")
    return {"metric": summary, "path": str(out.path / "frontier.png")}
