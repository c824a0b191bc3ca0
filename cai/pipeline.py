"""Runs the stages in order. Stages hand off through artifacts on disk, never through memory.

The method's order is declared once, in PIPELINE. For each stage the pipeline does the same steps,
here and nowhere else:
  require   the stages it reads must be complete and undamaged (else: which stage to run, with which overrides);
  key       its directory is `${paths.artifacts}/<stage>/<lineage key>`: a hash of the config fields
            it and every stage before it read, so runs that differ in one axis share what is upstream;
  skip      a complete manifest whose fingerprint matches (the same fields, the same input content)
            means there is nothing to do;
  open      otherwise the directory is opened (a partial one resumes, a stale one is moved aside);
  build     the stage's own work (cai/stages/<name>.py), which returns its counts;
  complete  the manifest is marked complete and `latest` points at it; the W&B artifact and the
            summary row follow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

import cai
from cai import memory
from cai.artifacts import StageDir, Upstream, code_version, damage, fingerprint, read_manifest
from cai.cards import write_cards
from cai.config import check_ranges, instantiate
from cai.data import load_prompts, read_hh_rlhf
from cai.distributed import all_gather, barrier, is_rank_zero, launch, world
from cai.errors import CaiError, Interrupted, check_choice, disk_full
from cai.labels import ASKS, REDUCES, check_engine, check_options
from cai.lora import check as check_peft
from cai.models import use_accelerator
from cai.reward import check_pm_dir
from cai.stages import Context, Stage, eval, frontier, label, label_report, pairs, pm, pm_eval, ppo, sft, sl_data
from cai.tracking import Tracker, sweep_context
from cai.training import check_trainer, drop_checkpoints, resolve_precision
from cai.usage import bound_heap, including_earlier, measure

log = logging.getLogger(__name__)

# The method's order (Bai et al., 2022): SL-CAI data, SFT, pairs, AI labels, PM, PPO, evaluation.
PIPELINE: tuple[Stage, ...] = (sl_data.STAGE, sft.STAGE, pairs.STAGE, label.STAGE, pm.STAGE, ppo.STAGE, eval.STAGE)
# Commands over existing artifacts, run only when asked for by name.
COMMANDS: tuple[Stage, ...] = (pm_eval.STAGE, frontier.STAGE, label_report.STAGE)
BY_NAME: dict[str, Stage] = {s.name: s for s in PIPELINE + COMMANDS}
STAGES = tuple(s.name for s in PIPELINE)
# Where converted models are kept changes nothing they compute.
NOT_LINEAGE = ("model.cache", "feedback_model.cache", "pm_model.cache")


def stages_for(name: str) -> tuple[str, ...]:
    """The stages that `stage=name` runs."""
    if name in ("all", "check"):  # check: stage=all's checks, then stop
        return STAGES
    if name in BY_NAME:
        return (name,)
    raise CaiError(f"stage.name: unknown stage '{name}'; choose one of all, check, {', '.join(BY_NAME)}")


# --- lineage ---------------------------------------------------------------------------------------


def lineage_config(cfg: DictConfig, name: str) -> dict:
    """The config fields that decide `name`'s output, without its logging-only fields."""
    stage = BY_NAME[name]
    skip = set(NOT_LINEAGE) | set(stage.logging_only)
    picked = {}
    for field in stage.lineage:
        node = OmegaConf.select(cfg, field)
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if isinstance(value, dict):
            # An unset Trainer argument (None) is Lightning's default: left out, so adding one moves no key.
            value = {k: v for k, v in value.items() if f"{field}.{k}" not in skip and not (field == "trainer" and v is None)}
        picked[field] = value
    return picked


def _blob(picked: dict) -> str:
    # Files shipped with cai are named relative to where they live, so moving the checkout, or running
    # from a wheel instead, keeps the keys (their contents are hashed into each stage's fingerprint anyway).
    blob = json.dumps(picked, sort_keys=True, default=str)
    return blob.replace(str(cai.CONSTITUTIONS), "<constitutions>").replace(str(cai.PACKAGE), "<cai>/cai").replace(str(cai.ROOT), "<cai>")


def lineage_key(cfg: DictConfig, name: str) -> str:
    """A hash of the config that `name` and everything upstream of it depend on."""
    after = BY_NAME[name].after
    blob = _blob(lineage_config(cfg, name))
    return fingerprint({"stage": name, "config": blob, "upstream": lineage_key(cfg, after) if after else None})


def stage_path(cfg: DictConfig, name: str) -> Path:
    """`${paths.artifacts}/<stage>/<lineage key>`: where this config's output of `name` lives."""
    return Path(cfg.paths.artifacts).expanduser() / name / lineage_key(cfg, name)


def require(cfg: DictConfig, name: str, needed_by: str) -> Upstream:
    """This config's finished output of stage `name`, or a clear error saying which stage to run first."""
    path = stage_path(cfg, name)
    manifest = path / "manifest.json"
    rerun = f"`python train.py stage={name}` with the same overrides as this run"
    if not manifest.exists():
        raise CaiError(f"stage '{needed_by}' needs the output of stage '{name}' under {path}; run {rerun} first (or stage=all)")
    m = read_manifest(manifest)
    if m is None:
        raise CaiError(
            f"{manifest}: the manifest is torn or not a JSON object; re-run {rerun} (it moves the directory aside and redoes it)"
        )
    if m.get("status") != "complete":
        raise CaiError(f"stage '{name}' under {path} did not finish; re-run {rerun} to resume it")
    if m.get("code") != code_version():
        made_by = f"cai {m['code']}" if m.get("code") else "a version of cai that recorded none"
        if not cfg.allow_other_code:
            raise CaiError(
                f"stage '{name}' under {path} was computed by {made_by}, not by this code ({code_version()}); "
                f"re-run {rerun} to redo it, or set allow_other_code=true to use it anyway"
            )
        log.warning(
            "%s: using %s, computed by %s, not by this code (%s), because allow_other_code=true", needed_by, path, made_by, code_version()
        )
    if problem := damage(path, m):  # nothing damaged is read: a deleted shard, a dropped line, a changed weight file
        raise CaiError(f"stage '{name}' is damaged: {problem}; re-run {rerun} (it moves the damaged directory aside and redoes it)")
    return Upstream(name, path, m)


def stage_inputs(cfg: DictConfig, stage: Stage, upstream: dict[str, Upstream]) -> dict:
    """What a stage's output depends on beyond its config fields, for its fingerprint: the upstream
    stages (their fingerprints and the digests of what they wrote), the models it names (by content),
    its own inputs (prompt files, the constitution, ...), and for a training stage how it trains here.

    How it trains is in the fingerprint, not the lineage key: a PM trained in float32 on a CPU is not
    up to date for a bf16 GPU run or a 4-rank ZeRO-3 one (it is redone there, the old one moved
    aside), while a later stage run on its own under another strategy still finds it.
    """
    inputs = {n: {"fingerprint": u.fingerprint, "output": u.output_digest} for n, u in upstream.items()}
    if models := model_identities(cfg, stage):
        inputs["models"] = models
    if "trainer" in stage.lineage:  # precision as 'auto' resolves on this machine; the strategy; the ranks
        strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
        inputs["training"] = {"precision": resolve_precision(cfg.trainer.precision), "strategy": strategy, "ranks": world()}
    return {**inputs, **stage.inputs(cfg)}


def model_identities(cfg: DictConfig, stage: Stage) -> dict:
    """The models a stage's lineage names, by content: the weights' digest of a local directory, the
    resolved commit of a hub model, the embedded file's digest (a path or a hub id alone says nothing
    of what is there now)."""
    sections = [s for s in ("model", "feedback_model", "pm_model") if any(f == s or f.startswith(s + ".") for f in stage.lineage)]
    return {s: instantiate(cfg[s]).identity() for s in sections}


# --- running ---------------------------------------------------------------------------------------


def run_stage(stage: Stage, cfg: DictConfig, tracker: Tracker) -> dict:
    """Require, fingerprint, skip or open, build, complete, log: the one skeleton every stage runs in."""
    upstream = {n: require(cfg, n, stage.name) for n in stage.upstream_of(cfg)}
    if not stage.keyed:  # a command over finished artifacts: rank 0 does it, the others wait
        result = stage.build(Context(cfg, tracker, None, upstream)) if is_rank_zero() else {}
        barrier()
        return result
    # The fingerprint reads exactly the fields the lineage key reads, plus the content of the inputs.
    config = json.loads(_blob(lineage_config(cfg, stage.name)))
    out = StageDir(
        stage.name, stage_path(cfg, stage.name), config, stage_inputs(cfg, stage, upstream), allow_other_code=cfg.allow_other_code
    )
    with stage_lock(out.path):
        return _run_locked(stage, out, Context(cfg, tracker, out, upstream))


@contextlib.contextmanager
def stage_lock(path: Path):
    """One writer per stage directory: a second run of the same stage waits, then finds it complete.

    Only the process of global rank 0 takes it: under DDP the other ranks are launched from inside
    rank 0's stage, which holds the lock.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("%s is being written by another run; waiting for it to finish", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _run_locked(stage: Stage, out: StageDir, ctx: Context) -> dict:
    """Skip, or open, build and complete, under the stage lock.

    With several ranks every rank builds (each does its share), and rank 0 alone opens, completes
    and announces; rank 0's view of the directory decides for all, and barriers keep them in step.
    """
    tracker = ctx.tracker
    summary = {"path": str(out.path / stage.output)}
    if all_gather(out.is_complete())[0]:
        log.info("%s: up to date at %s, skipping", stage.name, out.path)
        ctx.extra = out.manifest()
        summary["metric"] = f"{stage.metric(ctx.extra['counts'])} (cached)"
        summary["cached"] = True
        declare_use(tracker, stage.name, out.path)
    else:
        if is_rank_zero():
            out.open()
        barrier()
        with measure() as usage:
            counts = stage.build(ctx)
        usage = including_earlier(usage, out.earlier)  # a resumed stage: the whole job's time and tokens
        ctx.extra["usage"] = usage  # time, tokens and peak memory: benchmarks/bench_main.py prints them
        log.info("%s: %s", stage.name, ", ".join(f"{k} {v}" for k, v in usage.items()))
        publish = is_rank_zero() and counts is not None
        if publish:
            write_cards(stage.name, out.path, out.config, out.inputs, counts, base_model(ctx.cfg, stage.name))
            out.complete(counts, ctx.extra)
            drop_checkpoints(out.path)  # Lightning's checkpoints only served to resume the stage
            for up in ctx.upstream.values():
                declare_use(tracker, up.stage, up.path)
            if stage.artifact:
                name, kind, inside = stage.artifact
                tracker.artifact(out.path / inside, name=f"{name}-{out.path.name}", type=kind)  # one name per lineage
        barrier()
        if not publish:  # a rank other than 0: rank 0 publishes and reports
            return {**summary, "metric": ""}
        summary["metric"] = stage.metric(counts)
    summary["ran_on"] = ran_on(ctx.extra.get("models"))
    if stage.announce and is_rank_zero():
        stage.announce(ctx)
    return summary


def base_model(cfg: DictConfig, name: str) -> str:
    """What a stage's model starts from, for its model card."""
    if name == "ppo":
        return cfg.ppo.policy or f"this run's SL-CAI policy, artifacts/sft/{lineage_key(cfg, 'sft')}/model"
    spec = cfg.pm_model if name == "pm" else cfg.model
    return f"{spec.name} ({spec.source}{': ' + spec.name_or_path if spec.name_or_path else ''})"


def declare_use(tracker: Tracker, name: str, path: Path) -> None:
    """Declare a finished stage's artifact (named with its lineage key) as an input of this run."""
    if BY_NAME[name].artifact and is_rank_zero():
        art, kind, inside = BY_NAME[name].artifact
        tracker.use(path / inside, name=f"{art}-{path.name}", type=kind)


def ran_on(models: dict | None) -> str:
    """Where a stage's models ran: 'cuda:0 bfloat16', or per group ('cuda:0 float32: actor, critic; ...'), then the precision.

    Weights stored narrower than they compute (PPO's frozen ref and reward on a CPU) read 'cpu bfloat16 weights in float32'.
    """
    if not models:
        return ""
    groups: dict[str, list[str]] = {}
    for name, m in models.items():
        compute = f" weights in {m['compute_dtype']}" if m.get("compute_dtype") else ""
        groups.setdefault(f"{m['device']} {m['dtype']}{compute}", []).append(name)
    text = next(iter(groups)) if len(groups) == 1 else "; ".join(f"{w}: {', '.join(names)}" for w, names in groups.items())
    precision = sorted({m["precision"] for m in models.values() if m.get("precision")})
    return text + (f" ({', '.join(precision)})" if precision else "")


LABEL_KINDS = ("hard", "soft", "cot", "likelihood", "contrastive", "human")


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CaiError(
            f"paths.artifacts: cannot write to '{root}' ({err.strerror}); set paths.artifacts or CAI_ROOT to a writable directory"
        ) from None


def check_models(cfg: DictConfig) -> None:
    """The policy is a real model; every model's source, path, dtype and shape are valid and its weight files open."""
    try:
        OmegaConf.to_container(cfg.model, resolve=True)
    except InterpolationResolutionError:
        raise CaiError(
            "model: 'policy' is an option for model@feedback_model= and model@pm_model= (follow the policy); give the policy a real model"
        ) from None
    for key in ("model", "feedback_model", "pm_model"):
        instantiate(cfg[key]).check_weights()  # the spec checks its fields when it is built


def validate(cfg: DictConfig, names: tuple[str, ...]) -> None:
    """Check the inputs every stage relies on before any model loads, so bad input costs nothing.

    Ranges of every count, size, rate and fraction; every input file named by the config, opened and
    parsed; the artifacts root writable; then each selected stage's own checks.
    """
    for field, value in cfg.paths.items():  # '' would put artifacts or the cache in the current directory
        if value is not None and not str(value).strip():
            raise CaiError(f"paths.{field}: is empty; set it to a directory (or unset it for the default under paths.root)")
    check_ranges(cfg)
    check_objective(cfg)
    check_models(cfg)
    instantiate(cfg.constitution)  # loads and validates every principle and example
    if cfg.label.kind not in LABEL_KINDS:
        raise CaiError(f"label.kind: unknown label type '{cfg.label.kind}'; choose one of {', '.join(LABEL_KINDS)}")
    check_options(cfg.label)  # raises one clear line before any model loads
    check_engine(cfg)
    check_choice("label.ask", cfg.label.ask, ASKS)
    check_choice("label.reduce", cfg.label.reduce, REDUCES)
    if cfg.label.clamp_low > cfg.label.clamp_high:
        raise CaiError(f"label.clamp_low/clamp_high: need 0 <= low <= high <= 1, got [{cfg.label.clamp_low}, {cfg.label.clamp_high}]")
    if cfg.label.kind == "human" and not cfg.label.data:
        raise CaiError("label.data: label=human needs an hh-rlhf-format file, e.g. label.data=path/to/harmless-base.jsonl.gz")
    load_prompts("red_team", cfg.data.red_team, "train", cfg.data.n_red_team, cfg.seed)
    load_prompts("helpful", cfg.data.helpful, "train", cfg.data.n_helpful, cfg.seed)
    comparison_files = (
        "label.data",
        "label.report_data",
        "pm.helpful_data",
        "pm.eval_data",
        "eval.judge_check",
        "eval.judge_check_helpful",
    )
    for field in comparison_files:  # every comparison file, parsed
        if path := OmegaConf.select(cfg, field):
            try:
                read_hh_rlhf(path, field=field)
            except CaiError as err:
                raise CaiError(str(err) if str(err).startswith(field) else f"{field}: {err}") from None
    if cfg.pm.checkpoint:
        check_pm_dir(cfg.pm.checkpoint)
    check_writable(Path(cfg.paths.artifacts).expanduser())
    instantiate(cfg.strategy)
    check_peft(cfg)
    check_trainer(cfg)  # Lightning's own rules for every trainer.* set (here: it sees this machine's accelerators)
    if cfg.strategy.name == "deepspeed" and (cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()):
        raise CaiError(
            "strategy: DeepSpeed runs only on CUDA GPUs (Lightning's DeepSpeedStrategy), and this run has none; "
            "use strategy=ddp (several CPU processes) or strategy=auto"
        )
    for name in names:
        if BY_NAME[name].check:
            BY_NAME[name].check(cfg)
    memory.check(cfg, tuple(n for n in names if BY_NAME[n].keyed))  # last: the plan reads what the checks above made sure of
    check_sweep(cfg, names)


def check_sweep(cfg: DictConfig, names: tuple[str, ...]) -> None:
    """In a multirun or sweep: warn when the runs would have different judges, and refuse an objective no run gives."""
    group, varying = sweep_context()
    if "eval" in names and (varied := judge_varies(cfg, varying or [])):
        log.warning(
            "this sweep varies %s, which gives each run its own judge: the group's frontier will not be drawn (Elos on "
            "different scales). Set eval.judge=pm with eval.judge_pm=DIR (one PM judges every run), or fix the judge's "
            "model for every run (model@feedback_model=...)",
            ", ".join(varied),
        )
    if group and cfg.objective is not None and "eval" not in names and sweeper_needs_values():
        raise CaiError(
            f"objective: this sweeper optimises '{cfg.objective}', which only the eval stage gives; run stage=all or stage=eval "
            "in each trial"
        )


def sweeper_needs_values() -> bool:
    """True under a Hydra sweeper that optimises what each job returns (Optuna, Nevergrad, Ax), not the basic grid."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return "BasicSweeper" not in str(HydraConfig.get().sweeper.get("_target_", "BasicSweeper"))
    except (ImportError, ValueError):
        return False


def judge_varies(cfg: DictConfig, varying: list[str]) -> list[str]:
    """The keys a multirun or sweep varies (`label`, `model.dtype`, `model@feedback_model`) that decide its judge."""
    if cfg.eval.judge == "feedback":
        fields = ["feedback_model"]
        if str(OmegaConf.to_container(cfg.feedback_model)["name_or_path"]).startswith("${model."):
            fields.append("model")  # the labeller follows the policy (model@feedback_model=policy)
    elif cfg.eval.judge_pm:
        fields = ["eval.judge_pm"]
    else:  # each run's own PM: everything its lineage reads
        fields, stage = ["seed"], "pm"
        while stage:
            fields, stage = fields + list(BY_NAME[stage].lineage), BY_NAME[stage].after
    fields.append("eval.judge")

    def decides(key: str) -> bool:
        key = key.split("@")[-1]  # model@feedback_model -> feedback_model
        return any(key == f or key.startswith(f + ".") or f.startswith(key + ".") for f in fields)

    return [k for k in varying if decides(k)]


def run(cfg: DictConfig) -> list[dict]:
    """Run the stages that cfg.stage.name selects, in order, and return one summary per stage."""
    names = stages_for(cfg.stage.name)
    validate(cfg, names)
    if cfg.stage.name == "check":
        print(f"check: the config, its input files and the checks of {', '.join(names)} passed; nothing was run")
        return []
    bound_heap()  # large freed tensors go back to the system at once (cai/usage.py)
    launch(cfg)  # with strategy=ddp|deepspeed_* and several devices: start the other ranks, join them
    use_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)  # every model a stage loads goes there
    L.seed_everything(cfg.seed, verbose=False)  # Python, NumPy and torch; each stage reseeds its own work from cfg.seed
    tracker: Tracker = (instantiate(cfg.logger) if is_rank_zero() else Tracker("none")).start(cfg)  # one W&B run per job
    summaries = []
    try:
        for name in names:
            log.info("stage %s: %s", name, BY_NAME[name].description)
            try:
                summaries.append({"stage": name, **run_stage(BY_NAME[name], cfg, tracker)})
            except (CaiError, Interrupted, OSError) as err:
                raise stopped(cfg, name, names, err) from None
        if "eval" in names and (group := all_gather(tracker.group)[0]):  # rank 0's group: the other ranks' trackers are silent
            refresh_group(cfg, tracker, group, next(s for s in summaries if s["stage"] == "eval"))
        if not all(s.get("cached") for s in summaries):  # no W&B run for a job that only found its stages cached
            tracker.summary({f"{s['stage']}/{k}": v for s in summaries for k, v in s.items() if k not in ("stage", "cached")})
    finally:
        tracker.finish()
    if is_rank_zero():
        print_summary(summaries)
    return summaries


OBJECTIVES = ("harmless_elo", "helpful_elo", "refusal_rate", "boilerplate_rate", "mean_length", "pm_score")


def check_objective(cfg: DictConfig) -> None:
    """`objective` names a field of the final policy's row in elo.json, or is null."""
    if cfg.objective is not None and cfg.objective.removeprefix("eval/summary/") not in OBJECTIVES:
        raise CaiError(
            f"objective: unknown '{cfg.objective}'; choose eval/summary/<{'|'.join(OBJECTIVES)}> (the final policy's, from elo.json) or null"
        )


def objective(cfg: DictConfig, summaries: list[dict]) -> float | None:
    """The value `objective` names, of this run's final policy, for Hydra's sweepers (optuna minimises or maximises it).

    Read from the eval stage's elo.json, so a trial whose evaluation was cached returns it too; None
    when the run did not evaluate (stage=sft, stage=check) or has no objective.
    """
    evaluated = next((s for s in summaries if s["stage"] == "eval"), None)
    if cfg.objective is None or evaluated is None:
        return None
    elo = json.loads((Path(evaluated["path"]).parent / "elo.json").read_text())
    final = max((s for s in elo["snapshots"] if s["order"] >= 0), key=lambda s: s["order"])
    value = final.get(cfg.objective.removeprefix("eval/summary/"))
    return float(value) if value is not None else None


def refresh_group(cfg: DictConfig, tracker: Tracker, group: str, evaluated: dict) -> None:
    """A run of a multirun or sweep redraws its group's frontier once its evaluation is done (`frontier.refresh_group`).

    Every rank takes part (the judge shares its work out). A group that cannot be drawn (runs judged
    by different judges, or on different prompts), or a failure while drawing it, is a warning: the
    run's own results stand, and the next run of the group draws it again.
    """
    try:
        upstream = {n: require(cfg, n, "frontier") for n in frontier.STAGE.upstream_of(cfg)}
        frontier.refresh_group(Context(cfg, tracker, None, upstream), group, Path(evaluated["path"]).parent, tracker.name or "")
    except CaiError as err:
        log.warning("the group's frontier was not drawn: %s", err)
    except Exception as err:  # noqa: BLE001 (a bug or a full disk while drawing must not fail a finished run)
        log.warning("the group's frontier was not drawn: %s: %s", type(err).__name__, err, exc_info=True)


def stopped(cfg: DictConfig, name: str, names: tuple[str, ...], err: BaseException) -> BaseException:
    """A stage stopped: one line saying why, what to do, and which of the run's stages did not run.

    Whatever it had written stays: a rerun of the same command resumes it. An OSError other than a
    full disk is a fault of its own and keeps its traceback.
    """
    later = names[names.index(name) + 1 :]
    not_run = f" (not run: {', '.join(later)})" if later else ""
    if isinstance(err, Interrupted):
        return CaiError(f"{name}: interrupted by {err.name}; run the same command again to resume{not_run}", exit_code=128 + err.signum)
    if disk_full(err):
        where = f" while writing {err.filename}" if err.filename else ""
        free = shutil.disk_usage(Path(cfg.paths.artifacts).expanduser()).free / 2**20
        return CaiError(
            f"{name}: the disk is full{where} ({free:.0f} MiB free under {cfg.paths.artifacts}); free some space and run "
            f"the same command again to resume (what was written is kept){not_run}"
        )
    if isinstance(err, CaiError):
        return CaiError(f"{err}{not_run}", exit_code=err.exit_code) if not_run else err
    return err


def print_summary(summaries: list[dict]) -> None:
    """A table of stage, key metric and artifact path, printed when the run ends."""
    if not summaries:
        return
    header = ("stage", "key metric", "ran on", "artifacts")
    rows = [(s["stage"], str(s.get("metric", "")), s.get("ran_on", ""), str(s.get("path", ""))) for s in summaries]
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    for r in rows:
        print(line.format(*r))
    for s in summaries:
        if s["stage"] in ("eval", "frontier"):
            print(f"frontier plot: {s['path']}")
