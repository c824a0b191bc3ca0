"""Benchmark the main job: `python train.py` (stage=all, experiment=quickstart, embedded model).

    python benchmarks/bench_main.py [ROOT] [extra hydra overrides...]

Runs the command exactly as a user would, in a fresh artifact root (a temp dir unless ROOT is
given), then prints the wall time and each stage's own time from its manifest.
Target: the whole method in 15 minutes or less on 2 CPU cores with no network.
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


def main() -> None:
    args = sys.argv[1:]
    root = Path(args.pop(0) if args and "=" not in args[0] else tempfile.mkdtemp(prefix="cai-main-")).resolve()
    env = {**os.environ, "CAI_ROOT": str(root), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *args], cwd=cai.ROOT, env=env)
    wall = time.perf_counter() - t
    print(f"\n== main job: python train.py {' '.join(args)} (root {root}), exit status {done.returncode}")
    print("stage      seconds")
    for stage in STAGES:
        manifest = root / "artifacts" / stage / "latest" / "manifest.json"
        if manifest.exists():
            print(f"{stage:9s} {json.loads(manifest.read_text())['seconds_this_run']:8.1f}")
    print(f"wall (Python start-up, model conversion and loads included): {wall:.1f} s = {wall / 60:.1f} min (target <= 15 min)")


if __name__ == "__main__":
    main()
