"""Stage `pairs`: the SFT model samples two answers per prompt, for the AI labeller to compare.

Red-team prompts give the harmlessness comparisons. Helpfulness prompts are sampled too when the
preference model has no human helpfulness data (`pm.helpful_data` unset): they are then labelled
by the AI under a helpfulness question. Both answers of a prompt are sampled in the same batched
call at `pairs.temperature`; shards are written whole and an interrupted run resumes.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from cai.artifacts import chunked, fingerprint
from cai.config import instantiate
from cai.data import Prompt, load_prompts
from cai.generation import Generator, derive_seed
from cai.stages import Context, Stage

log = logging.getLogger(__name__)


def select_prompts(cfg: DictConfig) -> list[tuple[str, Prompt]]:
    items = [("red_team", p) for p in load_prompts("red_team", cfg.data.red_team, "train", cfg.data.n_red_team, cfg.seed)]
    if cfg.pm.helpful_data is None:  # helpfulness comparisons will be AI-labelled: sample them here
        items += [("helpful", p) for p in load_prompts("helpful", cfg.data.helpful, "train", cfg.data.n_helpful, cfg.seed)]
    return items


def build(ctx: Context) -> dict:
    cfg, out = ctx.cfg, ctx.out
    sft = ctx.upstream["sft"].model_spec(f"sft({cfg.model.name})", cfg.model.dtype, cfg.paths.cache)
    gen: Generator | None = None

    def make(chunk: list[tuple[str, Prompt]], index: int) -> list[dict]:
        nonlocal gen
        if gen is None:
            gen = instantiate(cfg.generation, model=sft)
            ctx.extra["models"] = {"sft_policy": gen.placement()}
        params = gen.params(
            max_new_tokens=cfg.pairs.max_new_tokens, temperature=cfg.pairs.temperature, seed=derive_seed(cfg.seed, "pairs", index)
        )
        convs = [[{"role": "user", "content": p.text}] for _, p in chunk]
        answers = gen.generate(convs + convs, params, desc=f"pairs shard {index}")  # both samples in one batched call
        n = len(chunk)
        return [
            {"id": p.id, "kind": kind, "prompt": p.text, "response_a": answers[i].text, "response_b": answers[n + i].text}
            for i, (kind, p) in enumerate(chunk)
        ]

    try:
        items = select_prompts(cfg)
        ctx.extra["prompt_ids"] = {kind: [p.id for k, p in items if k == kind] for kind in ("red_team", "helpful")}
        out.write_shards(chunked(items, cfg.pairs.shard_size), make, "pairs shards")
    finally:
        if gen is not None:
            gen.close()
    rows = out.rows()
    same = sum(r["response_a"] == r["response_b"] for r in rows)
    ctx.tracker.log({"pairs/data/pairs": len(rows), "pairs/data/identical_rate": same / max(1, len(rows))})
    columns = ["id", "kind", "prompt", "response_a", "response_b"]
    ctx.tracker.table("pairs/samples", columns, [[r[k] for k in columns] for r in rows[:32]])
    return {
        "pairs": len(rows),
        "red_team": sum(r["kind"] == "red_team" for r in rows),
        "helpful": sum(r["kind"] == "helpful" for r in rows),
        "identical": same,
    }


STAGE = Stage(
    name="pairs",
    writes="`shard-*.jsonl`: two sampled answers per prompt: `id, kind, prompt, response_a, response_b`",
    description="RL-CAI answer pairs",
    build=build,
    after="sft",
    lineage=("pairs", "pm.helpful_data"),
    reads=("sft",),
    inputs=lambda cfg: {"prompts": fingerprint([(k, p.id, p.text) for k, p in select_prompts(cfg)])},
    metric=lambda c: f"{c['pairs']} pairs",
    artifact=("pairs", "dataset", ""),
)
