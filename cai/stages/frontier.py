"""Stage `frontier`: one Elo fit and one plot across several runs (the paper's comparison figure).

    python train.py -m label=hard,soft,cot                 # three runs (the frontier follows by itself)
    python train.py stage=frontier                         # every evaluated run under ${paths.artifacts}
    python train.py stage=frontier 'eval.runs=[multirun/2026-11-23/12-00-00]'   # only these runs

Each entry of `eval.runs` is an eval directory (holding elo.json), a run's output or multirun
directory (searched for the `eval.json` pointer every eval writes), or an artifact root (searched for
eval directories). The runs' snapshots are merged, the same snapshot seen by several runs (the
initial model, a shared SFT model) being one player; every pair not judged yet is judged with this
config's judge (`eval.judge`), and one Elo fit per axis gives one frontier. The runs must have been
evaluated on the same prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from cai.arena import Snapshot, check_arena, external_players, judge_quality, log_results, make_judge, rate, report
from cai.artifacts import StageDir, fingerprint, read_jsonl
from cai.errors import CaiError
from cai.stages import Context, Stage

log = logging.getLogger(__name__)


def _complete_eval(path: Path) -> bool:
    m = path / "manifest.json"
    if not (path / "elo.json").exists() or not m.exists() or ".stale-" in str(path):
        return False
    manifest = json.loads(m.read_text())
    return manifest.get("stage") == "eval" and manifest.get("status") == "complete"


def find_evals(cfg: DictConfig) -> dict[Path, str | None]:
    """The complete eval directories named by eval.runs (default: all under ${paths.artifacts}/eval).

    Maps each to the run name its pointer gives (the name of the run that pointed at it), or None.
    """
    entries = list(cfg.eval.runs) or [str(Path(cfg.paths.artifacts) / "eval")]
    found: dict[Path, str | None] = {}
    for entry in entries:
        p = Path(entry).expanduser()
        if not p.exists() and cfg.eval.runs:
            raise CaiError(f"eval.runs: '{entry}' does not exist; give eval directories, run output directories or artifact roots")
        if not p.exists():
            continue
        candidates: list[tuple[Path, str | None]] = [(p, None)] if (p / "elo.json").exists() else []
        for pointer in sorted(p.rglob("eval.json")):
            data = json.loads(pointer.read_text())
            candidates.append((Path(data["eval_dir"]), data.get("run")))
        candidates += [(e.parent, None) for e in sorted(p.rglob("elo.json")) if e.parent.parent.name == "eval"]
        for path, name in candidates:
            if _complete_eval(path):
                key = path.resolve()
                found[key] = found.get(key) or name
    if not found and not cfg.eval.external:
        raise CaiError(
            f"eval.runs: no finished evaluation under {', '.join(entries)}; run `python train.py` (stage=all) or stage=eval first"
        )
    return found


def short_names(names: list[str]) -> list[str]:
    """Run names made of overrides, without the overrides every run shares: 'label=hard,model=tiny' -> 'label=hard'."""
    parts = [n.split(",") for n in names]
    common = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    return [",".join(x for x in p if x not in common) or n for p, n in zip(parts, names)]


def merge_runs(found: dict[Path, str | None]) -> tuple[dict[str, Snapshot], dict[str, dict], dict[str, list[str]]]:
    """One player per snapshot key across the runs (a snapshot of one run only is labelled with its name),
    their absolute metrics, and each run's line (its snapshots in order); other systems' sets are points."""
    evals = list(found)
    manifests = [json.loads((e / "manifest.json").read_text()) for e in evals]
    players: dict[str, Snapshot] = {}
    metrics: dict[str, dict] = {}
    runs: dict[str, list[str]] = {}
    seen_in: dict[str, int] = {}
    names = short_names([found[e] or m.get("run") or e.name for m, e in zip(manifests, evals)])
    for e, name in zip(evals, names):
        while name in runs:
            name += "'"
        data = json.loads((e / "elo.json").read_text())
        runs[name] = [s["key"] for s in data["snapshots"] if s["order"] >= 0]
        runs.update({s["label"]: [s["key"]] for s in data["snapshots"] if s["order"] < 0})  # external answer sets
        for s in data["snapshots"]:
            seen_in[s["key"]] = seen_in.get(s["key"], 0) + 1
            if s["key"] not in players:
                players[s["key"]] = Snapshot(s["key"], s["label"], s["order"], s["model"], s["answers"])
                metrics[s["key"]] = {k: s[k] for k in ("refusal_rate", "boilerplate_rate", "mean_length", "pm_score") if k in s}
                if not Path(s["answers"]).exists():
                    raise CaiError(f"eval.runs: the answers of {name}/{s['label']} ({s['answers']}) are gone; re-run that run's eval stage")
    for name, keys in runs.items():
        for k in keys:
            if seen_in[k] == 1 and players[k].order > 0:
                players[k].label = f"{name}/{players[k].label}"
    return players, metrics, runs


def build(ctx: Context) -> dict:
    cfg, tracker = ctx.cfg, ctx.tracker
    found = find_evals(cfg)
    manifests = [json.loads((e / "manifest.json").read_text()) for e in found]
    if len({m["inputs"]["prompts"] for m in manifests}) > 1:
        raise CaiError(
            "eval.runs: these runs were evaluated on different prompts (eval.n_red_team, eval.n_helpful or data.*); "
            f"re-run their eval stage with the same settings: {', '.join(str(e) for e in found)}"
        )
    players, metrics, runs = merge_runs(found)
    answers = {k: read_jsonl(Path(s.answers)) for k, s in players.items()}
    prompts = list({r["id"]: r for rows in answers.values() for r in rows}.values())
    externals, external_answers = external_players(cfg, prompts, own_prompts=True)
    for s in externals:
        players[s.key], answers[s.key], runs[s.label] = s, external_answers[s.key], [s.key]
        metrics[s.key] = {}
    # The anchor (Elo 0): an initial model, ideally shared by all runs; with answer sets alone, the first of them.
    anchor = next((k for k, s in players.items() if s.order == 0), next(iter(players)))
    snaps = [players[anchor]] + [s for k, s in players.items() if k != anchor]
    judge = make_judge(cfg, ctx.upstream.get("pm"))
    judge_info = {**judge.describe(), "quality": judge_quality(cfg, judge)}
    inputs = {"evals": sorted(m["fingerprint"] for m in manifests), "players": sorted(players), "judge": judge.key}
    path = Path(cfg.paths.artifacts).expanduser() / "frontier" / fingerprint(inputs)  # one directory per set of players and judge
    out = StageDir("frontier", path, {"bootstrap": cfg.eval.bootstrap, "seed": cfg.seed}, inputs).open()
    ratings, table = rate(cfg, snaps, answers, judge)
    title = f"{len(runs)} runs and answer sets: Elo (judge: {judge.identity})"
    rows = report(snaps, ratings, metrics, runs, out.path, title, judge_info)
    log_results(tracker, "frontier", rows, table, out.path)
    out.complete({"runs": len(runs), "snapshots": len(snaps), **ratings["games"]}, {"evals": [str(e) for e in found]})
    log.info("frontier of %d runs: %s", len(runs), out.path / "frontier.png")
    caveat = f" ({judge.caveat()})" if judge.caveat() else ""
    return {"metric": f"{len(runs)} runs, {len(snaps)} snapshots{caveat}", "path": str(out.path / "frontier.png")}


STAGE = Stage(
    name="frontier",
    writes="`elo.json` and `frontier.png` over every run given (`eval.runs`) or every job of a multirun",
    description="the cross-run Elo frontier",
    build=build,
    reads=lambda cfg: ("pm",) if cfg.eval.judge == "pm" and not cfg.eval.judge_pm else (),  # the run's own PM as judge
    check=check_arena,
    keyed=False,
)
