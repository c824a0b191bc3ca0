"""Two ranks on the CPU (gloo), through `python train.py strategy=ddp trainer.devices=2`.

- The generation stages share their work by rank and write exactly what one process writes;
- one W&B run per job;
- data-parallel PPO: each rank samples its own rollouts, the weights stay identical across ranks,
  and a 2-rank run killed after a checkpoint resumes to what an uninterrupted one writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import HH_SMALL, TINY_RUN
from safetensors.torch import load_file

import cai

SMALL = (
    *TINY_RUN,
    "sl.shard_size=4",
    "pairs.shard_size=4",
    "ppo.iterations=3",
    "ppo.rollouts=4",
    "ppo.max_new_tokens=8",
    "ppo.minibatch_size=2",
    "ppo.snapshot_every=0",
    "eval.n_red_team=3",
    "eval.n_helpful=2",
    "eval.max_new_tokens=8",
    f"eval.judge_check={HH_SMALL}",  # 40 human comparisons through the judge: two chunks, one per rank
)
TWO_RANKS = ("strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu")


def command(root: Path, *overrides: str) -> tuple[list[str], dict]:
    env = {**os.environ, "CAI_ROOT": str(root), "WANDB_MODE": "offline"}
    env.setdefault("CAI_CACHE", str(root / "cache"))
    return [sys.executable, "train.py", *SMALL, *overrides], env


def train(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd, env = command(root, *overrides)
    done = subprocess.run(cmd, cwd=cai.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def latest(root: Path, stage: str) -> Path:
    return (root / "artifacts" / stage / "latest").resolve()


def test_generation_stages_split_across_ranks_write_what_one_process_writes(tmp_path):
    train(tmp_path, "logger=none")  # stage=all in one process
    redo = ("sl_data", "pairs", "label", "eval")
    one = {}
    for stage in redo:  # set the generation stages aside; SFT, the PM and PPO stay and are reused
        one[stage] = tmp_path / f"one-{stage}"
        shutil.move(latest(tmp_path, stage), one[stage])
    shutil.move(tmp_path / "artifacts" / "eval_cache", tmp_path / "one-eval_cache")
    trained = {s: (latest(tmp_path, s) / "manifest.json").read_text() for s in ("sft", "pm", "ppo")}
    # The generation stages again, each on two ranks. (stage=all would train SFT, the PM and PPO again:
    # how a stage trains, its ranks and strategy, is in its fingerprint.)
    for stage in redo:
        done = train(tmp_path, *TWO_RANKS, f"stage={stage}", "logger=wandb" if stage == "eval" else "logger=none")
    for stage in redo:
        two = latest(tmp_path, stage)
        assert json.loads((two / "manifest.json").read_text())["status"] == "complete"
        shards = sorted(p.name for p in one[stage].glob("shard-*.jsonl"))
        assert shards == sorted(p.name for p in two.glob("shard-*.jsonl"))
        for name in shards:  # row for row, byte for byte
            assert (one[stage] / name).read_text() == (two / name).read_text(), (stage, name)
    assert trained == {s: (latest(tmp_path, s) / "manifest.json").read_text() for s in ("sft", "pm", "ppo")}  # read, not retrained
    # The eval: the same answers, the same verdicts (judged in chunks shared by rank), the same Elo.
    elo_one = json.loads((one["eval"] / "elo.json").read_text())
    elo_two = json.loads((latest(tmp_path, "eval") / "elo.json").read_text())
    pick = ("label", "harmless_elo", "helpful_elo", "mean_length")
    assert [[s[k] for k in pick] for s in elo_one["snapshots"]] == [[s[k] for k in pick] for s in elo_two["snapshots"]]
    assert elo_one["judge"]["quality"] == elo_two["judge"]["quality"]
    judged = list((tmp_path / "artifacts" / "eval_cache" / "judgements").glob("*.rank1.jsonl"))
    assert judged and judged[0].read_text().strip()  # rank 1 did its share of the judging
    # Exactly one W&B run for the (eval) job, and one summary table printed.
    runs = list((tmp_path / "outputs").rglob("offline-run-*"))
    assert len(runs) == 1, runs
    assert done.stdout.count("key metric") == 1


def ppo_model(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest(root, "ppo") / "model" / "model.safetensors"))


def test_data_parallel_ppo_keeps_ranks_in_step_and_resumes_exactly(tmp_path):
    base = tmp_path / "base"
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        train(base, "logger=none", f"stage={stage}")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        shutil.copytree(base / "artifacts", root / "artifacts", symlinks=True)
    ppo = ("logger=none", "stage=ppo", "ppo.checkpoint_every=1", *TWO_RANKS)
    train(whole, *ppo)
    manifest = json.loads((latest(whole, "ppo") / "manifest.json").read_text())
    ranks = manifest["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the gradient all-reduce kept the actors identical
    assert ranks[0]["rollouts"] != ranks[1]["rollouts"]  # ...while each rank sampled its own rollouts
    assert manifest["counts"]["iterations"] == 3

    # Kill both ranks (the whole process group) once the first checkpoint is on disk, then run again.
    cmd, env = command(killed, *ppo)
    proc = subprocess.Popen(cmd, cwd=cai.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, size = time.time() + 600, -1
    while time.time() < deadline and proc.poll() is None:
        found = list((killed / "artifacts" / "ppo").glob("*/checkpoints/last.ckpt"))
        if found and found[0].stat().st_size == size and size > 0:
            break  # written, and not growing
        size = found[0].stat().st_size if found else -1
        time.sleep(0.2)
    assert proc.poll() is None, "PPO finished before it could be killed; give it more iterations"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((killed / "artifacts" / "ppo").glob("*/model"))
    train(killed, *ppo)
    a, b = ppo_model(whole), ppo_model(killed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    history = json.loads((latest(killed, "ppo") / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1, 2]
