"""cai: Constitutional AI (Bai et al., 2022) end to end on open models, with experiment tracking."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root: conf/, constitutions/ and sweeps/ live here (the package is installed editable).
ROOT = Path(__file__).resolve().parent.parent
