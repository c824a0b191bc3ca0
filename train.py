"""Entry point: `python train.py [overrides]` (the same as the `cai-train` console script)."""

from cai.cli import main

if __name__ == "__main__":  # the guard matters: vLLM spawns worker processes, and DDP re-runs this file per rank
    main()
