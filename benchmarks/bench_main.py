"""Benchmark the main job: `python train.py` (stage=all, experiment=quickstart, embedded model).

    python benchmarks/bench_main.py [ROOT] [--cold] [extra hydra overrides...]

Runs the command exactly as a user would, in a fresh artifact root (a temp dir unless ROOT is
given), then prints one row per stage from its manifest's `usage` (cai/usage.py): wall seconds,
tokens generated and forwarded, forward tokens/s and the stage's own peak RSS; then the whole
job's wall time and peak RSS. `--cold` also starts from an empty model cache, so the GGUF
conversion is included. Targets (issue 16): 10 minutes warm, 11 cold, 4 GB peak RSS, on 2 cores.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cai
from cai.pipeline import STAGES


def main() -> None:
    args = sys.argv[1:]
    cold = "--cold" in args
    args = [a for a in args if a != "--cold"]
    root = Path(args.pop(0) if args and "=" not in args[0] else tempfile.mkdtemp(prefix="cai-main-")).resolve()
    env = {**os.environ, "CAI_ROOT": str(root), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    if cold:
        env["CAI_CACHE"] = tempfile.mkdtemp(prefix="cai-cache-")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *args], cwd=cai.ROOT, env=env)
    wall = time.perf_counter() - t
    # The job's peak: the highest stage peak. (The kernel's own child peak is reset along with the
    # per-stage peaks that cai/usage.py reads, so it only covers the time since the last reset.)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30  # KiB on Linux
    print(
        f"\n== main job: python train.py {' '.join(args)} (root {root}{', cold model cache' if cold else ''}), exit status {done.returncode}"
    )
    print(f"{'stage':9s} {'wall s':>7s} {'generated':>10s} {'forward tok':>12s} {'fwd tok/s':>10s} {'gen tok/s':>10s} {'peak RSS GB':>12s}")
    total = 0.0
    for stage in STAGES:
        manifest = root / "artifacts" / stage / "latest" / "manifest.json"
        if not manifest.exists():
            continue
        u = json.loads(manifest.read_text()).get("usage", {})
        total += u.get("seconds", 0.0)
        peak = max(peak, u.get("peak_rss_gb", 0.0))
        print(
            f"{stage:9s} {u.get('seconds', 0):7.1f} {u.get('generated_tokens', 0):10d} {u.get('forward_tokens', 0):12d} "
            f"{u.get('forward_tokens_per_s', 0):10.0f} {u.get('generated_tokens_per_s', 0):10.1f} {u.get('peak_rss_gb', 0):12.2f}"
        )
    print(f"stages {total:.1f} s; start-up, model loads{' and conversion' if cold else ''} and the rest {wall - total:.1f} s")
    print(f"wall: {wall:.1f} s = {wall / 60:.1f} min (target <= {11 if cold else 10} min); peak RSS {peak:.2f} GB (target <= 4)")


if __name__ == "__main__":
    main()
