"""Tracking works with no W&B account: offline W&B runs, the CSV fallback, run names from overrides."""

from __future__ import annotations

import json

from cai.config import instantiate
from cai.tracking import git_commit, run_name_from_overrides


def test_run_name_from_overrides():
    assert run_name_from_overrides([]) == "default"
    assert run_name_from_overrides(["constitution=ensemble", "label=soft"]) == "constitution=ensemble,label=soft"
    assert (
        run_name_from_overrides(["constitution.path=/a/b/mine.yaml", "logger=csv", "hydra.verbose=true"]) == "constitution.path=mine.yaml"
    )


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
    assert config["label"]["kind"] == "soft" and "git_commit" in config["_meta"]


def test_wandb_offline_run_logs_config_tables_and_artifacts(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")  # no account
    cfg = make_cfg("logger=wandb", f"logger.dir={tmp_path}/wb", "constitution=ensemble")
    tracker = instantiate(cfg.logger)
    assert tracker.mode == "offline"
    tracker.start(cfg, name="offline-test")
    try:
        assert tracker.run.name == "offline-test"
        assert tracker.run.config["constitution"]["variant"] == "ensemble"
        assert tracker.run.config["_meta"]["git_commit"] == git_commit()
        tracker.log({"pm/val/accuracy": 0.5}, step=0)
        tracker.table("label/samples", ["a", "b"], [[1, 2]])
        (tmp_path / "art").mkdir()
        (tmp_path / "art" / "manifest.json").write_text("{}")
        tracker.artifact(tmp_path / "art", name="sl_data", type="dataset")
        run_dir = tracker.run.dir
    finally:
        tracker.finish()
    offline = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    assert run_dir.startswith(str(offline[0]))
