"""Every option of every config group composes, and what it names can be instantiated."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import cai
from cai.config import instantiate
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.models import ModelSpec
from cai.pipeline import validate
from cai.tracking import Tracker

CONF = cai.CONF
GROUPS = ["constitution", "label", "model", "strategy", "generation", "logger", "stage", "experiment", "callbacks"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_have_the_required_options():
    assert {"default", "ensemble", "single"} <= set(options("constitution"))
    assert {"hard", "soft", "cot", "likelihood", "contrastive", "human"} <= set(options("label"))
    assert {"tiny", "smollm2_135m", "smollm2_360m", "smollm2_1_7b", "qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b", "qwen2_5_7b"} <= set(
        options("model")
    )
    assert set(options("strategy")) == {"auto", "ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"}
    assert set(options("generation")) == {"hf", "vllm"}
    assert set(options("logger")) == {"wandb", "csv", "none"}
    assert set(options("stage")) == {
        "all",
        "check",
        "sl_data",
        "sft",
        "pairs",
        "label",
        "pm",
        "pm_eval",
        "ppo",
        "eval",
        "frontier",
        "label_report",
    }
    assert set(options("experiment")) == {"quickstart", "paper"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    if (group, option) == ("model", "policy"):  # only for model@feedback_model= and model@pm_model=: it would follow itself
        with pytest.raises(CaiError, match="'policy' is an option for model@feedback_model="):
            validate(cfg, ("sl_data",))
        return
    if (group, option) == ("model", "hf"):  # any checkpoint, named by model.name_or_path
        with pytest.raises(CaiError, match="model.name_or_path"):
            instantiate(cfg.model)
        return
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if group == "model":
        spec = instantiate(cfg.model)
        assert isinstance(spec, ModelSpec) and spec.name == option
        assert cfg.feedback_model.name == option and cfg.pm_model.name == option  # one override moves all three
    elif group == "constitution":
        c = instantiate(cfg.constitution)
        assert isinstance(c, Constitution) and len(c.rl_principles) == 16 and c.variant == option
    elif group == "strategy":
        strategy = instantiate(cfg.strategy)
        if option in ("auto", "ddp"):
            assert strategy == option
        else:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            assert isinstance(strategy, DeepSpeedStrategy)
            assert strategy.config["zero_optimization"]["stage"] == int(option.split("zero")[1][0])
            assert ("offload_param" in strategy.config["zero_optimization"]) == option.endswith("offload")
    elif group == "logger":
        tracker = instantiate(cfg.logger)
        assert isinstance(tracker, Tracker) and tracker.backend == option
    elif group == "generation":
        cls = hydra.utils.get_class(cfg.generation._target_)
        assert cls.__name__ == {"hf": "HFGenerator", "vllm": "VLLMGenerator"}[option]
    elif group == "label":
        assert cfg.label.kind == option
        if option == "cot":
            assert (cfg.label.clamp_low, cfg.label.clamp_high) == (0.4, 0.6)
    elif group == "stage":
        assert cfg.stage.name == option
    elif group == "experiment":
        assert cfg.sl.n_revisions == {"quickstart": 1, "paper": 4}[option]


def test_hf_generation_option_instantiates_a_working_generator(make_cfg, tiny_spec):
    cfg = make_cfg("generation=hf")
    gen = instantiate(cfg.generation, model=tiny_spec)
    out = gen.generate([[{"role": "user", "content": "hi"}]], gen.params(max_new_tokens=4))
    assert len(out) == 1 and 1 <= len(out[0].token_ids) <= 4


def test_models_can_be_chosen_separately(make_cfg):
    cfg = make_cfg("model=tiny", "model@feedback_model=qwen2_5_7b", "model@pm_model=smollm2_360m")
    assert (cfg.model.name, cfg.feedback_model.name, cfg.pm_model.name) == ("tiny", "qwen2_5_7b", "smollm2_360m")
    assert cfg.feedback_model.path == "Qwen/Qwen2.5-7B-Instruct" and cfg.feedback_model.trust_remote_code is False


def test_single_principle_and_custom_path(make_cfg):
    cfg = make_cfg("constitution=single", "constitution.principle=not-evasive")
    c = instantiate(cfg.constitution)
    import random

    assert [p.id for p in c.draw_rl(random.Random(0))] == ["not-evasive"]


def test_misspelled_field_fails_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="n_revison"):
        make_cfg("sl.n_revison=2")
    with pytest.raises(ConfigCompositionException):
        make_cfg("sl.n_revisions=many")  # wrong type
    with pytest.raises(ConfigCompositionException, match="nope"):
        make_cfg("label=nope")


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", "constitution=ensemble", "label=soft"],
        cwd=cai.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.constitution.variant == "ensemble" and cfg.constitution.ensemble_size == 0
    assert cfg.label.kind == "soft"


def test_model_hf_takes_any_checkpoint_and_the_labeller_and_pm_follow_its_fields(make_cfg, tiny_spec):
    """`model=hf model.name_or_path=DIR`: the policy, the feedback model and the PM backbone all load
    DIR; a field set on the feedback model alone parts it from the policy."""
    from cai.models import ModelSpec

    ckpt = tiny_spec.local_dir()  # a saved HF checkpoint directory
    cfg = make_cfg("model=hf", f"model.name_or_path={ckpt}", "model.dtype=float32")
    specs = [instantiate(cfg[k]) for k in ("model", "feedback_model", "pm_model")]
    assert all(isinstance(s, ModelSpec) and s.source == "hf" and s.local_dir() == ckpt for s in specs)
    assert all(s.dtype == "float32" for s in specs)  # the policy's override moved all three
    weights = specs[0].load_model().state_dict()["model.embed_tokens.weight"]
    assert weights.equal(tiny_spec.load_model().state_dict()["model.embed_tokens.weight"])
    parted = make_cfg("model=hf", f"model.name_or_path={ckpt}", "feedback_model.dtype=bfloat16", "model@pm_model=tiny")
    assert parted.feedback_model.dtype == "bfloat16" and parted.model.dtype == "auto" and parted.feedback_model.name_or_path == ckpt
    assert parted.pm_model.source == "tiny"


def test_a_path_given_to_a_model_that_reads_none_is_refused(make_cfg):
    with pytest.raises(CaiError, match="model=hf model.name_or_path=ID_OR_DIR"):
        instantiate(make_cfg("model=tiny", "model.path=/some/dir").model)


# The groups whose options a user picks on the command line, and where each puts its fields.
AXES = {g: g for g in GROUPS if g != "experiment"}
AXES |= {"model@feedback_model": "feedback_model", "model@pm_model": "pm_model"}


def own_values(group: str, option: str) -> dict:
    """The fields an option file sets itself (its defaults list, and what it builds on, aside)."""
    data = yaml.safe_load((CONF / group.split("@")[0] / f"{option}.yaml").read_text()) or {}
    return {k: v for k, v in data.items() if k != "defaults"}


@pytest.mark.parametrize("axis,option", [(a, o) for a in AXES for o in options(a.split("@")[0])])
def test_a_chosen_option_keeps_its_own_values_under_every_experiment(make_cfg, axis, option):
    """`label=soft` means label/soft.yaml's values, whatever experiment runs (no experiment overrides an axis)."""
    for experiment in options("experiment"):
        cfg = make_cfg(f"{axis}={option}", f"experiment={experiment}")
        composed = OmegaConf.to_container(cfg[AXES[axis]], resolve=False)
        for key, value in own_values(axis, option).items():
            assert composed[key] == value, f"{axis}={option} experiment={experiment}: {key} is {composed[key]!r}, the file says {value!r}"


def test_experiments_set_counts_only_never_an_axis():
    for experiment in options("experiment"):
        data = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
        assert not set(data) & set(AXES.values()), f"experiment/{experiment}.yaml sets {set(data) & set(AXES.values())}"
