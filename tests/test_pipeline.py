"""The pipeline: stage order and lineage declared once, up-front validation, stages as leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import cai
from cai.errors import CaiError
from cai.pipeline import BY_NAME, PIPELINE, STAGES, lineage_key, run, stages_for


def test_stage_order():
    assert stages_for("all") == ("sl_data", "sft", "pairs", "label", "pm", "ppo", "eval") == STAGES
    assert stages_for("pm_eval") == ("pm_eval",)
    assert stages_for("frontier") == ("frontier",)
    with pytest.raises(CaiError, match="stage.name: unknown stage 'rl'"):
        stages_for("rl")


def test_the_lineage_chain_follows_the_stage_order(make_cfg):
    # Each stage's lineage starts from the stage before it, and it reads only stages before it.
    assert [s.after for s in PIPELINE] == [None, *STAGES[:-1]]
    configs = [
        make_cfg("model=tiny"),
        make_cfg("model=tiny", "label=human", "label.data=x.jsonl", "eval.judge=pm", "eval.judge_own_pm=true"),
    ]
    for n, stage in enumerate(PIPELINE):
        for cfg in configs:
            assert set(stage.upstream_of(cfg)) <= set(STAGES[:n]), stage.name
        for field in stage.logging_only:  # a logging-only field lies inside one of the stage's lineage sections
            assert any(field.startswith(section + ".") for section in stage.lineage), field


def test_stages_are_leaves():
    """No module under cai/stages imports another stage or the pipeline: what stages share lives in the library."""
    stage_files = sorted((cai.ROOT / "cai" / "stages").glob("*.py"))
    assert {p.stem for p in stage_files} >= set(BY_NAME)
    for path in stage_files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert name != "cai.pipeline", f"{path.name} imports the pipeline"
                assert not (name.startswith("cai.stages.") and name.split(".")[2] in BY_NAME), f"{path.name} imports {name}"


def test_no_function_in_cai_is_long():
    """The longest function in cai/ stays about 50 lines: long ones hide more than one job."""
    too_long = []
    for path in Path(cai.ROOT / "cai").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 55:
                too_long.append(f"{path.relative_to(cai.ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long, too_long


def test_bad_input_is_caught_before_any_work(make_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = make_cfg("model=tiny", f"data.helpful={empty}")
    with pytest.raises(CaiError, match="data.helpful: .*empty.txt: the prompt file is empty"):
        run(cfg)
    with pytest.raises(CaiError, match="label.clamp_low/clamp_high"):
        run(make_cfg("model=tiny", "label.clamp_low=0.7", "label.clamp_high=0.6"))


def test_lineage_keys_share_upstream_stages(make_cfg, tmp_path):
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


def test_how_a_training_stage_trains_here_is_in_its_fingerprint(make_cfg, monkeypatch):
    """The strategy, the number of ranks and the precision `trainer.precision=auto` resolves to on this
    machine are in SFT's, the PM's and PPO's fingerprints: a CPU float32 PM is not up to date for a
    GPU bf16 run (it is redone), while the lineage key, which later stages look it up by, stays."""
    from cai.pipeline import BY_NAME, stage_inputs

    def inputs(cfg, stage):
        return stage_inputs(cfg, BY_NAME[stage], {})

    cfg = make_cfg("model=tiny")
    cpu = {s: inputs(cfg, s) for s in ("sl_data", "sft", "pm", "ppo")}
    training = cpu["pm"]["training"]
    assert "training" not in cpu["sl_data"] and (training["precision"], training["strategy"]["name"], training["ranks"]) == (
        "32-true",
        "auto",
        1,
    )
    zero = make_cfg("model=tiny", "strategy=deepspeed_zero2")
    assert inputs(zero, "sl_data") == cpu["sl_data"]  # generation runs no strategy
    assert all(inputs(zero, s) != cpu[s] for s in ("sft", "pm", "ppo"))
    assert all(lineage_key(zero, s) == lineage_key(cfg, s) for s in ("sft", "pm", "ppo"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inputs(cfg, "sl_data") == cpu["sl_data"]
    assert all(inputs(cfg, s)["training"]["precision"] == "bf16-mixed" for s in ("sft", "pm", "ppo"))  # auto, on a GPU
