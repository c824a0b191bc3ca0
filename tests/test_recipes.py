"""Every recipe in recipes/ runs, as a user runs it (bash, from another folder), with tiny counts, so none rots.

The ablation grid is run by tests/test_eval.py::test_multirun_shares_upstream_stages_and_draws_one_frontier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HH_SMALL, TINY_RUN

import cai

RECIPES = cai.ROOT / "recipes"
TINY = (
    *TINY_RUN,
    "logger=none",
    "ppo.iterations=2",
    "ppo.rollouts=4",
    "ppo.max_new_tokens=6",
    "ppo.minibatch_size=4",
    "ppo.snapshot_every=2",
    "eval.n_red_team=3",
    "eval.n_helpful=2",
    "eval.max_new_tokens=6",
    "eval.bootstrap=20",
)


def recipe(tmp_path: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`bash recipes/NAME ARGS` from tmp_path (its artifacts land there), with the test's python first on PATH."""
    full = {
        **os.environ,
        "CAI_ROOT": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
        **env,
    }
    done = subprocess.run(["bash", str(RECIPES / name), *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def finished(root: Path, stage: str) -> list[dict]:
    """The manifests of a stage's lineage directories (`latest` is a link to one of them)."""
    return [json.loads(m.read_text()) for m in (root / "artifacts" / stage).glob("*/manifest.json") if m.parent.name != "latest"]


def test_every_recipe_is_tested_and_documented():
    scripts = {p.name for p in RECIPES.glob("*.sh")}
    assert scripts == {
        "ablation_grid.sh",
        "your_own_model.sh",
        "paper_scale.sh",
        "independent_judge.sh",
        "wandb_sweep.sh",
        "optuna.sh",
        "multi_gpu.sh",
        "slurm.sh",
    }
    page = (cai.ROOT / "docs" / "recipes.md").read_text()
    assert all(s in page for s in scripts)


def test_your_own_model(tmp_path, tiny_spec):
    model_dir = tiny_spec.local_dir()  # a plain HF checkpoint directory, as a user's own would be
    done = recipe(tmp_path, "your_own_model.sh", model_dir, *(a for a in TINY if a != "model=tiny"))
    assert "memory plan" in done.stdout + done.stderr
    [sl_data], [ppo] = finished(tmp_path, "sl_data"), finished(tmp_path, "ppo")
    assert ppo["status"] == "complete" and sl_data["config"]["model"]["source"] == "hf"
    assert (tmp_path / "artifacts" / "eval" / "latest" / "frontier.png").is_file()


def test_paper_scale_prepares_prompts_and_runs(tmp_path):
    small = (
        "model=tiny",
        "strategy=auto",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "stage=sl_data",
        "data.n_red_team=3",
        "data.n_helpful=2",
    )
    counts = (
        "sl.n_revisions=1",
        "sl.max_new_tokens=6",
        "sl.n_few_shot=1",
        "sft.max_length=256",
        "pm.max_length=256",
        "ppo.rollouts=8",
        "ppo.minibatch_size=4",
    )
    recipe(tmp_path, "paper_scale.sh", str(HH_SMALL), str(HH_SMALL), *small, *counts, GENERATION="hf")
    prompts = [json.loads(line) for line in (tmp_path / "prompts" / "red_team.jsonl").read_text().splitlines()]
    assert prompts and all(p["prompt"].strip() for p in prompts)
    [sl] = finished(tmp_path, "sl_data")
    assert sl["status"] == "complete" and sl["config"]["sl"]["shard_size"] == 256  # experiment=paper's, not the quickstart's


def test_independent_judge(tmp_path):
    recipe(tmp_path, "independent_judge.sh", str(HH_SMALL), str(HH_SMALL), str(HH_SMALL), *TINY, "pm.trainable=head")
    elo = json.loads((tmp_path / "artifacts" / "eval" / "latest" / "elo.json").read_text())
    assert elo["judge"]["kind"] == "pm" and elo["judge"]["independent"]  # trained on human labels: none of the run's own models
    assert elo["judge"]["quality"]["harmless"]["comparisons"] > 0  # measured against human choices first


def test_wandb_sweep_runs_a_grid_locally(tmp_path):
    spec = tmp_path / "two_labels.yaml"
    spec.write_text(
        "program: train.py\nmethod: grid\nparameters:\n  label:\n    values: [hard, soft]\n  logger.mode:\n    value: online\n"
        'command: ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]\n'
    )
    recipe(tmp_path, "wandb_sweep.sh", str(spec), *TINY, CAI_SWEEP="local")
    kinds = sorted(m["config"]["label"]["kind"] for m in finished(tmp_path, "label"))
    assert kinds == ["hard", "soft"]
    assert (tmp_path / "artifacts" / "frontier" / "latest" / "frontier.png").is_file()  # one frontier over the grid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="DDP on CPU processes")
def test_multi_gpu_runs_on_two_cpu_processes(tmp_path):
    # In a group, so that both ranks also draw the group's frontier (the judge shares its work out).
    recipe(tmp_path, "multi_gpu.sh", *TINY, "trainer.accelerator=cpu", "logger.group=two-ranks", GPUS="2")
    [ppo] = finished(tmp_path, "ppo")
    assert ppo["status"] == "complete" and ppo["inputs"]["training"]["ranks"] == 2
    [frontier] = finished(tmp_path, "frontier")
    assert frontier["status"] == "complete" and frontier["counts"]["runs"] == 1
    assert len(list((tmp_path / "artifacts" / "groups" / "two-ranks").glob("*.json"))) == 1


def test_optuna_tunes_on_the_final_policys_elo(tmp_path):
    """Two Optuna trials over PPO's learning rate: each returns its final policy's harmlessness Elo, the best is kept."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper: pip install -e '.[sweepers]'")
    recipe(tmp_path, "optuna.sh", *TINY, TRIALS="2", SEARCH="ppo.lr=interval(1e-5,1e-3)")
    evals = [json.loads(m.read_text()) for m in (tmp_path / "artifacts" / "eval").glob("*/elo.json") if m.parent.name != "latest"]
    finals = [max((s for s in e["snapshots"] if s["order"] >= 0), key=lambda s: s["order"]) for e in evals]
    assert len(finals) == 2 and len({m["config"]["ppo"]["lr"] for m in finished(tmp_path, "ppo")}) == 2
    assert len(finished(tmp_path, "sft")) == 1  # the trials share what is upstream of PPO
    [result] = list((tmp_path / "multirun").rglob("optimization_results.yaml"))
    best = yaml.safe_load(result.read_text())
    assert best["best_value"] == pytest.approx(max(f["harmless_elo"] for f in finals))


def test_slurm_launcher_composes(tmp_path):
    """No SLURM here: the launcher the recipe picks composes with the recipe's settings, and the recipe parses."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher: pip install -e '.[sweepers]'")
    assert subprocess.run(["bash", "-n", str(RECIPES / "slurm.sh")]).returncode == 0
    args = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer.devices=1"]
    done = subprocess.run(
        [sys.executable, str(cai.ROOT / "train.py"), *args, "--cfg", "hydra"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    launcher = yaml.safe_load(done.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == ("gpu", 1, 1)
