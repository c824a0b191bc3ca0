"""Compare two runs of the main job, stage by stage: did a change keep the outputs the same?

    python benchmarks/compare_roots.py ROOT_A ROOT_B

ROOT_A and ROOT_B are CAI_ROOTs (e.g. two `benchmarks/bench_main.py ROOT` runs of different
commits with the same seed). For each stage it prints the lineage key of each, whether the rows
are identical (sl_data, pairs, label), the largest weight difference of the trained models (sft,
pm, ppo), the PPO reward curve and the final Elo, and the counts that differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("sl_data", "sft", "pairs", "label", "pm", "ppo", "eval")
TIMES = {"seconds", "generation_seconds", "train_tokens_per_s", "seconds_this_run"}


def latest(root: Path, stage: str) -> Path:
    return (root / "artifacts" / stage / "latest").resolve()


def rows(path: Path) -> list[str]:
    return [line for shard in sorted(path.glob("shard-*.jsonl")) for line in shard.read_text().splitlines()]


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    worst = 0.0
    for f in files:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys(), f
        worst = max([worst] + [float((ta[k].float() - tb[k].float()).abs().max()) for k in ta])
    return worst


def main() -> None:
    a, b = (Path(p).resolve() for p in sys.argv[1:3])
    for stage in STAGES:
        da, db = latest(a, stage), latest(b, stage)
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (da, db))
        line = [f"{stage:8s} key {da.name} vs {db.name}"]
        if stage in ("sl_data", "pairs", "label"):
            ra, rb = rows(da), rows(db)
            same = [json.loads(x) for x in ra] == [json.loads(y) for y in rb]
            line.append(f"rows {len(ra)} vs {len(rb)}: {'identical' if same else 'DIFFERENT'}")
        if stage in ("sft", "pm", "ppo"):
            line.append(f"max |weight difference| {max_weight_diff(da / 'model', db / 'model'):.2e}")
        if stage == "ppo":
            ha, hb = (json.loads((d / "history.json").read_text()) for d in (da, db))
            ka = [round(h["ppo/train/reward"], 4) for h in ha]
            kb = [round(h["ppo/train/reward"], 4) for h in hb]
            line.append(f"rewards {ka} vs {kb}")
        if stage == "eval":
            ea, eb = (json.loads((d / "elo.json").read_text())["snapshots"] for d in (da, db))
            pa = [(s["label"], round(s["harmless_elo"], 1), round(s["helpful_elo"], 1)) for s in ea]
            pb = [(s["label"], round(s["harmless_elo"], 1), round(s["helpful_elo"], 1)) for s in eb]
            line.append(f"elo {'identical' if pa == pb else 'DIFFERENT'}: {pa}" + ("" if pa == pb else f" vs {pb}"))
        ca, cb = ma["counts"], mb["counts"]
        diff = {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if k not in TIMES and ca.get(k) != cb.get(k)}
        line.append(f"counts differing: {diff or 'none'}")
        print("\n    ".join(line))


if __name__ == "__main__":
    main()
