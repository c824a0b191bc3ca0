"""Interrupted stages resume where they stopped and end exactly where an uninterrupted run ends.

For each of pairs, label, sft and the PM: run the stage straight through, keep what it wrote, delete it,
run it again with an interruption injected part-way, run it once more (the resume), and compare.
(sl_data and PPO have their own resume tests in test_sl.py and test_ppo.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from safetensors.torch import load_file

import cai
from cai.generation.hf import HFGenerator
from cai.labels import Labeller
from cai.pipeline import run, stage_path
from cai.stages.pm import PMModule
from cai.stages.sft import SFTModule

SMALL = (
    *TINY_RUN,
    "pairs.shard_size=4",  # 12 pairs in 3 shards: an interruption can fall between them
    "sft.batch_size=2",
    "sft.epochs=2",
    "sft.checkpoint_every=2",
    "sft.lr=1e-3",
    "pm.batch_size=2",
    "pm.epochs=2",
    "pm.checkpoint_every=2",
    "pm.lr=1e-3",
)


class Killed(Exception):
    """Stands in for kill -9 part-way through a stage."""


def kill_on_call(monkeypatch, cls, name: str, call: int) -> None:
    """Make cls.name raise Killed on its `call`-th call (1-based), as if the process died there."""
    original = getattr(cls, name)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


def outputs(path) -> dict:
    """What a stage wrote: its rows, or its weights, and its counts (times left out)."""
    manifest = json.loads((path / "manifest.json").read_text())
    counts = {k: v for k, v in manifest["counts"].items() if "second" not in k and "per_s" not in k}
    rows = [json.loads(line) for shard in sorted(path.glob("shard-*.jsonl")) for line in shard.read_text().splitlines()]
    weights = {f"{f.relative_to(path)}:{k}": v for f in sorted(path.rglob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return {"counts": counts, "rows": rows, "weights": weights}


def assert_same(a: dict, b: dict) -> None:
    assert a["counts"] == b["counts"] and a["rows"] == b["rows"]
    assert a["weights"].keys() == b["weights"].keys()
    for k, v in a["weights"].items():
        assert torch.allclose(v, b["weights"][k], atol=1e-6), k


@pytest.mark.parametrize(
    "kills, extra",
    [
        # shard 2 of 3; SFT step 7 of 10 (mid second epoch, last checkpoint mid-epoch); PM step 3 (mid first epoch)
        ({"pairs": 2, "label": 2, "sft": 7, "pm": 3}, ()),
        # the last shard; a checkpoint at the end of the first epoch (5 batches), killed in the second
        ({"pairs": 3, "label": 3, "sft": 7, "pm": 8}, ("sft.checkpoint_every=5", "pm.checkpoint_every=5")),
    ],
)
def test_every_stage_resumes_to_what_an_uninterrupted_run_writes(make_cfg, monkeypatch, kills, extra):
    small = (*SMALL, *extra)
    cfg = make_cfg(*small)
    run(make_cfg("stage=sl_data", *small))
    targets = {
        "sft": (SFTModule, "training_step"),
        "pairs": (HFGenerator, "generate"),
        "label": (Labeller, "label"),
        "pm": (PMModule, "training_step"),
    }
    for stage in ("sft", "pairs", "label", "pm"):
        run(make_cfg(f"stage={stage}", *small))
        path = stage_path(cfg, stage)
        straight = outputs(path)
        shutil.rmtree(path)
        with monkeypatch.context() as m:
            kill_on_call(m, *targets[stage], kills[stage])
            with pytest.raises(Killed):
                run(make_cfg(f"stage={stage}", *small))
        assert json.loads((path / "manifest.json").read_text())["status"] == "running"  # nothing marked complete
        [summary] = run(make_cfg(f"stage={stage}", *small))  # the resume
        assert "cached" not in summary["metric"]
        assert_same(straight, outputs(path))


def test_two_runs_of_one_stage_compute_it_once(tmp_path):
    """Two identical runs started together on one artifacts root: one writes, the other waits and reuses."""
    env = {**os.environ, "CAI_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    env.setdefault("CAI_CACHE", str(tmp_path / "cache"))
    cmd = [sys.executable, "train.py", "stage=sl_data", "logger=none", *TINY_RUN]
    runs = [subprocess.Popen(cmd, cwd=cai.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    assert all(p.returncode == 0 for p in runs), [e[-2000:] for _, e in outs]
    summaries = [next(line for line in out.splitlines() if line.startswith("sl_data ")) for out, _ in outs]
    assert sum("(cached)" in s for s in summaries) == 1, summaries  # exactly one of them generated
    assert [d.name for d in (tmp_path / "artifacts" / "sl_data").iterdir() if d.is_dir() and d.name != "latest"] == [
        Path(summaries[0].split()[-1]).name
    ]  # one directory, nothing moved aside
