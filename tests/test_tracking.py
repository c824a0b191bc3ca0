"""Tracking works with no W&B account: offline W&B runs, the CSV fallback, run names from overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import HH_SMALL, TINY_RUN, wandb_runs

import cai
from cai.config import instantiate
from cai.tracking import git_commit, run_name_from_overrides


def test_run_name_from_overrides():
    assert run_name_from_overrides([]) == "default"
    assert run_name_from_overrides(["constitution=ensemble", "label=soft"]) == "constitution=ensemble,label=soft"
    assert (
        run_name_from_overrides(["constitution.path=/a/b/mine.yaml", "logger=csv", "hydra.verbose=true"]) == "constitution.path=mine.yaml"
    )
    # plumbing never names a run; in a multirun or sweep only the keys that vary do
    plumbing = ["paths.artifacts=/x/artifacts", "stage=pm", "trainer.devices=2", "logger.project=p"]
    assert run_name_from_overrides([*plumbing, "label=cot"]) == "label=cot"
    assert run_name_from_overrides(["label=cot", "model=tiny", "seed=1"], varying=["label", "seed"]) == "label=cot,seed=1"


def test_csv_tracker_writes_metrics_tables_config(make_cfg, tmp_path):
    cfg = make_cfg("logger=csv", f"logger.dir={tmp_path}/run")
    tracker = instantiate(cfg.logger).start(cfg, name="t")
    try:
        tracker.log({"sft/train/loss": 2.5}, step=1)
        tracker.log({"sft/train/loss": 2.0}, step=2)
        tracker.table("sl_data/samples", ["prompt", "revision"], [["p", "r"]])
        tracker.summary({"sft/val/loss": 1.9})
    finally:
        tracker.finish()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows == ["step,key,value", "1,sft/train/loss,2.5", "2,sft/train/loss,2.0"]
    assert json.loads((tmp_path / "run" / "tables" / "sl_data_samples.jsonl").read_text()) == {"prompt": "p", "revision": "r"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["label.kind"] == "soft" and "git_commit" in config["_meta"]


def test_wandb_offline_run_logs_config_tables_and_artifacts(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")  # no account
    cfg = make_cfg("logger=wandb", f"logger.dir={tmp_path}/wb", "constitution=ensemble")
    tracker = instantiate(cfg.logger)
    assert tracker.mode == "offline"
    tracker.start(cfg, name="offline-test")
    try:
        assert tracker.run is None  # opened by the first thing logged
        tracker.log({"pm/val/ece": 0.5}, step=0)
        assert tracker.run.name == "offline-test"
        assert tracker.run.config["constitution.variant"] == "ensemble"  # flat: see the sweep test
        assert tracker.run.config["_meta"]["git_commit"] == git_commit()
        tracker.log({"pm/val/ece": 0.5}, step=0)
        tracker.table("label/samples", ["a", "b"], [[1, 2]])
        (tmp_path / "art").mkdir()
        (tmp_path / "art" / "manifest.json").write_text("{}")
        tracker.artifact(tmp_path / "art", name="sl_data", type="dataset")
        tracker.reference_mb = 0  # above it: a reference, checksums only, nothing uploaded
        tracker.artifact(tmp_path / "art", name="sft_model", type="model")
        run_dir = tracker.run.dir
    finally:
        tracker.finish()
    offline = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    assert run_dir.startswith(str(offline[0]))
    [run] = wandb_runs(tmp_path / "wb")
    uploaded, referenced = run["artifacts"]
    assert uploaded["name"] == "sl_data" and not any(uploaded["refs"])
    assert referenced["name"] == "sft_model" and referenced["refs"][0].startswith("file://")


def test_a_sweep_agent_cannot_replace_a_config_section(tmp_path):
    """Under `wandb agent`, a sweep parameter named `label` used to replace the whole logged label
    section (label.debias, the clamps, few_shot vanished). The config is now flat, so it cannot.

    As an agent runs it: a fresh `python train.py` with the sweep's values as overrides and
    WANDB_SWEEP_PARAM_PATH set (wandb reads it once per process, hence the subprocess)."""
    params = tmp_path / "sweep.yaml"
    params.write_text("label:\n  value: soft\nconstitution:\n  value: ensemble\n")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SWEEP_PARAM_PATH": str(params), "CAI_ROOT": str(tmp_path)}
    env.pop("WANDB_SWEEP_ID", None)
    env.setdefault("CAI_CACHE", str(tmp_path / "cache"))
    plumbing = (f"paths.cache={env['CAI_CACHE']}", f"label.report_data={HH_SMALL}")  # a path, and a field whose value is a path
    cmd = [sys.executable, "train.py", "stage=sl_data", *TINY_RUN, "logger=wandb", "label=soft", "constitution=ensemble", *plumbing]
    done = subprocess.run(cmd, cwd=cai.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = wandb_runs(tmp_path / "outputs")
    config = run["config"]
    assert config["label"] == "soft" and config["constitution"] == "ensemble"  # what the agent set
    assert config["label.debias"] is True and config["label.kind"] == "soft" and "label.few_shot" in config
    assert config["constitution.variant"] == "ensemble" and config["model"] == "tiny" and config["model.source"] == "tiny"
    assert run["group"] == "sweep-local" and run["name"] == "label=soft,constitution=ensemble" and run["job_type"] == "sl_data"
    assert "label.report_data=hh_small.jsonl.gz" in run["tags"] and not any("/" in t or t.startswith("paths.") for t in run["tags"])
