"""Experiment tracking: W&B (offline by default), a CSV fallback, or nothing.

Stages log through one small interface, so `logger=csv` and `logger=none` run the same code:
- `log({"stage/split/name": value}, step)` for scalars,
- `table(key, columns, rows)` for samples (prompts, critiques, pairs, answers),
- `artifact(path, name, type)` to version a stage's output directory,
- `image(key, path)` for plots.
W&B runs with WANDB_MODE=offline unless told otherwise: no account needed; `wandb sync` uploads later.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import cai
from cai.errors import CaiError

log = logging.getLogger(__name__)
BACKENDS = ("wandb", "csv", "none")


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


def run_name_from_overrides(overrides: Sequence[str]) -> str:
    """'constitution=ensemble label=soft' -> 'constitution=ensemble,label=soft'; no overrides -> 'default'.

    Paths are shortened to their last part so names stay readable.
    """
    parts = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key.startswith("hydra") or key in ("logger", "run_name"):
            continue
        if "/" in value:
            value = value.rstrip("/").rsplit("/", 1)[-1]
        parts.append(f"{key}={value}" if value else key)
    return ",".join(parts) or "default"


def cli_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


class Tracker:
    """One run's tracker. Use `start(cfg)` first and `finish()` in a `finally` block."""

    def __init__(
        self,
        backend: str = "wandb",
        project: str = "cai",
        entity: str | None = None,
        mode: str = "offline",
        dir: str = "outputs",
        tags: Sequence[str] = (),
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
        self.run: Any = None  # the wandb run
        self.name: str | None = None
        self._csv: Path | None = None

    def start(self, cfg: DictConfig, name: str | None = None) -> Tracker:
        """Open the run: name it from the overrides, log the composed config and the git commit."""
        overrides = cli_overrides()
        self.name = name or cfg.get("run_name") or run_name_from_overrides(overrides)
        config = OmegaConf.to_container(cfg, resolve=True)
        meta = {"git_commit": git_commit(), "overrides": overrides, "cai_version": cai.__version__}
        if self.backend == "wandb":
            import wandb

            self.dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=self.project,
                entity=self.entity,
                name=self.name,
                mode=self.mode,
                dir=str(self.dir),
                config={**config, "_meta": meta},
                tags=(self.tags + [o[:64] for o in overrides if not o.startswith("hydra")])[:20],  # W&B caps tags at 64 chars
                reinit="finish_previous",
            )
        elif self.backend == "csv":
            self.dir.mkdir(parents=True, exist_ok=True)
            self._csv = self.dir / "metrics.csv"
            (self.dir / "config.json").write_text(json.dumps({**config, "_meta": meta}, indent=2, default=str))
        return self

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Scalars named `stage/split/name` (e.g. `pm/val/accuracy`)."""
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
        """A table of samples (W&B Table; JSONL under tables/ with logger=csv)."""
        if self.backend == "wandb" and self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        elif self.backend == "csv":
            out = self.dir / "tables" / (key.replace("/", "_") + ".jsonl")
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w") as f:
                for r in rows:
                    f.write(json.dumps(dict(zip(columns, r)), ensure_ascii=False, default=str) + "\n")

    def image(self, key: str, path: str | Path) -> None:
        """A plot saved as an image file (the frontier, a calibration curve)."""
        if self.backend == "wandb" and self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def artifact(self, path: str | Path, name: str, type: str) -> None:
        """Version a stage's output directory or file as a W&B artifact."""
        if self.backend == "wandb" and self.run is not None:
            import wandb

            art = wandb.Artifact(name=name, type=type)
            p = Path(path)
            art.add_dir(str(p)) if p.is_dir() else art.add_file(str(p))
            self.run.log_artifact(art)

    def summary(self, values: dict[str, Any]) -> None:
        """Final values shown on the run's overview (W&B summary; summary.json with csv)."""
        if self.backend == "wandb" and self.run is not None:
            self.run.summary.update(values)
        elif self.backend == "csv":
            (self.dir / "summary.json").write_text(json.dumps(values, indent=2, default=str))

    def lightning_logger(self):
        """The matching Lightning logger, so a Trainer logs into this same run."""
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
