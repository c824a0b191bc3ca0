"""Hydra callbacks: after a multirun (`python train.py -m label=hard,soft,cot`), draw the cross-run frontier."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from cai.errors import CaiError
from cai.tracking import multirun_group

log = logging.getLogger(__name__)


class FrontierAfterMultirun(Callback):
    """Runs `stage=frontier` on the jobs of the multirun that just ended, if they ran their eval stage."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.stage.name not in ("all", "eval"):
            return
        from cai.pipeline import run

        sweep_dir = Path(config.hydra.sweep.dir)
        cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        with open_dict(cfg):
            cfg.pop("hydra")
            cfg.stage.name = "frontier"
            cfg.eval.runs = [str(sweep_dir)]
            cfg.paths.output = str(sweep_dir / "frontier")
            cfg.run_name = "frontier"
            cfg.logger.group = cfg.logger.group or multirun_group(sweep_dir)  # beside its jobs in W&B
        try:
            run(cfg)
        except CaiError as err:  # a failed job leaves nothing to merge; say so, the jobs' own results stand
            log.error("cross-run frontier not drawn: %s", err)
