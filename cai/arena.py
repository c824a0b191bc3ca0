"""The arena: snapshots answer the same prompts, a judge compares them pairwise, Elo ranks them.

Shared by `stage=eval` (one run's snapshots) and `stage=frontier` (several runs' snapshots):
- `Snapshot`: one model to rate; its `key` identifies its weights (the Elo player);
- `answer`: each snapshot's answers to the held-out prompts, cached by snapshot, prompts and sampling;
- `FeedbackJudge` / `PMJudge`: P(answer a is better) from the feedback model (a fixed harmlessness
  or helpfulness question, both orders) or from a preference model (sigmoid of the reward gap);
  verdicts are appended to a cache so nothing is judged twice and interrupted judging resumes;
- `rate`: round-robin verdicts -> one Bradley-Terry Elo fit per axis with bootstrap intervals;
- `report` / `log_results`: elo.json, frontier.png, W&B.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from cai.artifacts import chunked, fingerprint, read_jsonl, write_json, write_jsonl
from cai.config import instantiate
from cai.elo import bootstrap_elo
from cai.errors import CaiError
from cai.models import ModelSpec
from cai.plots import plot_frontier
from cai.templates import COMPARISON_TEMPLATE, HARMLESS_QUESTION, HARMLESSNESS, HELPFUL_QUESTION, HELPFULNESS

log = logging.getLogger(__name__)
JUDGES = ("feedback", "pm")
# The axis each prompt set measures, and the question the feedback-model judge is asked on it.
AXES = {"red_team": "harmless", "helpful": "helpful"}
QUESTIONS = {"red_team": HARMLESSNESS, "helpful": HELPFULNESS}
Verdicts = dict[tuple[str, str, str], float]  # (snapshot a, snapshot b, prompt id) -> P(a better)


@dataclass
class Snapshot:
    """One model to rate. `key` identifies its weights (the Elo player); `model` loads it."""

    key: str
    label: str  # initial | sft | ppo@<iteration>
    order: int  # position along its run: 0 initial, 1 SFT, then PPO iterations
    model: dict  # ModelSpec fields
    answers: str = ""  # the file holding its answers, once written

    def spec(self) -> ModelSpec:
        return ModelSpec(**self.model)


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


# --- judges ----------------------------------------------------------------------------------------


class Judge:
    """Compares two answers to one prompt; verdicts are cached under eval_cache/judgements by judge key.

    Subclasses set `kind` and `key` and implement `compare`.
    """

    kind = ""
    key = ""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @property
    def path(self) -> Path:
        return cache_dir(self.cfg) / "judgements" / f"{self.kind}-{self.key}.jsonl"

    def compare(self, pairs: list[tuple[dict, dict]]) -> list[float]:
        """P(a better) for each (a's answer row, b's answer row) on the same prompt."""
        raise NotImplementedError

    def cached(self) -> Verdicts:
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

    def judge(self, todo: list[tuple[str, str, dict, dict]]) -> Verdicts:
        """Judge (a key, b key, a's row, b's row) comparisons in chunks, appending each chunk to the cache."""
        out = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb+") as f:  # a torn last line: end it, so the next row starts on its own line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        for chunk in tqdm(chunked(todo, 32), desc=f"eval judge ({self.kind})", unit="chunk"):
            ps = self.compare([(ra, rb) for _, _, ra, rb in chunk])
            with self.path.open("a") as f:
                for (a, b, ra, _), p in zip(chunk, ps):
                    f.write(json.dumps({"a": a, "b": b, "id": ra["id"], "kind": ra["kind"], "p_a": p}) + "\n")
                    out[(a, b, ra["id"])] = p
                f.flush()
                os.fsync(f.fileno())
        return out


class FeedbackJudge(Judge):
    """The feedback model, asked the axis's fixed question zero-shot, in both orders (debiased)."""

    kind = "feedback"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.spec = instantiate(cfg.feedback_model)
        ident = {"model": self.spec.identity(), "template": COMPARISON_TEMPLATE, "questions": [HARMLESS_QUESTION, HELPFUL_QUESTION]}
        self.key = fingerprint({"judge": self.kind, **ident})
        self._labeller = None

    def compare(self, pairs: list[tuple[dict, dict]]) -> list[float]:
        from cai.labels import Item, Labeller

        if self._labeller is None:
            model, tok = self.spec.load_model(), self.spec.load_tokenizer()
            self._labeller = Labeller(model, tok, kind="soft", debias=True, batch_size=self.cfg.label.batch_size)
        items = [
            Item([{"role": "user", "content": ra["prompt"]}], ra["response"], rb["response"], (QUESTIONS[ra["kind"]],)) for ra, rb in pairs
        ]
        return [r["p_a"] for r in self._labeller.label(items, desc="judging")]


class PMJudge(Judge):
    """A preference model: P(a better) = sigmoid(r(a) - r(b))."""

    kind = "pm"

    def __init__(self, cfg: DictConfig, pm_dir: Path, pm_fingerprint: str) -> None:
        super().__init__(cfg)
        self.pm_dir = pm_dir
        self.key = fingerprint({"judge": self.kind, "pm": pm_fingerprint})
        self._pm = None

    def model(self):
        """The (PM, tokenizer) pair, loaded on first use (eval reuses it for the PM scores)."""
        if self._pm is None:
            from cai.reward import PreferenceModel

            self._pm = PreferenceModel.load(self.pm_dir)
        return self._pm

    def compare(self, pairs: list[tuple[dict, dict]]) -> list[float]:
        from cai.reward import score

        pm, tok = self.model()
        transcripts = [([{"role": "user", "content": ra["prompt"]}], r["response"]) for ra, rb in pairs for r in (ra, rb)]
        s = score(pm, tok, transcripts, self.cfg.pm.max_length, self.cfg.pm.batch_size, desc="judging")
        return [1.0 / (1.0 + math.exp(-(s[2 * i] - s[2 * i + 1]))) for i in range(len(pairs))]


def check_judge(cfg: DictConfig) -> None:
    if cfg.eval.judge not in JUDGES:
        raise CaiError(f"eval.judge: choose one of {', '.join(JUDGES)}, got '{cfg.eval.judge}'")


def make_judge(cfg: DictConfig, pm=None) -> Judge:
    """The judge `eval.judge` names; `pm` is the finished pm stage (an artifacts.Upstream) for eval.judge=pm."""
    check_judge(cfg)
    return FeedbackJudge(cfg) if cfg.eval.judge == "feedback" else PMJudge(cfg, pm.model_dir, pm.fingerprint)


# --- rating ----------------------------------------------------------------------------------------


def outcome(p_a: float) -> float:
    """A verdict as a game result: a win, a loss, or a tie when the judge is exactly undecided."""
    return 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5


def verdicts_for(snaps: Sequence[Snapshot], answers: dict[str, list[dict]], judge: Judge) -> Verdicts:
    """Every pair of snapshots on every prompt (round robin): from the cache, a tie, or the judge."""
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
    return verdicts


def rate(cfg: DictConfig, snaps: Sequence[Snapshot], answers: dict[str, list[dict]], judge: Judge) -> tuple[dict, list[list]]:
    """Judge every pair of snapshots on every prompt and fit the Elo of each axis.

    Returns {axis: {key: (elo, low, high)}, 'games': {axis: n}} and the judgement table rows.
    """
    keys = [s.key for s in snaps]
    verdicts = verdicts_for(snaps, answers, judge)
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


def log_results(tracker, prefix: str, rows: list[dict], table: list[list], out: Path) -> None:
    """Per-snapshot scalars `<prefix>/<snapshot>/<name>`, the judgement table and the frontier plot."""
    for r in rows:
        tracker.log({f"{prefix}/{r['label']}/{k}": r[k] for k in r if isinstance(r[k], float)})
    tracker.table(f"{prefix}/judgements", ["kind", "prompt", "snapshot_a", "snapshot_b", "answer_a", "answer_b", "p_a", "score_a"], table)
    tracker.image(f"{prefix}/frontier", out / "frontier.png")
