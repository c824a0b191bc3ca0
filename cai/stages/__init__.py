"""The stages of the method, one module each, and what a stage is.

A stage module holds only its own work: a `build(ctx)` function and one `STAGE = Stage(...)` that
describes it (its upstream, the config fields its output depends on, how it hashes its inputs).
The pipeline (cai/pipeline.py) owns everything else, once: the stage order, lineage keys,
require, fingerprint, skip or resume, complete, the W&B artifact and the summary row. A stage
module never imports another stage or the pipeline (tests/test_pipeline.py checks it); what two
stages share lives in the library (cai/artifacts.py, cai/training.py, cai/reward.py, cai/arena.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from cai.artifacts import StageDir, Upstream
from cai.tracking import Tracker


@dataclass
class Context:
    """What a stage's `build` is handed by the pipeline."""

    cfg: DictConfig
    tracker: Tracker
    out: StageDir | None  # this stage's directory, opened (None for commands: pm_eval, frontier)
    upstream: dict[str, Upstream] = field(default_factory=dict)  # the finished stages it reads, by name
    extra: dict[str, Any] = field(default_factory=dict)  # manifest fields beyond the counts


def no_inputs(cfg: DictConfig) -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    """One stage: its place in the lineage, what decides its output, and the work it does.

    build(ctx) does the stage's own work into ctx.out and returns its counts (written to the
    manifest), or None on a rank that does not publish. A command (`keyed=False`: pm_eval,
    frontier) works on existing artifacts with no lineage directory and returns its summary row
    ({"metric", "path"}) instead.
    """

    name: str
    description: str
    build: Callable[[Context], dict | None]
    after: str | None = None  # the previous stage in the lineage chain (its key is part of this one's)
    lineage: tuple[str, ...] = ()  # config fields (dotted) that decide this stage's output
    logging_only: tuple[str, ...] = ()  # fields inside `lineage` that change only logging or checkpoints
    reads: tuple[str, ...] | Callable[[DictConfig], tuple[str, ...]] = ()  # stages whose output build reads
    inputs: Callable[[DictConfig], dict] = no_inputs  # hashes of input content: files, prompts, constitution
    check: Callable[[DictConfig], None] | None = None  # validates this stage's fields before any stage runs
    metric: Callable[[dict], str] = lambda counts: ""  # the summary's key metric, from the counts
    output: str = ""  # what the summary row points at, inside the stage directory
    artifact: tuple[str, str, str] | None = None  # W&B artifact (name, type, path inside the directory)
    announce: Callable[[Context], None] | None = None  # runs after the stage is built or found cached
    keyed: bool = True
    writes: str = ""  # what its directory holds beside manifest.json, for users (the stage reference in docs/ is made from it)

    def upstream_of(self, cfg: DictConfig) -> tuple[str, ...]:
        return self.reads(cfg) if callable(self.reads) else self.reads
