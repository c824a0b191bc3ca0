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

import contextlib
import json
import logging
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig

from cai.arena import Snapshot, check_arena, external_players, judge_quality, log_results, make_judge, rate, report
from cai.artifacts import StageDir, fingerprint, read_jsonl, write_json
from cai.distributed import all_gather, is_rank_zero
from cai.errors import CaiError
from cai.stages import Context, Stage

log = logging.getLogger(__name__)


def complete_eval(path: Path) -> bool:
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
            if complete_eval(path):
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


def draw(
    ctx: Context, found: dict[Path, str | None], reuse: bool = False
) -> tuple[Path, list[dict], list[list], dict[str, list[str]], dict]:
    """One Elo fit over the snapshots of the evaluations `found`, judged by this config's judge.

    Returns the frontier's directory (elo.json, frontier.png), its rows, the verdict table, each
    run's snapshot keys and the judge's description (with its measured quality). Every rank judges
    its share; rank 0 alone writes (the others get no rows). reuse: a frontier of these very players
    and judge drawn before is read back, not fitted again (its verdict table is not returned then).
    """
    cfg = ctx.cfg
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
    judge_info = {**judge.describe(), "quality": judge_quality(cfg, judge), "caveat": judge.caveat()}
    inputs = {"evals": sorted(m["fingerprint"] for m in manifests), "players": sorted(players), "judge": judge.key}
    path = Path(cfg.paths.artifacts).expanduser() / "frontier" / fingerprint(inputs)  # one directory per set of players and judge
    out = StageDir("frontier", path, {"bootstrap": cfg.eval.bootstrap, "seed": cfg.seed}, inputs)
    if reuse and all_gather(out.is_complete())[0]:
        elo = json.loads((path / "elo.json").read_text())
        return path, elo["snapshots"], [], elo["runs"], judge_info
    if is_rank_zero():
        out.open()
    ratings, table = rate(cfg, snaps, answers, judge)
    judge.close()
    if not is_rank_zero():
        return path, [], table, runs, judge_info
    title = f"{len(runs)} runs and answer sets: Elo (judge: {judge.identity})"
    rows = report(snaps, ratings, metrics, runs, out.path, title, judge_info)
    out.complete({"runs": len(runs), "snapshots": len(snaps), **ratings["games"]}, {"evals": [str(e) for e in found]})
    return out.path, rows, table, runs, judge_info


def build(ctx: Context) -> dict:
    found = find_evals(ctx.cfg)
    path, rows, table, runs, judge = draw(ctx, found)
    if not is_rank_zero():
        return {}
    log_results(ctx.tracker, "frontier", rows, table, path)
    log.info("frontier of %d runs: %s", len(runs), path / "frontier.png")
    caveat = f" ({judge['caveat']})" if judge["caveat"] else ""
    return {"metric": f"{len(runs)} runs, {len(rows)} snapshots{caveat}", "path": str(path / "frontier.png")}


# --- the group's frontier: refreshed by every run of a multirun or sweep as its evaluation finishes ---


GROUP_COLUMNS = [
    "run", "snapshot", "harmless_elo", "harmless_low", "harmless_high", "helpful_elo", "helpful_low", "helpful_high",
    "refusal_rate", "boilerplate_rate", "judge", "judge_harmless_agreement", "judge_helpful_agreement",
]  # fmt: skip


def group_dir(cfg: DictConfig, group: str) -> Path:
    """`${paths.artifacts}/groups/<group>`: which evaluations belong to the group, one file each."""
    return Path(cfg.paths.artifacts).expanduser() / "groups" / group.replace("/", "-")


def join_group(cfg: DictConfig, group: str, eval_dir: Path, run_name: str) -> None:
    """Enter this run's evaluation in its group (once per evaluation: a rerun of the same config replaces its entry)."""
    entry = group_dir(cfg, group) / f"{fingerprint(str(eval_dir.resolve()))}.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    write_json(entry, {"eval_dir": str(eval_dir.resolve()), "run": run_name})


def group_evals(cfg: DictConfig, group: str) -> dict[Path, str | None]:
    """The group's finished evaluations, each with its run's name."""
    found: dict[Path, str | None] = {}
    for entry in sorted(group_dir(cfg, group).glob("*.json")):
        data = json.loads(entry.read_text())
        if complete_eval(Path(data["eval_dir"])):
            found[Path(data["eval_dir"])] = data["run"]
    return found


def one_judge(found: dict[Path, str | None], group: str) -> None:
    """The group's runs were all judged by one judge, or one line naming the fields that make it so."""
    judges: dict[str, tuple[str, list[str]]] = {}  # key -> (identity, runs)
    for e, name in found.items():
        judge = json.loads((e / "elo.json").read_text())["judge"]
        judges.setdefault(judge["key"], (judge.get("identity") or judge["key"], []))[1].append(name or e.name)
    if len(judges) > 1:
        which = "; ".join(f"{identity}: {', '.join(names)}" for identity, names in judges.values())
        raise CaiError(
            f"group {group}: its runs were judged by different judges ({which}), so their Elos are not on one scale; "
            "set eval.judge=pm with eval.judge_pm=DIR (one PM that judges every run), or one feedback model "
            "for every run (model@feedback_model=...), then run the sweep again"
        )


def refresh_group(ctx: Context, group: str, eval_dir: Path, run_name: str) -> Path:
    """Redraw the group's frontier over every finished run in it, and log it to this run as
    `frontier/group/table` and `frontier/group/plot`, so a W&B panel of the group shows the sweep's
    frontier while it runs. Runs finishing at once take turns (a lock, held by rank 0 while every rank
    judges its share); verdicts already given are reused, and a frontier already drawn is read back.
    """
    if is_rank_zero():
        join_group(ctx.cfg, group, eval_dir, run_name)
    with FileLock(str(group_dir(ctx.cfg, group)) + ".lock") if is_rank_zero() else contextlib.nullcontext():
        found = all_gather(group_evals(ctx.cfg, group) if is_rank_zero() else None)[0]  # rank 0's view, for every rank
        one_judge(found, group)
        path, rows, _, runs, judge = draw(ctx, found, reuse=True)
    if not is_rank_zero():
        return path
    quality = judge.get("quality", {})
    agreement = [quality.get(axis, {}).get("agreement") for axis in ("harmless", "helpful")]
    table = []
    for r in rows:
        in_runs = ", ".join(name for name, keys in runs.items() if r["key"] in keys)
        table.append([in_runs, r["label"], *(r.get(c) for c in GROUP_COLUMNS[2:10]), judge["identity"], *agreement])
    ctx.tracker.table("frontier/group/table", GROUP_COLUMNS, table)
    ctx.tracker.image("frontier/group/plot", path / "frontier.png")
    ctx.tracker.summary({"frontier/group/runs": len(found), "frontier/group/path": str(path)})
    log.info("group %s: frontier of %d runs, %d snapshots: %s", group, len(found), len(rows), path / "frontier.png")
    return path


STAGE = Stage(
    name="frontier",
    writes="`elo.json` and `frontier.png` over every run given (`eval.runs`) or every job of a multirun",
    description="the cross-run Elo frontier",
    build=build,
    reads=lambda cfg: ("pm",) if cfg.eval.judge == "pm" and not cfg.eval.judge_pm else (),  # the run's own PM as judge
    check=check_arena,
    keyed=False,
)
