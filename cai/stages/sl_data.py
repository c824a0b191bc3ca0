"""Stage `sl_data`: SL-CAI data. The helpful model answers red-team prompts, then critiques and revises.

For every red-team prompt:
  1. the initial (helpful-only) model answers;
  2. for `sl.n_revisions` rounds, a principle is drawn at random from the SL constitution; the model
     critiques its latest answer under the principle's critique request, then revises it under its
     revision request (`sl.critique=false` revises without a critique: the paper's ablation).
Every round is a row {id, kind, prompt, response, round, principle_id, critique, revision}, so SFT
can train on any revision k. Helpfulness prompts are answered plainly and mixed in
(`sl.helpful_mix` helpful rows per red-team prompt), as the paper does to keep the model helpful.

Work is done shard by shard (`sl.shard_size` prompts). Within a shard every step is one batched
generation across its prompts; a finished shard is written atomically and never rewritten, so an
interrupted run resumes at the first missing shard. Principle draws and sampling seeds depend only
on the seed, the prompt and the shard, so a resumed run writes what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import random
import time

from omegaconf import DictConfig

from cai.artifacts import chunked, fingerprint
from cai.config import instantiate
from cai.constitution import Constitution
from cai.data import Prompt, load_prompts, sample_prompts
from cai.distributed import all_gather
from cai.generation import Generator, derive_seed
from cai.stages import Context, Stage
from cai.templates import clean, critique_conversation, few_shot_turns, revision_conversation

log = logging.getLogger(__name__)


def select_prompts(cfg: DictConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The red-team prompts, and `sl.helpful_mix` helpfulness prompts per red-team prompt."""
    red = load_prompts("red_team", cfg.data.red_team, "train", cfg.data.n_red_team, cfg.seed)
    pool = load_prompts("helpful", cfg.data.helpful, "train", cfg.data.n_helpful, cfg.seed)
    wanted = round(cfg.sl.helpful_mix * len(red))
    if wanted > len(pool):
        log.warning("sl.helpful_mix asks for %d helpful prompts but only %d are available; using all", wanted, len(pool))
    return red, sample_prompts(pool, wanted, f"{cfg.seed}:sl_data:helpful_mix")


def inputs(cfg: DictConfig) -> dict:
    """The content this stage's rows depend on beyond its config: the prompts and the constitution."""
    red, helpful = select_prompts(cfg)
    return {
        "red_team": fingerprint([(p.id, p.text) for p in red]),
        "helpful": fingerprint([(p.id, p.text) for p in helpful]),
        "constitution": instantiate(cfg.constitution).digest(),
    }


class GenerationTimer:
    """Times generation calls and counts the tokens they make, for the tokens/s the benchmark and W&B report."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0

    def generate(self, gen: Generator, convs, params, desc):
        t = time.perf_counter()
        out = gen.generate(convs, params, desc=desc)
        self.seconds += time.perf_counter() - t
        self.tokens += sum(len(c.token_ids) for c in out)
        return out


def draw(cfg: DictConfig, constitution: Constitution, prompt: Prompt, round_: int) -> tuple:
    """The principle and few-shot turns of one prompt's round: they depend on (seed, prompt id, round) alone."""
    rng = random.Random(f"{cfg.seed}/{prompt.id}/{round_}")
    principle = constitution.draw_sl(rng)
    shots = rng.sample(constitution.sl_examples, min(cfg.sl.n_few_shot, len(constitution.sl_examples)))
    return principle, few_shot_turns(shots, constitution, cfg.sl.critique)


def make_rows(
    items: list[tuple[str, Prompt]], shard: int, cfg: DictConfig, constitution: Constitution, gen: Generator, timer: GenerationTimer
) -> list[dict]:
    """All rows of one shard: batched initial answers, then batched critiques and revisions per round."""
    sl = cfg.sl

    def params(step: int):  # one sampling stream per (seed, shard, step)
        return gen.params(max_new_tokens=sl.max_new_tokens, seed=derive_seed(cfg.seed, "sl_data", shard, step))

    answers = timer.generate(gen, [[{"role": "user", "content": p.text}] for _, p in items], params(0), f"shard {shard}: answers")
    rows: list[dict] = []
    red = []
    for (kind, p), a in zip(items, answers):
        if kind == "helpful":
            row = {"id": p.id, "kind": kind, "prompt": p.text, "response": a.text}
            rows.append({**row, "round": 0, "principle_id": None, "critique": None, "revision": None})
        else:
            red.append((p, a.text))
    latest = [answer for _, answer in red]
    for r in range(1, sl.n_revisions + 1):
        draws = [draw(cfg, constitution, p, r) for p, _ in red]
        critiques: list[str | None] = [None] * len(red)
        if sl.critique:
            convs = [critique_conversation(p.text, latest[i], draws[i][0], draws[i][1]) for i, (p, _) in enumerate(red)]
            critiques = [clean(c.text) for c in timer.generate(gen, convs, params(2 * r - 1), f"shard {shard}: critiques {r}")]
        convs = [revision_conversation(p.text, latest[i], draws[i][0], critiques[i], draws[i][1]) for i, (p, _) in enumerate(red)]
        revisions = [clean(c.text) for c in timer.generate(gen, convs, params(2 * r), f"shard {shard}: revisions {r}")]
        for i, (p, initial) in enumerate(red):
            rows.append(
                {
                    "id": p.id,
                    "kind": "red_team",
                    "prompt": p.text,
                    "response": initial,
                    "round": r,
                    "principle_id": draws[i][0].id,
                    "critique": critiques[i],
                    "revision": revisions[i],
                }
            )
        latest = [rev or prev for rev, prev in zip(revisions, latest)]  # an empty revision keeps the last answer
    return rows


def build(ctx: Context) -> dict:
    cfg, out = ctx.cfg, ctx.out
    red, helpful = select_prompts(cfg)
    ctx.extra["prompt_ids"] = {"red_team": [p.id for p in red], "helpful": [p.id for p in helpful]}
    constitution: Constitution = instantiate(cfg.constitution)
    # Helpful prompts are spread across shards, so every shard's batches mix both kinds.
    items = [("red_team", p) for p in red] + [("helpful", p) for p in helpful]
    random.Random(cfg.seed).shuffle(items)
    gen: Generator | None = None  # loaded only if some shard is missing
    timer = GenerationTimer()

    def make(chunk: list[tuple[str, Prompt]], index: int) -> list[dict]:
        nonlocal gen
        if gen is None:
            gen = instantiate(cfg.generation, model=instantiate(cfg.model))
            ctx.extra["models"] = {"policy": gen.placement()}
        return make_rows(chunk, index, cfg, constitution, gen, timer)

    try:
        shards = chunked(items, cfg.sl.shard_size)
        resumed = out.write_shards(shards, make, "sl_data shards")
    finally:
        if gen is not None:
            gen.close()
    rows = out.rows()
    # With several ranks: every rank's tokens, over the slowest rank's time; plus what the shards
    # written by an earlier, interrupted run took (their generation, and the critique parsing beside it).
    tokens = sum(all_gather(timer.tokens)) + int(out.earlier.get("generated_tokens", 0))
    seconds = max(all_gather(timer.seconds)) + out.earlier.get("seconds", 0.0)
    tokens_per_s = tokens / seconds if seconds else 0.0
    ctx.tracker.log({"sl_data/gen/tokens_per_s": tokens_per_s, "sl_data/gen/tokens": tokens, "sl_data/data/rows": len(rows)})
    columns = ["id", "kind", "round", "principle_id", "prompt", "response", "critique", "revision"]
    ctx.tracker.table("sl_data/samples", columns, [[r[c] for c in columns] for r in rows[:32]])
    ctx.extra["tokens_per_s"] = round(tokens_per_s, 1)
    return {
        "rows": len(rows),
        "red_team_prompts": len(red),
        "helpful_prompts": len(helpful),
        "revision_rows": sum(r["kind"] == "red_team" for r in rows),
        "shards": len(shards),
        "shards_resumed": resumed,
        "generated_tokens": tokens,
        "generation_seconds": round(seconds, 1),
    }


def metric(counts: dict) -> str:
    tokens_per_s = counts["generated_tokens"] / counts["generation_seconds"] if counts.get("generation_seconds") else 0.0
    return f"{counts['rows']} rows, {tokens_per_s:.0f} gen tok/s"


STAGE = Stage(
    name="sl_data",
    writes="`shard-*.jsonl`: one row per red-team round and per helpful answer: `id, kind, prompt, response, round, principle_id, critique, revision`",
    description="SL-CAI critique/revision data",
    build=build,
    lineage=("model", "constitution.path", "data", "sl", "generation", "seed"),
    inputs=inputs,
    metric=metric,
    artifact=("sl_data", "dataset", ""),
)
