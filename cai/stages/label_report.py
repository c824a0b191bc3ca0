"""Stage `label_report`: measure the configured labeller against human choices, before spending GPU hours.

    python train.py stage=label_report label.report_data=FILE [label=likelihood] [label.report_split=report]

Labels FILE's comparisons (any preference format, cai/data) with the labeller that `label=`,
`feedback_model=` and `constitution=` describe, under every RL principle, and prints per principle and
for the ensemble: agreement with the human choice (95% interval), agreement in the first order alone
(letter bias), mean |p - 0.5|, ECE, and forward passes and seconds per comparison. Writes
`report.json` and `calibration.png` under ${paths.output}/label_report/, a W&B table and the plot.
`label.report_split=tune|report` takes the even or odd comparisons of FILE: choose methods and
temperatures on one half and report them on the other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cai.artifacts import write_json
from cai.config import instantiate
from cai.data import read_hh_rlhf
from cai.errors import CaiError
from cai.labels import labeller_from_config, labeller_report, report_principles, split_half
from cai.plots import calibration_plot
from cai.stages import Context, Stage

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    if not cfg.label.report_data:
        raise CaiError(
            "label.report_data: stage=label_report needs a file of human comparisons, e.g. label.report_data=harmless-base-dev.jsonl.gz"
        )
    if cfg.label.kind == "human":
        raise CaiError("label: stage=label_report measures an AI labeller; choose label=soft, hard, cot, likelihood or contrastive")
    split_half([], cfg.label.report_split)  # a bad split name fails before any model loads


def print_report(report: dict) -> None:
    header = f"{'principle':28s} {'agreement':>9s}  {'95% interval':15s} {'one order':>9s} {'|p-0.5|':>8s} {'ECE':>6s}"
    print(f"\nlabeller report: {report['label_type']} on {report['comparisons']} comparisons of {report['data']} ({report['split']})")
    print(header)
    for name, m in [*report["per_principle"].items(), ("ensemble", report["ensemble"])]:
        low, high = m["interval_95"]
        print(
            f"{name:28s} {m['agreement']:9.3f}  [{low:.3f}, {high:.3f}]  {m['one_order_agreement']:9.3f} {m['mean_confidence']:8.3f} {m['ece']:6.3f}"
        )
    print(
        f"cost: {report['forward_passes_per_comparison']:.1f} forward passes and {report['seconds_per_comparison']:.2f} s per comparison\n"
    )


def build(ctx: Context) -> dict:
    cfg = ctx.cfg
    constitution = instantiate(cfg.constitution)
    comps = split_half(read_hh_rlhf(cfg.label.report_data, field="label.report_data"), cfg.label.report_split)
    comps = comps[: cfg.label.report_n or None]
    report = {"data": str(cfg.label.report_data), "split": cfg.label.report_split}
    report |= labeller_report(labeller_from_config(cfg, constitution), comps, report_principles(constitution), cfg.seed)
    out = Path(cfg.paths.output) / "label_report"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    calibration_plot(report["calibration"]["p_a"], report["calibration"]["a_chosen"], out / "calibration.png")
    print_report(report)
    ens = report["ensemble"]
    rows = [
        [k, m["agreement"], *m["interval_95"], m["one_order_agreement"], m["mean_confidence"], m["ece"]]
        for k, m in report["per_principle"].items()
    ]
    columns = ["principle", "agreement", "low", "high", "one_order_agreement", "mean_confidence", "ece"]
    ctx.tracker.table(
        "label_report/principles", columns, [*rows, ["ensemble", ens["agreement"], *ens["interval_95"], *[ens[c] for c in columns[4:]]]]
    )
    ctx.tracker.log(
        {f"label_report/{cfg.label.report_split}/{k}": ens[k] for k in ("agreement", "one_order_agreement", "mean_confidence", "ece")}
    )
    ctx.tracker.image("label_report/calibration", out / "calibration.png")
    low, high = ens["interval_95"]
    return {"metric": f"agreement {ens['agreement']:.3f} [{low:.3f}, {high:.3f}]", "path": str(out / "report.json")}


STAGE = Stage(
    name="label_report",
    writes="`report.json` (agreement per principle and for the ensemble, with intervals) and `calibration.png`",
    description="the labeller measured against human choices",
    build=build,
    check=check,
    keyed=False,
)
