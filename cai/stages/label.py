"""Stage `label`: AI feedback on the pairs (or human labels for the HH-RLHF baseline).

For each pair the feedback model sees the conversation, a principle's comparison question and the
two answers as options (A) and (B):
- `label=soft`: p = normalised probability of the two option letters, one forward pass per question;
- `label=hard`: 1 if (A) is more likely after debiasing, else 0;
- `label=cot`: reasoning first, then the letter probabilities, clamped to [clamp_low, clamp_high];
- `label=human`: comparisons and labels come from an hh-rlhf-format file (`label.data=`).
Every question is asked in both orders and averaged (`label.debias`), under
`constitution.ensemble_size` principles drawn per pair (`constitution=ensemble`: all of them).
Helpful pairs (sampled when `pm.helpful_data` is unset) are labelled under a helpfulness question.

With `label.report_data=FILE` the stage also writes the constitution report: how often the same
labeller prefers the human-chosen answer of hh-rlhf comparisons, per principle and for the ensemble.
"""

from __future__ import annotations

import logging
import random

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import StageDir, chunked, file_hash, require_complete, stage_path, stage_rows, write_json
from cai.constitution import Constitution, RLPrinciple
from cai.data import read_hh_rlhf
from cai.labels import Item, Labeller
from cai.metrics import wilson_interval
from cai.pipeline import instantiate
from cai.prompts import HELPFUL_QUESTION
from cai.tracking import Tracker

log = logging.getLogger(__name__)
STAGE = "label"
HELPFUL = RLPrinciple(id="helpfulness", question=HELPFUL_QUESTION)


def make_labeller(cfg: DictConfig, constitution: Constitution) -> Labeller:
    spec = instantiate(cfg.feedback_model)
    return Labeller(
        spec.load_model(),
        spec.load_tokenizer(),
        kind=cfg.label.kind,
        examples=constitution.rl_examples if cfg.label.few_shot else (),
        debias=cfg.label.debias,
        clamp_low=cfg.label.clamp_low,
        clamp_high=cfg.label.clamp_high,
        batch_size=cfg.label.batch_size,
        cot_max_new_tokens=cfg.label.cot_max_new_tokens,
    )


def human_rows(cfg: DictConfig) -> list[dict]:
    """label=human: hh-rlhf comparisons as labelled rows; the order is randomised so that 'a' is not always chosen."""
    comps = read_hh_rlhf(cfg.label.data, field="label.data")
    if cfg.label.n_human:
        comps = comps[: cfg.label.n_human]
    rng = random.Random(cfg.seed)
    rows = []
    for c in comps:
        flip = rng.random() < 0.5
        a, b = (c.rejected, c.chosen) if flip else (c.chosen, c.rejected)
        p = 0.0 if flip else 1.0
        rows.append(
            {
                "id": c.id,
                "kind": "red_team",
                "conversation": c.conversation,
                "response_a": a,
                "response_b": b,
                "p_a": p,
                "label": p,
                "per_principle": {},
                "label_type": "human",
            }
        )
    return rows


def constitution_report(labeller: Labeller, constitution: Constitution, path: str, n: int) -> dict:
    """How often the labeller prefers the human-chosen answer: per principle, for the ensemble, and in one order only."""
    comps = read_hh_rlhf(path, field="label.report_data")[: n or None]
    principles = tuple(constitution.rl_principles)
    results = labeller.label([Item(c.conversation, c.chosen, c.rejected, principles) for c in comps], desc="constitution report")
    agree = {p.id: sum(r["per_principle"][p.id] > 0.5 for r in results) / len(results) for p in principles}
    ensemble = sum(r["p_a"] > 0.5 for r in results) / len(results)
    report = {
        "data": str(path),
        "comparisons": len(results),
        "label_type": labeller.kind,
        "debias": labeller.debias,
        "few_shot": bool(labeller.examples),
        "ensemble_agreement": ensemble,
        "ensemble_interval": wilson_interval(ensemble, len(results)),
        "per_principle_agreement": agree,
        "mean_p_chosen": sum(r["p_a"] for r in results) / len(results),
    }
    if labeller.debias:  # the same questions in the first order alone, to show the letter bias it removes
        one = Labeller(labeller.model, labeller.tok, "soft", labeller.examples, debias=False, batch_size=labeller.batch_size)
        first = one.label([Item(c.conversation, c.chosen, c.rejected, principles) for c in comps], desc="report, one order")
        report["single_order_ensemble_agreement"] = sum(r["p_a"] > 0.5 for r in first) / len(first)
    return report


def run(cfg: DictConfig, tracker: Tracker) -> dict:
    constitution: Constitution = instantiate(cfg.constitution)
    label_cfg = OmegaConf.to_container(cfg.label)
    if cfg.label.kind == "human":
        inputs = {"data": file_hash(cfg.label.data)}
    else:
        upstream = require_complete(cfg, "pairs", STAGE)
        inputs = {"pairs": upstream["fingerprint"], "constitution": constitution.digest()}
    config = {
        "label": label_cfg,
        "feedback_model": instantiate(cfg.feedback_model).identity(),
        "ensemble_size": constitution.ensemble_size,
        "principle": constitution.principle,
        "seed": cfg.seed,
    }
    out = StageDir(cfg, STAGE, config, inputs)
    if out.is_complete():
        log.info("label: up to date at %s, skipping", out.path)
        return {"metric": f"{out.manifest()['counts']['labels']} labels (cached)", "path": str(out.path)}
    out.open()

    labeller: Labeller | None = None
    if cfg.label.kind == "human":
        rows = human_rows(cfg)
        out.write_shards([rows], lambda chunk, i: chunk, "label shards")
    else:
        pairs = stage_rows(stage_path(cfg, "pairs"))

        def make(chunk: list[dict], index: int) -> list[dict]:
            nonlocal labeller
            labeller = labeller or make_labeller(cfg, constitution)
            items, drawn = [], []
            for r in chunk:
                # The principles of a pair depend on (seed, pair id) alone, so a resumed run draws the same.
                principles = (
                    (HELPFUL,) if r["kind"] == "helpful" else tuple(constitution.draw_rl(random.Random(f"{cfg.seed}/{r['id']}/label")))
                )
                conversation = [{"role": "user", "content": r["prompt"]}]
                items.append(Item(conversation, r["response_a"], r["response_b"], principles))
                drawn.append(conversation)
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
                for r, conv, res in zip(chunk, drawn, results)
            ]

        out.write_shards(chunked(pairs, cfg.pairs.shard_size), make, "label shards")

    rows = out.rows()
    harmless = [r for r in rows if r["kind"] == "red_team"]
    stats = {
        "label/data/labels": len(rows),
        "label/data/mean_p_a": sum(r["p_a"] for r in rows) / len(rows),
        "label/data/confident_rate": sum(abs(r["p_a"] - 0.5) > 0.25 for r in rows) / len(rows),
    }
    tracker.log(stats)
    columns = ["id", "kind", "prompt", "response_a", "response_b", "p_a", "label", "principles", "label_type"]
    tracker.table(
        "label/samples",
        columns,
        [
            [
                r["id"],
                r["kind"],
                r["conversation"][-1]["content"],
                r["response_a"],
                r["response_b"],
                r["p_a"],
                r["label"],
                ",".join(r["per_principle"]),
                r["label_type"],
            ]
            for r in rows[:32]
        ],
    )
    counts = {"labels": len(rows), "harmlessness": len(harmless), "helpfulness": len(rows) - len(harmless)}
    extra = {}
    if cfg.label.report_data and cfg.label.kind != "human":
        labeller = labeller or make_labeller(cfg, constitution)
        report = constitution_report(labeller, constitution, cfg.label.report_data, cfg.label.report_n)
        write_json(out.path / "report.json", report)
        tracker.log({"label/report/ensemble_agreement": report["ensemble_agreement"]})
        tracker.table(
            "label/report",
            ["principle", "agreement"],
            [[k, v] for k, v in report["per_principle_agreement"].items()] + [["ensemble", report["ensemble_agreement"]]],
        )
        extra["report"] = {k: report[k] for k in ("comparisons", "ensemble_agreement", "ensemble_interval")}
        log.info(
            "constitution report: the labeller agrees with the human choice %.1f%% of the time (ensemble)",
            100 * report["ensemble_agreement"],
        )
    out.complete(counts, extra)
    tracker.artifact(out.path, name="labels", type="dataset")
    return {"metric": f"{len(rows)} {cfg.label.kind} labels, mean p_a {stats['label/data/mean_p_a']:.2f}", "path": str(out.path)}
