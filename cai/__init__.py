"""cai: Constitutional AI (Bai et al., 2022) end to end on open models, with experiment tracking."""

from pathlib import Path

__version__ = "0.1.0"

# The folder holding the package: the repository root in a checkout (train.py, sweeps/, benchmarks/),
# site-packages in a plain install. The configs and constitutions ship inside the package (CONF, cai/constitutions).
ROOT = Path(__file__).resolve().parent.parent
CONF = Path(__file__).resolve().parent / "conf"  # the Hydra configs: one group per ablation axis
