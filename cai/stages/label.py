"""Stage `label`: AI feedback on the pairs (or human labels for the HH-RLHF baseline).

For each pair the feedback model sees the conversation, a principle's comparison question and the
two answers as options (A) and (B):
- `label=soft`: p = normalised probability of the two option letters, one forward pass per question;
- `label=hard`: 1 if (A) is more likely after debiasing, else 0;
- `label=cot`: reasoning first, then the letter probabilities, clamped to [clamp_low, clamp_high];
- `label=likelihood` / `label=contrastive`: no question; the answers' likelihoods under the principle
  (minus, for contrastive, under its opposite), two or four forward passes per principle;
- `label=human`: comparisons and labels come from an hh-rlhf-format file (`label.data=`).
Every question is asked in both orders and averaged (`label.debias`), under
`constitution.ensemble_size` principles drawn per pair (`constitution=ensemble`: all of them).
Helpful pairs (sampled when `pm.helpful_data` is unset) are labelled under a helpfulness question.

With `label.report_data=FILE` the stage also writes the constitution report (`report.json`, the same
measures as `stage=label_report`): how often the same labeller prefers the human-chosen answer of
those comparisons, per principle and for the ensemble.
"""

from __future__ import annotations

import logging
import random

from omegaconf import DictConfig

from cai.artifacts import chunked, write_json, write_jsonl
from cai.config import instantiate
from cai.constitution import Constitution
from cai.data import human_pairs, read_hh_rlhf, source_hash
from cai.distributed import is_rank_zero
from cai.labels import Item, Labeller, engine_identity, labeller_from_config, labeller_report, report_principles
from cai.stages import Context, Stage
from cai.templates import HELPFULNESS

log = logging.getLogger(__name__)


def human_rows(cfg: DictConfig) -> list[dict]:
    """label=human: hh-rlhf comparisons as labelled rows, the chosen answer on a random side."""
    comps = read_hh_rlhf(cfg.label.data, field="label.data")
    comps = comps[: cfg.label.n_human] if cfg.label.n_human else comps
    return [{**r, "kind": "red_team", "p_a": r["label"], "per_principle": {}, "label_type": "human"} for r in human_pairs(comps, cfg.seed)]


def ai_rows(cfg: DictConfig, constitution: Constitution, chunk: list[dict], labeller: Labeller, index: int) -> list[dict]:
    """AI labels of one shard of pairs: harmlessness under drawn principles, helpfulness under HELPFULNESS."""
    items, conversations = [], []
    for r in chunk:
        # The principles of a pair depend on (seed, pair id) alone, so a resumed run draws the same.
        rng = random.Random(f"{cfg.seed}/{r['id']}/label")
        principles = (HELPFULNESS,) if r["kind"] == "helpful" else tuple(constitution.draw_rl(rng))
        conversation = [{"role": "user", "content": r["prompt"]}]
        items.append(Item(conversation, r["response_a"], r["response_b"], principles))
        conversations.append(conversation)
    results = labeller.label(items, desc=f"label shard {index}")
    return [
        {
            "id": r["id"],
            "kind": r["kind"],
            "conversation": conv,
            "response_a": r["response_a"],
            "response_b": r["response_b"],
            "p_a": res["p_a"],
            "label": res["label"],
            "per_principle": res["per_principle"],
            "label_type": cfg.label.kind,
        }
        for r, conv, res in zip(chunk, conversations, results)
    ]


def log_rows(tracker, rows: list[dict]) -> dict:
    stats = {
        "label/data/labels": len(rows),
        "label/data/mean_p_a": sum(r["p_a"] for r in rows) / len(rows),
        "label/data/confident_rate": sum(abs(r["p_a"] - 0.5) > 0.25 for r in rows) / len(rows),
    }
    tracker.log(stats)
    columns = ["id", "kind", "prompt", "response_a", "response_b", "p_a", "label", "principles", "label_type"]
    table = [
        [r["id"], r["kind"], r["conversation"][-1]["content"], r["response_a"], r["response_b"], r["p_a"], r["label"]]
        + [",".join(r["per_principle"]), r["label_type"]]
        for r in rows[:32]
    ]
    tracker.table("label/samples", columns, table)
    return stats


def write_report(ctx: Context, labeller: Labeller, constitution: Constitution) -> None:
    """The constitution report: the labeller on label.report_data's human comparisons, every RL principle."""
    comps = read_hh_rlhf(ctx.cfg.label.report_data, field="label.report_data")[: ctx.cfg.label.report_n or None]
    report = {"data": str(ctx.cfg.label.report_data), **labeller_report(labeller, comps, report_principles(constitution), ctx.cfg.seed)}
    write_json(ctx.out.path / "report.json", report)
    ens = report["ensemble"]
    ctx.tracker.log({"label/report/ensemble_agreement": ens["agreement"]})
    per = [[k, v["agreement"]] for k, v in report["per_principle"].items()]
    ctx.tracker.table("label/report", ["principle", "agreement"], per + [["ensemble", ens["agreement"]]])
    ctx.extra["report"] = {
        "comparisons": report["comparisons"],
        "ensemble_agreement": ens["agreement"],
        "ensemble_interval": ens["interval_95"],
    }
    log.info("constitution report: the labeller agrees with the human choice %.1f%% of the time (ensemble)", 100 * ens["agreement"])


def build(ctx: Context) -> dict:
    cfg, out = ctx.cfg, ctx.out
    constitution: Constitution = instantiate(cfg.constitution)
    labeller: Labeller | None = None
    if cfg.label.kind == "human":
        out.write_shards([human_rows(cfg)], lambda chunk, i: chunk, "label shards")
    else:

        def make(chunk: list[dict], index: int) -> list[dict]:
            nonlocal labeller
            labeller = labeller or labeller_from_config(cfg, constitution)
            ctx.extra["models"] = {"feedback_model": labeller.placement()}
            return ai_rows(cfg, constitution, chunk, labeller, index)

        out.write_shards(chunked(ctx.upstream["pairs"].rows(), cfg.pairs.shard_size), make, "label shards")
    rows = out.rows()
    if is_rank_zero():
        write_jsonl(out.path / "preferences.jsonl", [preference_row(r) for r in rows])
    stats = log_rows(ctx.tracker, rows)
    if cfg.label.report_data and cfg.label.kind != "human" and is_rank_zero():
        labeller = labeller or labeller_from_config(cfg, constitution)
        write_report(ctx, labeller, constitution)
    if labeller is not None:
        labeller.close()
    harmless = sum(r["kind"] == "red_team" for r in rows)
    return {
        "labels": len(rows),
        "harmlessness": harmless,
        "helpfulness": len(rows) - harmless,
        "kind": cfg.label.kind,
        "mean_p_a": round(stats["label/data/mean_p_a"], 4),
    }


def preference_row(row: dict) -> dict:
    """A label as a preference row (TRL's conversational format, as `datasets` and RewardTrainer read it):
    `prompt` (the conversation), `chosen` and `rejected` (the answer the label prefers first),
    plus `p_chosen` (the label the PM trains on, >= 0.5: the soft probability, 1.0 for a hard or human label),
    the principles asked and each one's P(chosen)."""
    a_first = row["label"] >= 0.5
    each = row.get("per_principle") or {}
    chosen, rejected = (row["response_a"], row["response_b"]) if a_first else (row["response_b"], row["response_a"])
    return {
        "id": row["id"],
        "kind": row["kind"],
        "prompt": row["conversation"],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": row["label"] if a_first else 1.0 - row["label"],
        "principles": list(each),
        "p_chosen_by_principle": [p if a_first else 1.0 - p for p in each.values()],
        "label_type": row["label_type"],
    }


def inputs(cfg: DictConfig) -> dict:
    if cfg.label.kind == "human":
        return {"data": source_hash(cfg.label.data, "label.data")}
    read = {"constitution": instantiate(cfg.constitution).digest()}
    if (engine := engine_identity(cfg)) is not None:
        read["engine"] = engine  # vLLM's precision decides the labels too
    return read


STAGE = Stage(
    name="label",
    writes="`shard-*.jsonl`: `id, kind, conversation, response_a, response_b, p_a, label, per_principle, label_type`; "
    "`preferences.jsonl`: the same as preference rows (`prompt`, `chosen`, `rejected`, `p_chosen`, `principles`, `p_chosen_by_principle`; TRL's format); "
    "`report.json` with `label.report_data`",
    description="RL-CAI AI feedback labels",
    build=build,
    after="pairs",
    lineage=("feedback_model", "constitution", "label"),
    logging_only=("label.report_data", "label.report_n", "label.report_split", "label.batch_size"),
    reads=lambda cfg: () if cfg.label.kind == "human" else ("pairs",),
    inputs=inputs,
    metric=lambda c: f"{c['labels']} {c['kind']} labels, mean p_a {c['mean_p_a']:.2f}",
    artifact=("labels", "dataset", ""),
)
