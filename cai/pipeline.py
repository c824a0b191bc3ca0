"""Runs the stages in order. Stages hand off through artifacts on disk, never through memory.

Each stage is a module in cai/stages/ with a `run(cfg, tracker) -> dict` function that reads the
previous stage's artifacts under ${paths.artifacts}, writes its own, and returns a short summary
(its key metric and artifact path) for the table printed at the end.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import random

import hydra
import torch
from omegaconf import DictConfig

from cai.data import load_prompts
from cai.errors import CaiError, NotImplementedStage
from cai.tracking import Tracker

log = logging.getLogger(__name__)

# The method's order (DESIGN.md): SL-CAI data, SFT, pairs, AI labels, PM, PPO, evaluation.
STAGES = ("sl_data", "sft", "pairs", "label", "pm", "ppo", "eval")
# Stages that run only when asked for by name.
EXTRA_STAGES = ("pm_eval", "frontier")
# What each stage does; a stage whose module is not in cai/stages/ yet says so instead of running.
DESCRIPTIONS = {
    "sl_data": "SL-CAI critique/revision data",
    "sft": "SL-CAI supervised fine-tuning",
    "pairs": "RL-CAI answer pairs",
    "label": "RL-CAI AI feedback labels",
    "pm": "the preference model",
    "pm_eval": "preference-model evaluation",
    "ppo": "PPO against the preference model",
    "eval": "Elo evaluation and the frontier",
    "frontier": "the cross-run Elo frontier",
}


def stages_for(name: str) -> tuple[str, ...]:
    """The stages that `stage=name` runs."""
    if name == "all":
        return STAGES
    if name in STAGES or name in EXTRA_STAGES:
        return (name,)
    raise CaiError(f"stage.name: unknown stage '{name}'; choose one of all, {', '.join(STAGES + EXTRA_STAGES)}")


def stage_module(name: str):
    """The module cai.stages.<name>, or a clear 'not implemented yet' error (never a fake result)."""
    try:
        return importlib.import_module(f"cai.stages.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"cai.stages.{name}":
            raise
        raise NotImplementedStage(f"stage '{name}' ({DESCRIPTIONS[name]}) is not implemented yet") from None


def instantiate(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a CaiError raised inside comes out as itself (one clear line).

    Extra kwargs (live objects such as a ModelSpec or a loaded model) are passed through a partial,
    because Hydra would turn a dataclass kwarg into a config node.
    """
    try:
        if kwargs:
            return hydra.utils.instantiate(node, _partial_=True)(**kwargs)
        return hydra.utils.instantiate(node)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, CaiError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


LABEL_KINDS = ("hard", "soft", "cot", "human")


def validate(cfg: DictConfig) -> None:
    """Check the inputs every stage relies on before any work starts, so bad input costs nothing."""
    for key in ("model", "feedback_model", "pm_model"):
        instantiate(cfg[key])  # source, path and dtype are checked when the spec is built
    instantiate(cfg.constitution)  # loads and validates every principle and example
    if cfg.label.kind not in LABEL_KINDS:
        raise CaiError(f"label.kind: unknown label type '{cfg.label.kind}'; choose one of {', '.join(LABEL_KINDS)}")
    if not 0.0 <= cfg.label.clamp_low <= cfg.label.clamp_high <= 1.0:
        raise CaiError(f"label.clamp_low/clamp_high: need 0 <= low <= high <= 1, got [{cfg.label.clamp_low}, {cfg.label.clamp_high}]")
    if cfg.label.kind == "human" and not cfg.label.data:
        raise CaiError("label.data: label=human needs an hh-rlhf-format file, e.g. label.data=path/to/harmless-base.jsonl.gz")
    load_prompts("red_team", cfg.data.red_team, "train", cfg.data.n_red_team)
    load_prompts("helpful", cfg.data.helpful, "train", cfg.data.n_helpful)
    instantiate(cfg.strategy)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> list[dict]:
    """Run the stages that cfg.stage.name selects, in order, and return one summary per stage."""
    names = stages_for(cfg.stage.name)
    validate(cfg)
    missing = [n for n in names if importlib.util.find_spec(f"cai.stages.{n}") is None]
    if missing:
        log.warning("stages not implemented yet: %s; the run stops when it reaches the first of them", ", ".join(missing))
    seed_everything(cfg.seed)
    tracker: Tracker = instantiate(cfg.logger).start(cfg)
    summaries = []
    try:
        for name in names:
            log.info("stage %s: %s", name, DESCRIPTIONS[name])
            summary = stage_module(name).run(cfg, tracker)
            summaries.append({"stage": name, **summary})
        tracker.summary({f"{s['stage']}/{k}": v for s in summaries for k, v in s.items() if k != "stage"})
    finally:
        tracker.finish()
    print_summary(summaries)
    return summaries


def print_summary(summaries: list[dict]) -> None:
    """A table of stage, key metric and artifact path, printed when the run ends."""
    if not summaries:
        return
    rows = [(s["stage"], str(s.get("metric", "")), str(s.get("path", ""))) for s in summaries]
    widths = [max(len(r[i]) for r in rows + [("stage", "key metric", "artifacts")]) for i in range(3)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format("stage", "key metric", "artifacts"))
    for r in rows:
        print(line.format(*r))
    for s in summaries:
        if s["stage"] in ("eval", "frontier"):
            print(f"frontier plot: {s['path']}")
