"""The pipeline: stage selection, up-front validation, and honest errors for stages not built yet."""

from __future__ import annotations

import pytest

from cai.errors import CaiError, NotImplementedStage
from cai.pipeline import STAGES, run, stages_for


def test_stage_order():
    assert stages_for("all") == ("sl_data", "sft", "pairs", "label", "pm", "ppo", "eval") == STAGES
    assert stages_for("pm_eval") == ("pm_eval",)
    with pytest.raises(CaiError, match="stage.name: unknown stage 'rl'"):
        stages_for("rl")


def test_a_stage_not_built_yet_says_so_and_writes_nothing(make_cfg, tmp_path):
    cfg = make_cfg("stage=eval", "model=tiny")
    with pytest.raises(NotImplementedStage, match="stage 'eval' .* is not implemented yet"):
        run(cfg)
    assert not (tmp_path / "artifacts").exists()


def test_bad_input_is_caught_before_any_work(make_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = make_cfg("model=tiny", f"data.helpful={empty}")
    with pytest.raises(CaiError, match="data.helpful: .*empty.txt: the prompt file is empty"):
        run(cfg)
    with pytest.raises(CaiError, match="label.clamp_low/clamp_high"):
        run(make_cfg("model=tiny", "label.clamp_low=0.7", "label.clamp_high=0.6"))
