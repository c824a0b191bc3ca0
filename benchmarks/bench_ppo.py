"""Benchmark the quickstart's PPO on the embedded model.

    python benchmarks/bench_ppo.py ARTIFACTS_ROOT [extra hydra overrides...]

ARTIFACTS_ROOT is a `paths.root` where the stages up to `pm` have run (for example the folder that
benchmarks/bench_sl.py prints, after `python train.py stage=pairs`, `stage=label`, `stage=pm`
with CAI_ROOT set to it). The PPO stage runs afresh there and the script prints its wall time and
the per-iteration split between generation, scoring and update. Target: 8 iterations
of 16 rollouts of at most 48 tokens in 5 minutes or less on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import cai
import cai.config  # noqa: F401
from cai.pipeline import run, stage_path


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    overrides = [f"paths.root={root}", f"paths.output={root}/out", "logger=none", "stage=ppo", *sys.argv[2:]]
    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    shutil.rmtree(stage_path(cfg, "ppo"), ignore_errors=True)
    t = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t
    history = json.loads((stage_path(cfg, "ppo") / "history.json").read_text())
    print(
        f"\n== PPO benchmark: {cfg.ppo.iterations} iterations x {cfg.ppo.rollouts} rollouts x <= {cfg.ppo.max_new_tokens} tokens, {cfg.ppo.ppo_epochs} PPO epoch(s)"
    )
    print("iter  reward    kl  gen_s  score_s  update_s  len  tok/s  refusal  boilerplate")
    for h in history:
        print(
            f"{h['iteration']:4d} {h['ppo/train/reward']:7.3f} {h['ppo/train/kl']:5.2f} {h['ppo/time/generation_s']:6.1f} {h['ppo/time/scoring_s']:8.1f}"
            f" {h['ppo/time/update_s']:9.1f} {h['ppo/train/response_len']:4.0f} {h['ppo/train/tokens_per_s']:6.1f} {h['ppo/train/refusal_rate']:8.2f} {h['ppo/train/boilerplate_rate']:12.3f}"
        )
    print(f"PPO stage wall (model loads, checkpoints and snapshots included): {wall:.1f} s (target <= 300 s)")


if __name__ == "__main__":
    main()
