"""Several processes, one job: `strategy=ddp|deepspeed_* trainer.devices=N` runs every stage on N ranks.

The whole pipeline runs on every rank from the start, not only the training stages, so the
generation stages can share their work:
- `launch(cfg)` starts the other ranks (Lightning's launcher re-runs `python train.py` with the
  same overrides and LOCAL_RANK set) and joins the process group; Lightning's Trainer later finds
  the group already there and uses it;
- work is cut into chunks that are the same whatever the world size (shards of rows, snapshots,
  chunks of judgements); rank r does chunks r, r + N, r + 2N, ... and writes them to files of its
  own; after a `barrier()` every rank reads them all. Outputs are therefore the same as a 1-process
  run's, row for row;
- rank 0 alone publishes: it marks stages complete, writes shared files and opens the W&B run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def world() -> int:
    """How many ranks the job has (1 outside a process group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a 1-process run)."""
    if world() > 1:
        torch.distributed.barrier()


def mine(n: int) -> range:
    """The indices of n chunks that this rank does: r, r + N, r + 2N, ..."""
    return range(rank(), n, world())


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one in a 1-process run)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def mean(value: float) -> float:
    """The mean of a scalar over the ranks (PPO's KL controller and logged metrics must agree across ranks)."""
    return sum(all_gather(float(value))) / world()


def launch(cfg: DictConfig) -> int:
    """Start the job's other ranks if the config asks for several, and join the process group; returns the world size.

    Only `strategy=ddp` and `strategy=deepspeed_*` run several processes. Lightning's Fabric does the
    launching exactly as the Trainer would (the same environment variables, the same Hydra-aware
    command line), so the Trainer of each training stage joins the group this made.
    """
    if cfg.strategy.name not in ("ddp", "deepspeed") or world() > 1:
        return world()
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes, strategy="ddp")
    if fabric.world_size == 1:
        return 1
    if os.environ.get("LOCAL_RANK") is None:
        log.info("starting %d processes (strategy=%s)", fabric.world_size, cfg.strategy.name)
    fabric.launch()
    return world()
