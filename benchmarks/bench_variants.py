"""Benchmark the main job's training variants side by side, in one run: full fine-tuning, LoRA, GRPO.

    python benchmarks/bench_variants.py [ROOT]

Runs, one after the other in one artifacts root (a temp dir unless ROOT is given), exactly as a user would:
  1. `python train.py`                                          (the main job: full fine-tuning, PPO with GAE)
  2. `python train.py peft=lora`                                (the same stages with LoRA; sl_data is shared)
  3. `python train.py stage=ppo ppo.advantage=grpo ppo.samples_per_prompt=4`   (GRPO on run 1's SFT model and PM)
and prints each stage's wall seconds and peak RSS from its manifest's `usage` beside what the memory
plan (cai/memory.py) said it would need, the job totals, PPO's seconds per iteration, and each
variant's ratio to the main job over the stages both computed. Writes benchmarks/results/variants.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cai
from cai.pipeline import STAGES

RESULTS = Path(__file__).parent / "results" / "variants.json"


def planned(args: list[str]) -> dict[str, float]:
    """The memory plan's total per stage (GB), for the config these overrides compose."""
    from hydra import compose, initialize_config_dir

    from cai import memory
    from cai.pipeline import BY_NAME, stages_for

    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        cfg = compose("train", overrides=[a for a in args])
    names = tuple(n for n in stages_for(cfg.stage.name) if BY_NAME[n].keyed)
    return {s: t / 1e9 for s, t in memory.plan(cfg, names).stage_totals().items()}


VARIANTS = [
    ("full fine-tuning (gae)", []),
    ("peft=lora", ["peft=lora"]),
    ("ppo.advantage=grpo", ["stage=ppo", "ppo.advantage=grpo", "ppo.samples_per_prompt=4"]),
]


def run(root: Path, args: list[str]) -> dict:
    """Run train.py; the usage of every stage it ran (cached ones left out), and its wall time."""
    env = {**os.environ, "CAI_ROOT": str(root), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    before = {s: _latest(root, s) for s in STAGES}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *args], cwd=cai.ROOT, env=env)
    wall = time.perf_counter() - t
    stages = {}
    for s in STAGES:
        m = _latest(root, s)
        if m is not None and (before[s] is None or m["updated"] != before[s]["updated"]):  # computed by this run
            stages[s] = {**m.get("usage", {}), "counts": m.get("counts", {})}
    return {"rc": done.returncode, "wall": wall, "stages": stages}


def _latest(root: Path, stage: str) -> dict | None:
    path = root / "artifacts" / stage / "latest" / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cai-variants-")).resolve()
    results = [(name, args, run(root, args)) for name, args in VARIANTS]
    plans = {name: planned(args) for name, args, _ in results}
    print(f"\n== variants of the main job, one run, root {root}")
    print(f"{'variant':24s} {'stage':8s} {'wall s':>8s} {'peak RSS GB':>12s} {'planned GB':>11s}")
    for name, _, r in results:
        for stage, u in r["stages"].items():
            print(f"{name:24s} {stage:8s} {u.get('seconds', 0):8.1f} {u.get('peak_rss_gb', 0):12.2f} {plans[name].get(stage, 0):11.2f}")
    base = results[0][2]
    for name, args, r in results:
        peak = max((u.get("peak_rss_gb", 0) for u in r["stages"].values()), default=0)
        ppo = r["stages"].get("ppo", {})
        per_it = ppo.get("seconds", 0) / max(1, ppo.get("counts", {}).get("iterations", 1))
        base_peak = max(u.get("peak_rss_gb", 0) for u in base["stages"].values())
        base_ppo = base["stages"]["ppo"]["seconds"] / max(1, base["stages"]["ppo"]["counts"].get("iterations", 1))
        common = [s for s in r["stages"] if s in base["stages"]]  # the stages both computed (run 2 shares sl_data)
        secs, base_secs = (sum(x["stages"][s].get("seconds", 0) for s in common) for x in (r, base))
        print(
            f"{name:24s} exit {r['rc']}  {'+'.join(common)}: {secs:6.1f} s (x{secs / max(base_secs, 1e-9):.2f})  "
            f"peak RSS {peak:5.2f} GB (x{peak / base_peak:.2f})  "
            f"ppo {per_it:6.1f} s/iteration (x{per_it / base_ppo:.2f}), peak {ppo.get('peak_rss_gb', 0):.2f} GB   "
            f"[python train.py {' '.join(args)}]"
        )
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python benchmarks/bench_variants.py",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{os.cpu_count()} CPU cores",
                "variants": [{"name": n, "overrides": a, **r, "planned_gb": plans[n]} for n, a, r in results],
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
