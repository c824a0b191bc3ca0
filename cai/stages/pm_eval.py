"""Stage `pm_eval`: score a trained preference model on any hh-rlhf-format file.

    python train.py stage=pm_eval pm.checkpoint=DIR pm.eval_data=FILE

Prints the accuracy (the chosen answer scored above the rejected one; exact ties count half) with
its 95% Wilson interval, and writes `metrics.json` under ${paths.artifacts}/pm_eval/<file name>-<key>/,
keyed by the PM's weights, the file's content and pm.n_eval.
`pm.checkpoint` defaults to this run's PM, `${paths.artifacts}/pm/<key>/model`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig

from cai.artifacts import fingerprint, write_json
from cai.data import source_hash
from cai.errors import CaiError
from cai.reward import PreferenceModel, hh_accuracy, pm_identity
from cai.stages import Context, Stage

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    if not cfg.pm.eval_data:
        raise CaiError("pm.eval_data: stage=pm_eval needs an hh-rlhf-format file, e.g. pm.eval_data=path/to/harmless-base-test.jsonl.gz")


def build(ctx: Context) -> dict:
    cfg = ctx.cfg
    checkpoint = Path(cfg.pm.checkpoint).expanduser() if cfg.pm.checkpoint else ctx.upstream["pm"].model_dir
    pm, tokenizer = PreferenceModel.load(checkpoint)
    result = hh_accuracy(
        pm, tokenizer, cfg.pm.eval_data, cfg.pm.max_length, cfg.pm.n_eval, cfg.pm.batch_size, share_prompt=cfg.pm.share_prompt
    )
    result.pop("calibration")  # the per-comparison points; metrics.json keeps the numbers
    result["checkpoint"] = str(checkpoint)
    # One directory per (PM, data file): two PMs scored on files of the same name never overwrite each other.
    key = fingerprint({"pm": pm_identity(checkpoint), "data": source_hash(cfg.pm.eval_data, "pm.eval_data"), "n": cfg.pm.n_eval})
    name = re.sub(r"[^\w-]+", "_", Path(cfg.pm.eval_data).name.split(".")[0])  # a hub spec (hf:a/b:c) too
    out = Path(cfg.paths.artifacts).expanduser() / "pm_eval" / f"{name}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    low, high = result["interval_95"]
    print(
        f"pm_eval: accuracy {result['accuracy']:.4f} (95% interval {low:.4f}-{high:.4f}) on {result['comparisons']} comparisons of {cfg.pm.eval_data}"
    )
    ctx.tracker.log(
        {
            "pm_eval/hh/accuracy": result["accuracy"],
            "pm_eval/hh/accuracy_low": low,
            "pm_eval/hh/accuracy_high": high,
            "pm_eval/hh/ece": result["ece"],
        }
    )
    metric = f"accuracy {result['accuracy']:.3f} [{low:.3f}, {high:.3f}], ECE vs humans {result['ece']:.3f}"
    return {"metric": metric, "path": str(out / "metrics.json")}


STAGE = Stage(
    name="pm_eval",
    writes="`artifacts/pm_eval/<file>-<key>/metrics.json`: accuracy with its interval and ECE against human choices",
    description="preference-model evaluation",
    build=build,
    reads=lambda cfg: () if cfg.pm.checkpoint else ("pm",),  # this run's PM unless pm.checkpoint names one
    check=check,
    keyed=False,
)
