"""`trainer.*` is Lightning's Trainer, and `callbacks` is a config group (issue 15, item 1)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import lightning as L
import pytest
from conftest import TINY_RUN

from cai.config import TrainerConfig
from cai.pipeline import lineage_key, run, stage_path

SFT = (*TINY_RUN, "data.n_red_team=8", "sft.batch_size=2", "sft.checkpoint_every=0")


def test_every_lightning_trainer_argument_is_a_trainer_field():
    """The schema lists the installed Lightning's arguments, less the three that are groups of their own."""
    lightning_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "strategy", "logger", "callbacks"}
    assert {f.name for f in dataclasses.fields(TrainerConfig)} == lightning_args


def test_result_changing_trainer_arguments_are_in_the_lineage_key_and_logging_ones_are_not(make_cfg):
    base = lineage_key(make_cfg(*TINY_RUN), "sft")
    assert lineage_key(make_cfg(*TINY_RUN, "trainer.max_steps=1"), "sft") != base
    assert lineage_key(make_cfg(*TINY_RUN, "trainer.accumulate_grad_batches=4"), "pm") != lineage_key(make_cfg(*TINY_RUN), "pm")
    assert lineage_key(make_cfg(*TINY_RUN, "trainer.enable_progress_bar=false"), "sft") == base
    assert lineage_key(make_cfg(*TINY_RUN, "callbacks=none"), "sft") == base  # the LR monitor only logs
    added = "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping"
    assert lineage_key(make_cfg(*TINY_RUN, added, "+callbacks.stop.monitor=sft/val/loss"), "sft") != base
    assert lineage_key(make_cfg(*TINY_RUN, "trainer.max_steps=1"), "sl_data") == lineage_key(make_cfg(*TINY_RUN), "sl_data")


def test_trainer_arguments_and_a_users_callback_reach_the_sft_trainer(make_cfg, tmp_path):
    """trainer.accumulate_grad_batches and trainer.max_steps act; a callback added by one override
    runs; the learning rate is logged as sft/train/lr."""
    run(make_cfg("stage=sl_data", *SFT))
    accumulated = make_cfg("stage=sft", *SFT, "trainer.accumulate_grad_batches=2")
    run(accumulated)
    counts = json.loads((stage_path(accumulated, "sft") / "manifest.json").read_text())["counts"]
    batches = math.ceil(counts["train_examples"] / 2)  # sft.batch_size=2
    assert batches >= 3 and counts["optimizer_steps"] == math.ceil(batches / 2)

    extra = tmp_path / "extra_checkpoints"
    keep = ("+callbacks.keep._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"+callbacks.keep.dirpath={extra}")
    stopped = make_cfg("stage=sft", *SFT, "logger=csv", "trainer.max_steps=1", *keep)
    run(stopped)
    assert json.loads((stage_path(stopped, "sft") / "manifest.json").read_text())["counts"]["optimizer_steps"] == 1
    assert list(extra.glob("*.ckpt"))  # the user's callback ran
    metrics = next((tmp_path / "out").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert "sft/train/lr" in metrics


def test_a_bad_callback_or_trainer_key_is_one_clear_line(make_cfg):
    from hydra.errors import ConfigCompositionException

    from cai.errors import CaiError

    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        make_cfg(*TINY_RUN, "trainer.max_stepz=1")
    run(make_cfg("stage=sl_data", *SFT))
    with pytest.raises(CaiError, match=r"callbacks.keep: could not build lightning.pytorch.callbacks.NoSuchThing"):
        run(make_cfg("stage=sft", *SFT, "+callbacks.keep._target_=lightning.pytorch.callbacks.NoSuchThing"))


def test_gradient_checkpointing_changes_no_number_and_no_key(make_cfg):
    """Activation checkpointing recomputes in backward what it did not keep: the trained weights are
    the same bit for bit, so the flag is in no lineage key (a run with it reuses one without)."""
    import shutil

    from safetensors.torch import load_file

    run(make_cfg("stage=sl_data", *SFT))
    weights = {}
    for on in (True, False):
        cfg = make_cfg("stage=sft", *SFT, f"gradient_checkpointing={str(on).lower()}")
        shutil.rmtree(stage_path(cfg, "sft"), ignore_errors=True)
        run(cfg)
        weights[on] = load_file(str(stage_path(cfg, "sft") / "model" / "model.safetensors"))
    assert lineage_key(make_cfg(*SFT, "gradient_checkpointing=true"), "sft") == lineage_key(
        make_cfg(*SFT, "gradient_checkpointing=false"), "sft"
    )
    assert weights[True].keys() == weights[False].keys()
    assert all(weights[True][k].equal(weights[False][k]) for k in weights[True])
