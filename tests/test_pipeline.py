"""The pipeline: stage selection, up-front validation, and honest errors for stages not built yet."""

from __future__ import annotations

import pytest

from cai.errors import CaiError, NotImplementedStage
from cai.pipeline import DESCRIPTIONS, STAGES, run, stage_module, stages_for


def test_stage_order():
    assert stages_for("all") == ("sl_data", "sft", "pairs", "label", "pm", "ppo", "eval") == STAGES
    assert stages_for("pm_eval") == ("pm_eval",)
    assert stages_for("frontier") == ("frontier",)
    with pytest.raises(CaiError, match="stage.name: unknown stage 'rl'"):
        stages_for("rl")


def test_a_stage_module_that_is_missing_says_so(monkeypatch):
    monkeypatch.setitem(DESCRIPTIONS, "critic_pretraining", "value-model pretraining")
    with pytest.raises(NotImplementedStage, match="stage 'critic_pretraining' .* is not implemented yet"):
        stage_module("critic_pretraining")


def test_bad_input_is_caught_before_any_work(make_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = make_cfg("model=tiny", f"data.helpful={empty}")
    with pytest.raises(CaiError, match="data.helpful: .*empty.txt: the prompt file is empty"):
        run(cfg)
    with pytest.raises(CaiError, match="label.clamp_low/clamp_high"):
        run(make_cfg("model=tiny", "label.clamp_low=0.7", "label.clamp_high=0.6"))


def test_lineage_keys_share_upstream_stages(make_cfg, tmp_path):
    from cai.artifacts import lineage_key

    base = make_cfg("model=tiny")
    hard = make_cfg("model=tiny", "label=hard", "logger=csv", f"paths.cache={tmp_path}/elsewhere", "ppo.table_every=1")
    for stage in ("sl_data", "sft", "pairs"):
        assert lineage_key(base, stage) == lineage_key(hard, stage)  # upstream of the label: shared
    for stage in ("label", "pm", "ppo", "eval"):
        assert lineage_key(base, stage) != lineage_key(hard, stage)  # the label and everything after it
    # what is only logged, or where models are cached, changes no key
    quiet = make_cfg("model=tiny", "logger=csv", f"paths.cache={tmp_path}/elsewhere", "ppo.table_every=1", "pm.eval_data=x.jsonl")
    assert all(lineage_key(base, s) == lineage_key(quiet, s) for s in STAGES)
    # one PPO field moves the PPO and eval keys only
    ppo = make_cfg("model=tiny", "ppo.lr=3e-6")
    assert [lineage_key(base, s) == lineage_key(ppo, s) for s in STAGES] == [True] * 5 + [False] * 2
