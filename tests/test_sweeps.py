"""W&B sweep specs: valid for W&B's own sweep engine, and every run they generate composes."""

from __future__ import annotations

import warnings

import pytest
import yaml
from omegaconf import OmegaConf

import cai
from cai.pipeline import judge_varies

SPECS = sorted((cai.ROOT / "sweeps").glob("*.yaml"))


def all_runs(spec: dict) -> list[list[str]]:
    """Every run a grid sweep proposes, as the Hydra overrides `${args_no_hyphens}` turns it into."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps

        runs: list = []
        while True:
            [proposed] = sweeps.next_runs(spec, runs)
            if proposed is None:
                break
            runs.append(proposed)
            assert len(runs) < 100
    return [[f"{k}={v['value']}" for k, v in r.config.items()] for r in runs]


def test_there_are_the_three_sweeps():
    assert {p.stem for p in SPECS} == {"label_x_constitution", "model_sizes", "seeds"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_sweep_spec_is_valid_and_every_run_composes(path, make_cfg):
    import sweeps

    spec = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(spec) == []
    assert (cai.ROOT / spec["program"]).exists()
    assert "${args_no_hyphens}" in spec["command"]  # Hydra takes key=value overrides, no dashes
    runs = all_runs(spec)
    grid = 1
    for p in spec["parameters"].values():
        grid *= len(p.get("values", [None]))
    assert len(runs) == grid and len({tuple(r) for r in runs}) == grid
    fixed = [a for a in spec["command"] if not a.startswith("${")]  # overrides every run gets
    for overrides in runs:
        cfg = make_cfg(*fixed, *overrides)  # a typo in a sweep fails here, as it would in `wandb agent`
        for o in overrides:
            key, value = o.split("=", 1)
            # a group override picks that option (named after it), a field override sets the field
            got = {"label": cfg.label.kind, "constitution": cfg.constitution.variant, "model": cfg.model.name}.get(key)
            assert str(got if got is not None else OmegaConf.select(cfg, key)) == value, (key, value)
        assert judge_varies(cfg, list(spec["parameters"])) == []  # one judge for the whole sweep: its frontier is drawn
        for o in fixed:
            assert OmegaConf.select(cfg, o.split("=")[0].split("@")[-1] + ".name") == o.split("=")[1]


def test_a_sweep_that_varies_the_judge_is_named(make_cfg):
    """The judge of each run is the feedback model (which follows the policy unless set), or a PM."""
    assert judge_varies(make_cfg(), ["label", "seed", "model"]) == ["model"]  # the labeller follows the policy
    assert judge_varies(make_cfg("model@feedback_model=qwen2_5_1_5b"), ["model", "label"]) == []
    assert judge_varies(make_cfg(), ["model@feedback_model", "feedback_model.dtype", "eval.judge"]) == [
        "model@feedback_model",
        "feedback_model.dtype",
        "eval.judge",
    ]
    own_pm = make_cfg("eval.judge=pm", "eval.judge_own_pm=true")
    assert judge_varies(own_pm, ["label", "ppo.lr", "pm_model", "constitution"]) == ["label", "pm_model", "constitution"]
    assert judge_varies(make_cfg("eval.judge=pm", "eval.judge_pm=/some/pm"), ["label", "model"]) == []
