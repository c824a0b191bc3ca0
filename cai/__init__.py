"""cai: Constitutional AI (Bai et al., 2022) end to end on open models, with experiment tracking."""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE = Path(__file__).resolve().parent
# The folder holding the package: the repository root in a checkout (train.py, conf/, constitutions/,
# sweeps/, benchmarks/), site-packages in a wheel install.
ROOT = PACKAGE.parent


def _shipped(folder: str, marker: str) -> Path:
    """A top-level folder of the repository, wherever this copy of cai runs from.

    A checkout (and an editable install, which runs the checkout) keeps it at the top level, where a
    researcher edits it; a wheel carries it inside the package (pyproject.toml maps it there). The
    marker file, not the folder, decides: a stale `cai/conf/__pycache__` must not hide the real one.
    """
    inside = PACKAGE / folder
    return inside if (inside / marker).is_file() else ROOT / folder


CONF = _shipped("conf", "train.yaml")  # the Hydra configs: one group per ablation axis
CONSTITUTIONS = _shipped("constitutions", "default.yaml")  # the principle files
