"""Benchmark SL-CAI on the embedded model: the quickstart's SL data + SFT, and batched vs one-by-one generation.

    python benchmarks/bench_sl.py [--red-team 32] [--compare 16] [extra hydra overrides...]

Prints wall times, generation tokens/s, training tokens/s, and the speed-up of batched generation
over answering the same prompts one at a time with the same backend, measured in this one run.
Targets: SL data + SFT <= 6 min on 2 CPU cores; batched >= 4x one-at-a-time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import cai
import cai.config  # noqa: F401
from cai.config import instantiate
from cai.data import load_prompts
from cai.generation.hf import HFGenerator
from cai.pipeline import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--red-team", type=int, default=32, help="red-team prompts in the SL data")
    ap.add_argument("--compare", type=int, default=16, help="prompts answered batched and one by one")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cai-bench-"))
    overrides = [f"paths.root={root}", f"paths.output={root}/out", "logger=none", f"data.n_red_team={args.red_team}", *args.overrides]
    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)

    spec = instantiate(cfg.model)
    spec.local_dir()  # convert once, outside the timings
    t = time.perf_counter()
    spec.load_model()
    load_s = time.perf_counter() - t

    t = time.perf_counter()
    cfg.stage.name = "sl_data"
    run(cfg)
    sl_s = time.perf_counter() - t
    t = time.perf_counter()
    cfg.stage.name = "sft"
    run(cfg)
    sft_s = time.perf_counter() - t
    sl_m = json.loads((root / "artifacts" / "sl_data" / "latest" / "manifest.json").read_text())
    sft_m = json.loads((root / "artifacts" / "sft" / "latest" / "manifest.json").read_text())

    # Batched vs one at a time: same backend, same prompts, same sampling settings.
    prompts = [[{"role": "user", "content": p.text}] for p in load_prompts("red_team", n=args.compare)]
    gen = HFGenerator(spec, batch_size=args.compare)
    params = gen.params(max_new_tokens=args.max_new_tokens, seed=0)
    t = time.perf_counter()
    batched = gen.generate(prompts, params)
    batched_s = time.perf_counter() - t
    batched_tok = sum(len(c.token_ids) for c in batched)
    t = time.perf_counter()
    single_tok = 0
    for conv in prompts:
        single_tok += sum(len(c.token_ids) for c in gen.generate([conv], params))
    single_s = time.perf_counter() - t

    print("\n== SL-CAI benchmark (embedded SmolLM2-135M, this machine)")
    print(f"model load (converted checkpoint)   {load_s:6.1f} s")
    print(
        f"sl_data: {sl_m['counts']['red_team_prompts']} red-team + {sl_m['counts']['helpful_prompts']} helpful prompts, {cfg.sl.n_revisions} revision(s)"
    )
    print(f"  wall                              {sl_s:6.1f} s")
    print(f"  generation tokens/s               {sl_m['tokens_per_s']:6.1f}  ({sl_m['counts']['generated_tokens']} tokens)")
    print(f"sft: {sft_m['counts']['train_examples']} examples, {sft_m['counts']['optimizer_steps']} steps")
    print(f"  wall                              {sft_s:6.1f} s")
    print(f"  training tokens/s                 {sft_m['counts']['train_tokens_per_s']:6.1f}")
    print(f"  train loss / val loss             {sft_m['counts']['train_loss']} / {sft_m['counts']['val_loss']}")
    print(f"SL data + SFT wall                  {sl_s + sft_s:6.1f} s  (target <= 360 s)")
    print(f"answering {len(prompts)} prompts batched        {batched_s:6.1f} s, {batched_tok / batched_s:6.1f} tok/s")
    print(f"answering {len(prompts)} prompts one at a time  {single_s:6.1f} s, {single_tok / single_s:6.1f} tok/s")
    print(f"batched speed-up (wall)             {single_s / batched_s:6.2f}x  (target >= 4x)")


if __name__ == "__main__":
    main()
