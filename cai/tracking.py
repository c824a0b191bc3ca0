"""Experiment tracking: W&B (offline by default), a CSV fallback, or nothing.

Stages log through one small interface, so `logger=csv` and `logger=none` run the same code:
- `log({"stage/split/name": value}, step)` for scalars,
- `table(key, columns, rows)` for samples (prompts, critiques, pairs, answers),
- `artifact(path, name, type)` to version a stage's output, `use(...)` to declare one it read,
- `image(key, path)` for plots.
W&B runs with WANDB_MODE=offline unless told otherwise: no account needed; `wandb sync` uploads later.
A run's group is its multirun or sweep, its job type the `stage` it ran, its name the overrides
that vary; its config is flat (`label.debias`), so a sweep agent cannot overwrite a section.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import cai
from cai.errors import CaiError

log = logging.getLogger(__name__)
BACKENDS = ("wandb", "csv", "none")

# Every key cai logs, `stage/split/name`, and what it measures: the metrics reference in the docs is
# generated from this table, and a test fails when a run logs a key that no entry matches. `{snapshot}`
# is an evaluated policy (initial, sft, ppo@4, ...), `{axis}` harmless or helpful, `{split}` a report split.
METRICS: dict[str, str] = {
    "sl_data/gen/tokens": "tokens the initial model generated for answers, critiques and revisions",
    "sl_data/gen/tokens_per_s": "generation throughput of the SL-data stage (new tokens per second)",
    "sl_data/data/rows": "SL-CAI rows written (red-team rounds and helpful answers)",
    "sl_data/samples": "table: prompt, answer, principle, critique and revision of the first rows",
    "sft/train/loss": "token cross-entropy on assistant tokens of the training batch (the policy's own revisions)",
    "sft/train/tokens_per_s": "training tokens per second (padding excluded)",
    "sft/train/lr": "the learning rate of the step (cosine schedule with warmup)",
    "sft/val/loss": "token cross-entropy on held-out SL rows (sft.val_fraction)",
    "sft/train/warning_{flag}": "1 when training looks wrong: loss_rose (the loss ended above its start), weights_exploded",
    "pairs/data/pairs": "answer pairs sampled by the SFT model",
    "pairs/data/identical_rate": "share of pairs whose two answers are the same text (they teach the PM nothing)",
    "pairs/samples": "table: prompt and the two answers of the first pairs",
    "label/data/labels": "comparisons labelled",
    "label/data/mean_p_a": "mean P(answer A is better): 0.5 is undecided on average",
    "label/data/confident_rate": "share of labels further than 0.25 from 0.5",
    "label/samples": "table: conversation, both answers, P(A), the label and the principles asked",
    "label/report": "table: the labeller's agreement with human choices per principle and for the ensemble (label.report_data)",
    "label/report/ensemble_agreement": "agreement of the ensemble's labels with **human** choices (label.report_data)",
    "label_report/{split}/{measure}": "stage=label_report: agreement, one_order_agreement, mean_confidence, ece of the labeller against **human** choices",
    "label_report/principles": "table: stage=label_report's measures per principle",
    "label_report/calibration": "plot: the labeller's calibration against human choices",
    "pm/train/loss": "Bradley-Terry loss against the (soft) labels, per training batch",
    "pm/train/accuracy": "share of training comparisons the PM orders as the label does",
    "pm/train/lr": "the learning rate of the step",
    "pm/train/warning_{flag}": "1 when training looks wrong: loss_rose, weights_exploded",
    "pm/val/loss": "Bradley-Terry loss on held-out AI labels",
    "pm/val/labeller_agreement": "how often the PM prefers what the labeller preferred on held-out comparisons (agreement with AI labels, not accuracy)",
    "pm/val/ece": "expected calibration error against the soft targets the PM learned",
    "pm/val/calibration": "plot: the PM's calibration on held-out AI labels",
    "pm/hh/accuracy": "accuracy against **human** harmlessness choices in pm.eval_data",
    "pm/hh/accuracy_low": "lower end of pm/hh/accuracy's 95% interval",
    "pm/hh/accuracy_high": "upper end of pm/hh/accuracy's 95% interval",
    "pm/hh/ece": "calibration error against human choices",
    "pm/hh/calibration": "plot: the PM's calibration against human choices",
    "pm_eval/hh/accuracy": "stage=pm_eval: a PM's accuracy against **human** choices in pm.eval_data",
    "pm_eval/hh/accuracy_low": "lower end of its 95% interval",
    "pm_eval/hh/accuracy_high": "upper end of its 95% interval",
    "pm_eval/hh/ece": "its calibration error against human choices",
    "ppo/train/reward": "the reward model's mean raw score of the iteration's answers (what PPO optimises; rising is not better behaviour)",
    "ppo/train/kl": "KL(actor || ref) in nats per answer (k1 estimate)",
    "ppo/train/kl_coef": "the KL coefficient that penalised this iteration's rewards",
    "ppo/train/truncated_rate": "share of answers cut at ppo.max_new_tokens",
    "ppo/train/response_len": "mean answer length in tokens",
    "ppo/train/refusal_rate": "share of answers with a refusal phrase (string heuristic: evasiveness)",
    "ppo/train/boilerplate_rate": "share of answers with repeated n-grams (string heuristic: boilerplate)",
    "ppo/train/tokens_per_s": "new tokens per second over the whole iteration (generation, scoring, update)",
    "ppo/train/policy_loss": "clipped policy-gradient loss, mean over the iteration's minibatches",
    "ppo/train/value_loss": "clipped value loss (ppo.advantage=gae only)",
    "ppo/train/entropy": "mean entropy of the actor's next-token distribution on answer tokens",
    "ppo/train/clipfrac": "share of answer tokens whose probability ratio was clipped",
    "ppo/train/approx_kl": "KL(old policy || updated policy) over the update (k3 estimate): how far one iteration moved",
    "ppo/train/lr": "the learning rate",
    "ppo/time/{phase}": "seconds of the iteration spent in generation, scoring and update",
    "ppo/rollouts": "table: iteration, prompt, answer and reward of sampled rollouts (every ppo.table_every iterations)",
    "eval/{snapshot}/{axis}_elo": "the snapshot's Elo on that axis (the initial model is 0), from the judge's pairwise verdicts",
    "eval/{snapshot}/{axis}_low": "lower end of the Elo's 95% bootstrap interval over prompts",
    "eval/{snapshot}/{axis}_high": "upper end of the Elo's 95% bootstrap interval over prompts",
    "eval/{snapshot}/refusal_rate": "share of the snapshot's held-out answers with a refusal phrase",
    "eval/{snapshot}/boilerplate_rate": "share of its answers with repeated n-grams",
    "eval/{snapshot}/mean_length": "mean answer length in tokens",
    "eval/{snapshot}/pm_score": "mean score of its answers by the reference reward model (this run's PM or ppo.reward_model)",
    "eval/summary/{axis}_elo": "the final policy's Elo on that axis: the metric a sweep optimises",
    "eval/judge/identity": "the judge: its model and questions, or its PM's content",
    "eval/judge/independent": "whether the judge is none of the run's own models (labeller, reward model)",
    "eval/judge/{axis}_agreement": "the judge's agreement with **human** choices (eval.judge_check, eval.judge_check_helpful)",
    "eval/judge/{axis}_agreement_low": "lower end of its 95% interval",
    "eval/judge/{axis}_agreement_high": "upper end of its 95% interval",
    "eval/answers": "table: every snapshot's answer to every held-out prompt",
    "eval/judgements": "table: every pairwise verdict (both answers, P(A))",
    "eval/frontier": "plot: the frontier, helpfulness Elo on x, harmlessness Elo on y",
    "frontier/group/table": "table: the group's frontier (a multirun's or sweep's runs, one judge), redrawn by each run as its eval ends: run, snapshot, both Elos with intervals, refusal and boilerplate rates, the judge and its agreement with humans",
    "frontier/group/plot": "plot: the group's frontier, as of this run",
    "frontier/group/runs": "summary: how many of the group's runs the group's frontier covered when this run drew it",
    "frontier/group/path": "summary: the directory of that frontier (elo.json, frontier.png)",
    "frontier/{snapshot}/{measure}": "stage=frontier: the eval/{snapshot}/* measures of one Elo fit over several runs",
    "frontier/{run}/{snapshot}/{measure}": "the same, for a snapshot of one run (its PPO policies: `label=cot/ppo@4`)",
    "frontier/judgements": "table: the cross-run verdicts",
    "frontier/frontier": "plot: the cross-run frontier",
    "trainer/global_step": "Lightning's optimizer step: the x axis of the training stages' curves",
    "epoch": "Lightning's epoch counter (PPO: the iteration)",
}


def documented(key: str) -> str | None:
    """The METRICS entry that names this logged key (placeholders match one path segment or a part of one), or None."""
    import re

    for pattern in METRICS:
        regex = "^" + re.sub(r"\\\{[a-z]+\\\}", "[^/]+", re.escape(pattern)) + "$"
        if re.match(regex, key):
            return pattern
    return None


def git_commit() -> str | None:
    """The commit of the code that ran (with '-dirty' if there are local changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cai.ROOT, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cai.ROOT, capture_output=True, text=True, timeout=5
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# Overrides that say where files go or how a run is logged, not what it computes: never in names or tags.
PLUMBING = ("hydra", "paths", "logger", "run_name", "stage", "trainer.accelerator", "trainer.devices", "trainer.enable_progress_bar")


def is_plumbing(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in PLUMBING)


def readable(override: str) -> str | None:
    """'constitution.path=/a/b/mine.yaml' -> 'constitution.path=mine.yaml'; plumbing -> None."""
    key, _, value = override.lstrip("+~").partition("=")
    if is_plumbing(key):
        return None
    if "/" in value:
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return f"{key}={value}" if value else key


def run_name_from_overrides(overrides: Sequence[str], varying: Sequence[str] | None = None) -> str:
    """'constitution=ensemble label=soft' -> 'constitution=ensemble,label=soft'; no overrides -> 'default'.

    Plumbing (paths, logger, hydra, stage) is left out, paths are shortened to their last part, and
    with `varying` (the keys a multirun or sweep varies) only those keys name the run.
    """
    keep = [o for o in overrides if varying is None or o.lstrip("+~").partition("=")[0] in varying]
    return ",".join(r for o in keep if (r := readable(o))) or "default"


def cli_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def sweep_context() -> tuple[str | None, list[str] | None]:
    """(W&B group, the keys that vary) for a W&B sweep agent or a Hydra multirun; (None, None) for one run.

    A sweep's keys are its parameters (WANDB_SWEEP_PARAM_PATH); a multirun's are the command-line
    overrides with several values (`label=hard,soft`). Jobs of one multirun share its folder's name.
    """
    if os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_SWEEP_PARAM_PATH"):
        params = {}
        if os.environ.get("WANDB_SWEEP_PARAM_PATH") and Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).exists():
            import yaml

            params = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text()) or {}
        return f"sweep-{os.environ.get('WANDB_SWEEP_ID', 'local')}", [k for k in params if not k.startswith("_")]
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None, None
        parsed = OverridesParser.create().parse_overrides([o for o in sys.argv[1:] if "=" in o and not o.startswith("-")])
        # `model@feedback_model=a,b` varies the feedback model, not the policy: its key keeps the package
        keys = [f"{o.key_or_group}@{o.package}" if o.package else o.key_or_group for o in parsed if o.is_sweep_override()]
        return multirun_group(hc.sweep.dir), keys
    except Exception:  # outside Hydra (ValueError), or an argv its parser cannot read: a single run
        return None, None


def multirun_group(sweep_dir: str | Path) -> str:
    """'multirun/2026-11-27/14-30-00' -> 'multirun-2026-11-27-14-30-00': the W&B group of its jobs and its frontier."""
    parts = Path(sweep_dir).parts
    return "multirun-" + "-".join(parts[-2:])


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys ('label.debias': True), plus each group's chosen option ('label': 'soft').

    Flat, so that a sweep agent, which sets its parameters as top-level keys ('label': 'soft'),
    cannot replace a whole section: a key it sets holds the value it passed to this very run.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    try:
        from hydra.core.hydra_config import HydraConfig

        flat.update(
            {group: option for group, option in HydraConfig.get().runtime.choices.items() if not group.startswith(("hydra", "schema"))}
        )
    except (ImportError, ValueError):
        pass
    return flat


def directory_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


class Tracker:
    """One run's tracker. Use `start(cfg)` first and `finish()` in a `finally` block.

    The W&B run (or CSV folder) opens at the first thing logged, so a job whose stages are all
    cached opens none. Artifacts used before then are declared when it opens.
    """

    def __init__(
        self,
        backend: str = "wandb",
        project: str = "cai",
        entity: str | None = None,
        mode: str = "offline",
        dir: str = "outputs",
        tags: Sequence[str] = (),
        group: str | None = None,
        reference_mb: float = 100.0,
    ) -> None:
        if backend not in BACKENDS:
            raise CaiError(f"logger.backend: unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        if mode not in ("offline", "online", "disabled"):
            raise CaiError(f"logger.mode: unknown W&B mode '{mode}'; choose offline, online or disabled")
        self.backend = backend
        self.project = project
        self.entity = entity
        self.mode = mode
        self.dir = Path(dir)
        self.tags = list(tags)
        self.group = group
        self.reference_mb = reference_mb
        self.run: Any = None  # the wandb run, once open
        self.name: str | None = None
        self.uses: list[str] = []  # artifacts this run read (declared as inputs when W&B is online)
        self._pending: list[tuple[Path, str, str]] = []
        self._init: dict[str, Any] | None = None
        self._csv: Path | None = None

    def start(self, cfg: DictConfig, name: str | None = None) -> Tracker:
        """Name the run (from the overrides that vary), and get its group, job type, tags and config ready."""
        overrides = cli_overrides()
        group, varying = sweep_context()
        self.name = name or cfg.get("run_name") or run_name_from_overrides(overrides, varying)
        self.group = self.group or group  # a multirun's or sweep's runs share it, and its frontier (frontier.refresh_group)
        meta = {"git_commit": git_commit(), "overrides": overrides, "cai_version": cai.__version__}
        self._init = {
            "name": self.name,
            "group": self.group,
            "job_type": cfg.stage.name if "stage" in cfg else None,
            "tags": (self.tags + [r[:64] for o in overrides if (r := readable(o))])[:20],  # W&B caps tags at 64 characters
            "config": {**flat_config(cfg), "_meta": meta},
        }
        return self

    @property
    def opened(self) -> bool:
        return self.run is not None or self._csv is not None

    def _open(self) -> None:
        """Open the run at the first thing logged."""
        if self.opened or self._init is None or self.backend == "none":
            return
        init = self._init
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.backend == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=self.project, entity=self.entity, mode=self.mode, dir=str(self.dir), reinit="finish_previous", **init
            )
        else:
            self._csv = self.dir / "metrics.csv"
            (self.dir / "config.json").write_text(
                json.dumps({**init["config"], "_run": {k: init[k] for k in ("name", "group", "job_type")}}, indent=2, default=str)
            )
        pending, self._pending = self._pending, []
        for path, name, type in pending:
            self.use(path, name, type)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Scalars named `stage/split/name` (e.g. `pm/val/ece`)."""
        self._open()
        if self.backend == "wandb" and self.run is not None:
            self.run.log(metrics, step=step)
        elif self.backend == "csv" and self._csv is not None:
            new = not self._csv.exists()
            with self._csv.open("a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "key", "value"])
                for k, v in metrics.items():
                    w.writerow([step if step is not None else "", k, v])

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table of samples (W&B Table; JSONL under tables/ with logger=csv). Log a series under one key."""
        self._open()
        if self.backend == "wandb" and self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        elif self.backend == "csv":
            out = self.dir / "tables" / (key.replace("/", "_") + ".jsonl")
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                for r in rows:
                    f.write(json.dumps(dict(zip(columns, r)), ensure_ascii=False, default=str) + "\n")

    def image(self, key: str, path: str | Path) -> None:
        """A plot saved as an image file (the frontier, a calibration curve)."""
        self._open()
        if self.backend == "wandb" and self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def _wandb_artifact(self, path: Path, name: str, type: str):
        """A W&B artifact of a stage's output: its files, or a reference (checksums only) above reference_mb."""
        import wandb

        art = wandb.Artifact(name=name, type=type)
        if directory_mb(path) > self.reference_mb:
            art.add_reference(path.resolve().as_uri())  # a model folder: gigabytes at paper scale, never uploaded
        elif path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        return art

    def artifact(self, path: str | Path, name: str, type: str) -> None:
        """Version a stage's output as a W&B artifact (`name` carries the lineage key)."""
        self._open()
        if self.backend == "wandb" and self.run is not None:
            self.run.log_artifact(self._wandb_artifact(Path(path), name, type))

    def use(self, path: str | Path, name: str, type: str) -> None:
        """Declare a stage output this run read (an upstream stage, or a cached one) as its input.

        W&B refuses `use_artifact` offline, so there the names go in the run's config (`_meta.uses`)
        only; `wandb sync` cannot add the edge later. Online runs get the lineage edge.
        """
        if not self.opened:
            self._pending.append((Path(path), name, type))
            return
        if name in self.uses:
            return
        self.uses.append(name)
        if self.backend == "wandb" and self.run is not None:
            self.run.config.update({"_meta": {**self.run.config.get("_meta", {}), "uses": self.uses}}, allow_val_change=True)
            if self.mode == "online":
                self.run.use_artifact(self._wandb_artifact(Path(path), name, type))

    def summary(self, values: dict[str, Any]) -> None:
        """Final values shown on the run's overview (W&B summary; summary.json with csv)."""
        self._open()
        if self.backend == "wandb" and self.run is not None:
            self.run.summary.update(values)
        elif self.backend == "csv":  # merged into what is there, as W&B's summary is
            path = self.dir / "summary.json"
            earlier = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**earlier, **values}, indent=2, default=str))

    def lightning_logger(self):
        """The matching Lightning logger, so a Trainer logs into this same run."""
        self._open()
        if self.backend == "wandb" and self.run is not None:
            from lightning.pytorch.loggers import WandbLogger

            return WandbLogger(experiment=self.run)
        if self.backend == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=str(self.dir), name="lightning")
        return False

    def finish(self) -> None:
        """Close the run (call in a `finally` block: a crashed stage must not leave W&B hanging)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
