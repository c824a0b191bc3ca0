"""The command line: `python train.py [overrides]` or `cai-train [overrides]`; everything happens in cai.pipeline.run(cfg)."""

import sys

import hydra
from omegaconf import DictConfig

import cai
import cai.config  # noqa: F401  (registers the typed schemas the YAML files build on)
from cai.errors import CaiError
from cai.pipeline import run


# conf/ at the top of a checkout, or inside the package in a wheel (cai.CONF). A user adds their own
# options with `--config-dir DIR` or `hydra.searchpath=[file://DIR]`, without editing this one.
@hydra.main(version_base=None, config_path=str(cai.CONF), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except CaiError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
