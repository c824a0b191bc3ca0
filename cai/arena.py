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

from filelock import FileLock
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cai.artifacts import chunked, file_hash, fingerprint, read_jsonl, write_json, write_jsonl
from cai.config import instantiate
from cai.data import KIND_NAMES, read_answer_set, read_hh_rlhf
from cai.distributed import all_gather, barrier, is_rank_zero, mine, rank
from cai.elo import bootstrap_elo
from cai.errors import CaiError
from cai.generation import derive_seed
from cai.metrics import human_agreement
from cai.models import ModelSpec, placement
from cai.plots import plot_frontier
from cai.reward import pm_identity, resolve_pm_dir
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
    ran_on: dict | None = None  # where it generated them (None when they came from the cache)

    def spec(self) -> ModelSpec:
        return ModelSpec(**self.model)


def conversation(row: dict) -> list[dict]:
    """The conversation an answer row responds to: its own (hh-rlhf rows), or its single prompt."""
    return row.get("conversation") or [{"role": "user", "content": row["prompt"]}]


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
    paths = [
        cache_dir(cfg) / "answers" / f"{fingerprint({'snapshot': s.key, 'prompts': prompts, 'sampling': sampling})}.jsonl" for s in snaps
    ]
    for n in tqdm(mine(len(snaps)), desc="eval answers", unit="snapshot", disable=not is_rank_zero()):  # rank r: snapshots r, r + N, ...
        snap, path = snaps[n], paths[n]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            gen = instantiate(cfg.generation, model=snap.spec())
            try:
                snap.ran_on = gen.placement()
                params = gen.params(max_new_tokens=sampling["max_new_tokens"], seed=derive_seed(cfg.seed, "eval"))
                done = gen.generate([[{"role": "user", "content": p["prompt"]}] for p in prompts], params, desc=f"answers {snap.label}")
            finally:
                gen.close()
            write_jsonl(path, [{**p, "response": c.text, "tokens": len(c.token_ids)} for p, c in zip(prompts, done)])
    gathered = all_gather([s.ran_on for s in snaps])  # also the barrier: every snapshot's answers are on disk past it
    for n, snap in enumerate(snaps):
        snap.ran_on = next((on[n] for on in gathered if on[n]), None)  # where the rank that answered ran
    for snap, path in zip(snaps, paths):
        snap.answers = str(path)
        out[snap.key] = read_jsonl(path)
    return out


# --- other systems' answers -------------------------------------------------------------------------


def parse_external(cfg: DictConfig) -> list[tuple[str, Path, list[dict]]]:
    """eval.external entries NAME:FILE (or 'NAME=FILE', quoted for Hydra): (name, path, the file's parsed rows)."""
    out = []
    for entry in cfg.eval.external:
        name, sep, path = str(entry).partition("=" if "=" in str(entry) else ":")
        if not sep or not name.strip() or not path.strip():
            raise CaiError(f"eval.external: '{entry}' is not NAME:FILE, e.g. eval.external=[gpt:answers.jsonl,base:base.jsonl]")
        # NAME:FILE:KIND gives every row of the set that names no kind of its own an axis (red_team or helpful).
        head, _, kind = path.rpartition(":")
        path, kind = (head, KIND_NAMES[kind.strip()]) if head and kind.strip() in KIND_NAMES else (path, None)
        rows = read_answer_set(path.strip(), field=f"eval.external ({name})")
        rows = [{**r, "kind": r["kind"] or kind} for r in rows]
        out.append((name.strip(), Path(path.strip()).expanduser(), rows))
    if len({n for n, _, _ in out}) < len(out):
        raise CaiError("eval.external: two answer sets have the same NAME; give each its own")
    return out


def external_players(cfg: DictConfig, prompts: list[dict], own_prompts: bool) -> tuple[list[Snapshot], dict[str, list[dict]]]:
    """The eval.external answer sets as players, on the prompts they share with `prompts` (matched by conversation).

    With own_prompts, a set's other prompts count too (stage=frontier), each on the axis its row's
    `kind` names; in a run's eval only the run's held-out prompts are rated. Answers are written
    to the answers cache, so a later frontier finds them like a snapshot's.
    """
    known = {fingerprint(conversation(p)): p for p in prompts}
    snaps, answers = [], {}
    for name, path, parsed in parse_external(cfg):
        rows = []
        for r in parsed:
            match = known.get(fingerprint(r["conversation"]))
            if match is None and (not own_prompts or r["kind"] is None):
                continue
            base = match or {"id": f"ext:{fingerprint(r['conversation'])}", "kind": r["kind"], "prompt": r["prompt"]}
            rows.append({**base, "conversation": r["conversation"], "response": r["response"], "tokens": None})
        if not rows and not own_prompts:
            raise CaiError(
                f"eval.external: none of the {len(parsed)} prompts of {path} is among this run's held-out prompts; "
                "answer those (eval.n_red_team, eval.n_helpful), or rate the set against others with stage=frontier"
            )
        if not rows:
            where = "the runs' held-out prompts" if prompts else "any run's prompts (there are no runs)"
            raise CaiError(
                f"eval.external: none of the {len(parsed)} prompts of {path} is among {where}, and its rows name no 'kind', "
                f'so their axis (harmless or helpful) is unknown; add "kind": "red_team" or "helpful" to each row, or '
                f"give the set one on the command line: eval.external=[{name}:{path}:helpful]"
            )
        key = fingerprint({"external": name, "content": file_hash(path)})
        cached = cache_dir(cfg) / "answers" / f"external-{key}.jsonl"
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(cached, rows)
        snaps.append(Snapshot(key, f"ext:{name}", -1, {"external": str(path)}, str(cached)))
        answers[key] = rows
    return snaps, answers


# --- judges ----------------------------------------------------------------------------------------


class Judge:
    """Compares two answers to one prompt; verdicts are cached under eval_cache/judgements by judge key.

    Subclasses set `kind` and `key` and implement `compare`.
    """

    kind = ""
    key = ""
    identity = ""  # what the judge is, in words, for elo.json and the plot
    is_reward = False  # True when the judge is the PM that this run's PPO optimised
    shares: tuple[str, ...] = ()  # the run's roles whose model the judge is: "labeller", "reward model"
    ran_on: dict | None = None  # where its model ran, once loaded (None when every verdict was cached)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "key": self.key,
            "identity": self.identity,
            "is_reward": self.is_reward,
            "shares": list(self.shares),
            "independent": not self.shares,
        }

    def caveat(self) -> str:
        """'' for an independent judge, else what it is not independent of (for plot titles and the summary)."""
        return f"judge not independent: it is this run's {' and '.join(self.shares)}" if self.shares else ""

    @property
    def path(self) -> Path:
        return cache_dir(self.cfg) / "judgements" / f"{self.kind}-{self.key}.jsonl"

    def compare(self, pairs: list[tuple[dict, dict]]) -> list[float]:
        """P(a better) for each (a's answer row, b's answer row) on the same prompt."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what `compare` loaded that holds an engine (a vLLM engine's GPU memory); loaded again if needed."""

    def rank_path(self) -> Path:
        """The file this rank appends its verdicts to: the cache file itself on rank 0, one of its own elsewhere."""
        return self.path if is_rank_zero() else self.path.with_name(f"{self.path.stem}.rank{rank()}.jsonl")

    def cached(self) -> dict[str, float]:
        """Verdict key -> P(a better), for every verdict this judge has given. A torn last line is skipped."""
        out = {}
        for path in [self.path, *sorted(self.path.parent.glob(f"{self.path.stem}.rank*.jsonl"))]:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "verdict" in row:  # rows of older versions, keyed by snapshot rather than content, are not trusted
                    out[row["verdict"]] = row["p_a"]
        return out

    def judge(self, todo: list[tuple[str, str, dict, dict]]) -> dict[str, float]:
        """Judge (a key, b key, a's row, b's row) comparisons in chunks, appending each to the cache; verdict key -> P(a).

        With several ranks, rank r judges chunks r, r + N, ... into a file of its own; the chunks are
        the same whatever the world size, so the verdicts are a 1-process run's.
        """
        barrier()  # every rank has read the cache and chosen the same todo before anyone appends to it
        path = self.rank_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Other runs with this judge (the jobs of a parallel sweep) append to the same file: one writer at a time.
        lock = FileLock(str(path) + ".lock")
        with lock:
            if path.exists() and path.stat().st_size:
                with path.open("rb+") as f:  # a torn last line: end it, so the next row starts on its own line
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        chunks = chunked(todo, 32)
        for i in tqdm(mine(len(chunks)), desc=f"eval judge ({self.kind})", unit="chunk", disable=not is_rank_zero()):
            ps = self.compare([(ra, rb) for _, _, ra, rb in chunks[i]])
            rows = [
                {"verdict": verdict_key(ra, rb), "a": a, "b": b, "id": ra["id"], "kind": ra["kind"], "p_a": p}
                for (a, b, ra, rb), p in zip(chunks[i], ps)
            ]
            with lock, path.open("a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())
        barrier()
        given = self.cached()
        return {verdict_key(ra, rb): given[verdict_key(ra, rb)] for _, _, ra, rb in todo}


class FeedbackJudge(Judge):
    """The feedback model, asked the axis's fixed question zero-shot, in both orders (debiased)."""

    kind = "feedback"

    def __init__(self, cfg: DictConfig) -> None:
        from cai.labels import engine_identity

        super().__init__(cfg)
        self.spec = instantiate(cfg.feedback_model)
        ident = {"model": self.spec.identity(), "template": COMPARISON_TEMPLATE, "questions": [HARMLESS_QUESTION, HELPFUL_QUESTION]}
        # Verdicts read through vLLM differ from HF's within float tolerance: they get their own cache.
        if (engine := engine_identity(cfg)) is not None:
            ident["engine"] = engine
        self.key = fingerprint({"judge": self.kind, **ident})
        self.identity = f"feedback model {self.spec.name} ({ident['model']}), zero-shot, both orders"
        # It is cfg.feedback_model, the model that labelled the PM's data (unless label=human): judging the
        # policy that PM trained, it measures agreement with itself, not an outside view.
        self.shares = ("labeller",) if cfg.label.kind != "human" else ()
        self._labeller = None

    def compare(self, pairs: list[tuple[dict, dict]]) -> list[float]:
        from cai.labels import Item, labeller_for

        if self._labeller is None:
            self._labeller = labeller_for(self.cfg, self.spec, kind="soft", debias=True, batch_size=self.cfg.label.batch_size)
            self.ran_on = self._labeller.placement()
        items = [Item(conversation(ra), ra["response"], rb["response"], (QUESTIONS[ra["kind"]],)) for ra, rb in pairs]
        return [r["p_a"] for r in self._labeller.label(items, desc="judging")]

    def close(self) -> None:
        if self._labeller is not None:
            self._labeller.close()
            self._labeller = None


class PMJudge(Judge):
    """A preference model: P(a better) = sigmoid(r(a) - r(b))."""

    kind = "pm"

    def __init__(self, cfg: DictConfig, pm_dir: Path, is_reward: bool, identity: str | None = None) -> None:
        super().__init__(cfg)
        self.pm_dir = Path(pm_dir).expanduser()
        # The same weights, the same cache. `identity`: pm_identity(pm_dir), when the caller hashed the weights already.
        self.key = fingerprint({"judge": self.kind, "pm": identity or pm_identity(self.pm_dir)})
        self.is_reward = is_reward
        self.shares = ("reward model",) if is_reward else ()
        self.identity = f"PM {pm_dir}" + (" (this run's own reward model)" if is_reward else "")
        self._pm = None

    def model(self):
        """The (PM, tokenizer) pair, loaded on first use (eval reuses it for the PM scores)."""
        if self._pm is None:
            from cai.reward import PreferenceModel

            self._pm = PreferenceModel.load(self.pm_dir)
            self.ran_on = placement(self._pm[0])
        return self._pm

    def compare(self, pairs: list[tuple[dict, dict]]) -> list[float]:
        from cai.reward import score

        pm, tok = self.model()
        transcripts = [(conversation(ra), r["response"]) for ra, rb in pairs for r in (ra, rb)]
        s = score(pm, tok, transcripts, self.cfg.pm.max_length, self.cfg.pm.batch_size, desc="judging")
        return [1.0 / (1.0 + math.exp(-(s[2 * i] - s[2 * i + 1]))) for i in range(len(pairs))]


def check_arena(cfg: DictConfig) -> None:
    """Before any stage runs (eval, frontier): the judge, and every answer set read and parsed."""
    check_judge(cfg)
    parse_external(cfg)


def check_judge(cfg: DictConfig) -> None:
    """An independent judge (or an explicit choice of the run's own reward model), and a whole judge PM."""
    if cfg.eval.judge not in JUDGES:
        raise CaiError(f"eval.judge: choose one of {', '.join(JUDGES)}, got '{cfg.eval.judge}'")
    if cfg.eval.judge == "pm" and cfg.eval.judge_pm:
        resolve_pm_dir(cfg.eval.judge_pm, field="eval.judge_pm")  # a directory or a hub id
    elif cfg.eval.judge == "pm" and not cfg.eval.judge_own_pm:
        raise CaiError(
            "eval.judge=pm: this run's PM is the reward PPO optimised, so reward hacking would score as progress; "
            "give an independent PM with eval.judge_pm=DIR (e.g. artifacts/pm/latest/model of a label=human run), "
            "or set eval.judge_own_pm=true to accept it (the plot then says so)"
        )


def reward_dir(cfg: DictConfig, pm=None) -> Path | None:
    """The reward model PPO optimised: `ppo.reward_model` if set, else this run's PM (`pm`, its finished stage)."""
    if cfg.ppo.reward_model:
        return resolve_pm_dir(cfg.ppo.reward_model, "ppo.reward_model")
    return pm.model_dir if pm is not None else None


def make_judge(cfg: DictConfig, pm=None) -> Judge:
    """The judge `eval.judge` names. `pm` is this run's finished pm stage (an artifacts.Upstream), for eval.judge_own_pm."""
    check_judge(cfg)
    if cfg.eval.judge == "feedback":
        return FeedbackJudge(cfg)
    reward = reward_dir(cfg, pm)
    if cfg.eval.judge_pm:
        # The same weights as this run's reward model, under another path, are not independent either.
        judge_dir = resolve_pm_dir(cfg.eval.judge_pm, field="eval.judge_pm")
        identity = pm_identity(judge_dir)  # hashes every weight file: once
        is_reward = reward is not None and identity == pm_identity(reward)
        if is_reward and not cfg.eval.judge_own_pm:
            raise CaiError(
                f"eval.judge_pm: '{cfg.eval.judge_pm}' is this run's own PM, the reward PPO optimised; give another PM, or set eval.judge_own_pm=true"
            )
        return PMJudge(cfg, judge_dir, is_reward=is_reward, identity=identity)
    return PMJudge(cfg, reward, is_reward=True)


def judge_quality(cfg: DictConfig, judge: Judge) -> dict[str, dict]:
    """The judge's agreement with human choices, per axis with a check file (eval.judge_check, eval.judge_check_helpful).

    The human comparisons are judged like any pair of answers (through the verdict cache), the
    human-chosen answer as a; agreement counts ties half and comes with its 95% interval.
    """
    out = {}
    for axis, kind, field in (("harmless", "red_team", "judge_check"), ("helpful", "helpful", "judge_check_helpful")):
        if not cfg.eval[field]:
            continue
        comps = read_hh_rlhf(cfg.eval[field], field=f"eval.{field}")[: cfg.eval.judge_check_n or None]
        pairs = []
        for c in comps:
            prompt = json.dumps(c.conversation, ensure_ascii=False)  # the whole conversation decides the verdict
            row = {"id": c.id, "kind": kind, "prompt": prompt, "conversation": c.conversation}
            pairs.append(({**row, "response": c.chosen}, {**row, "response": c.rejected}))
        cached = judge.cached()
        todo = [("human:chosen", "human:rejected", ra, rb) for ra, rb in pairs if verdict_key(ra, rb) not in cached]
        verdicts = {**cached, **(judge.judge(todo) if todo else {})}
        out[axis] = {"data": str(cfg.eval[field]), **human_agreement([verdicts[verdict_key(ra, rb)] for ra, rb in pairs])}
        low, high = out[axis]["interval_95"]
        log.info(
            "judge check (%s): agrees with humans %.1f%% [%.1f, %.1f] on %d comparisons",
            axis,
            100 * out[axis]["agreement"],
            100 * low,
            100 * high,
            len(pairs),
        )
    return out


def quality_note(quality: dict[str, dict]) -> str | None:
    """The plot's corner: the judge's measured agreement with humans, per axis."""
    parts = [
        f"{axis}: {q['agreement']:.0%} [{q['interval_95'][0]:.0%}, {q['interval_95'][1]:.0%}], n={q['comparisons']}"
        for axis, q in quality.items()
    ]
    return "judge vs humans: " + "; ".join(parts) if parts else "judge vs humans: not measured (eval.judge_check=FILE)"


# --- rating ----------------------------------------------------------------------------------------


def verdict_key(ra: dict, rb: dict) -> str:
    """What decides a verdict, within one judge: the axis's question, the prompt and both answers' text.

    Snapshot names are left out on purpose: new answers (another eval.max_new_tokens, other
    sampling, retrained weights) are judged again, and the same two texts are never judged twice.
    """
    question = QUESTIONS[ra["kind"]].question
    return fingerprint({"question": question, "prompt": conversation(ra), "a": ra["response"], "b": rb["response"]})


def outcome(p_a: float) -> float:
    """A verdict as a game result: a win, a loss, or a tie when the judge is exactly undecided."""
    return 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5


def verdicts_for(snaps: Sequence[Snapshot], answers: dict[str, list[dict]], judge: Judge) -> Verdicts:
    """Every pair of snapshots on every prompt (round robin): a tie, the cache, or the judge.

    Verdicts are looked up by content (verdict_key), in either order; the same two texts met by
    several pairs of snapshots are judged once.
    """
    keys = [s.key for s in snaps]
    cached = judge.cached()
    verdicts: Verdicts = {}
    waiting: dict[str, list[tuple[tuple[str, str, str], bool]]] = {}  # verdict key -> (pair, flipped) waiting on it
    todo = []
    by_id = {k: {r["id"]: r for r in answers[k]} for k in keys}
    for i in range(len(snaps)):
        for j in range(i + 1, len(snaps)):
            shared = [(ra, by_id[keys[j]][ra["id"]]) for ra in answers[keys[i]] if ra["id"] in by_id[keys[j]]]  # prompts both answered
            for ra, rb in shared:
                pair, forward, backward = (keys[i], keys[j], ra["id"]), verdict_key(ra, rb), verdict_key(rb, ra)
                if ra["response"].strip() == rb["response"].strip():
                    verdicts[pair] = 0.5  # the same answer: a tie, no question needed
                elif forward in cached or backward in cached:
                    verdicts[pair] = cached[forward] if forward in cached else 1.0 - cached[backward]
                elif backward in waiting:
                    waiting[backward].append((pair, True))
                else:
                    if forward not in waiting:
                        todo.append((keys[i], keys[j], ra, rb))
                    waiting.setdefault(forward, []).append((pair, False))
    # Prompt by prompt: a prompt's questions start alike, and the judge runs a batch's common prefix once.
    todo.sort(key=lambda t: (str(t[2]["kind"]), t[2]["id"]))
    log.info(
        "eval: %d comparisons, %d cached or tied, %d to judge", len(verdicts) + sum(map(len, waiting.values())), len(verdicts), len(todo)
    )
    judged = judge.judge(todo) if todo else {}
    for vkey, pairs in waiting.items():
        for pair, flipped in pairs:
            verdicts[pair] = 1.0 - judged[vkey] if flipped else judged[vkey]
    return verdicts


def rate(cfg: DictConfig, snaps: Sequence[Snapshot], answers: dict[str, list[dict]], judge: Judge) -> tuple[dict, list[list]]:
    """Judge every pair of snapshots on every prompt and fit the Elo of each axis.

    Returns {axis: {key: (elo, low, high)}, 'games': {axis: n}} and the judgement table rows.
    """
    keys = [s.key for s in snaps]
    verdicts = verdicts_for(snaps, answers, judge)
    kind_of = {r["id"]: r["kind"] for k in keys for r in answers[k]}
    index = {k: n for n, k in enumerate(keys)}
    result: dict = {"games": {}}
    for kind, axis in AXES.items():
        games = [(index[a], index[b], outcome(p), pid) for (a, b, pid), p in verdicts.items() if kind_of[pid] == kind]
        if not games:  # e.g. answer sets of helpfulness prompts only: that axis is not measured
            log.warning("no %s prompts were compared: the %s axis is not measured", kind, axis)
            result[axis] = {k: (math.nan, math.nan, math.nan) for k in keys}
            result["games"][axis] = 0
            continue
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
    snaps: Sequence[Snapshot],
    ratings: dict,
    metrics: dict[str, dict],
    runs: dict[str, list[str]],
    out: Path,
    title: str,
    judge: dict,
) -> list[dict]:
    """Write elo.json (with the judge's identity and measured quality) and frontier.png; return the per-snapshot rows."""
    rows = []
    for s in snaps:
        row = {**asdict(s)}
        for axis in AXES.values():
            row[f"{axis}_elo"], row[f"{axis}_low"], row[f"{axis}_high"] = ratings[axis][s.key]
        row.update(metrics.get(s.key, {}))
        rows.append(row)
    write_json(out / "elo.json", {"snapshots": rows, "runs": runs, "games": ratings["games"], "anchor": snaps[0].key, "judge": judge})
    if judge.get("shares"):
        title += f"\njudge not independent: it is this run's {' and '.join(judge['shares'])}"
    plot_frontier(rows, runs, out / "frontier.png", title, note=quality_note(judge.get("quality", {})))
    return rows


def log_results(tracker, prefix: str, rows: list[dict], table: list[list], out: Path) -> None:
    """Per-snapshot scalars `<prefix>/<snapshot>/<name>`, the judgement table and the frontier plot."""
    for r in rows:
        tracker.log({f"{prefix}/{r['label']}/{k}": r[k] for k in r if isinstance(r[k], float)})
    tracker.table(f"{prefix}/judgements", ["kind", "prompt", "snapshot_a", "snapshot_b", "answer_a", "answer_b", "p_a", "score_a"], table)
    tracker.image(f"{prefix}/frontier", out / "frontier.png")
