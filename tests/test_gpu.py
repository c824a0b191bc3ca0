"""GPU-only checks: SFT and PPO under DeepSpeed ZeRO-2 and ZeRO-3 (CI has no GPU; results go in the issue notes).

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from cai.pipeline import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")]

SMALL = ("model=tiny", "data.n_red_team=8", "sl.max_new_tokens=12", "generation.batch_size=8")


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_sft_under_deepspeed(make_cfg, tmp_path, tiny_spec, strategy):
    from transformers import AutoModelForCausalLM

    run(make_cfg("stage=sl_data", *SMALL))
    run(make_cfg("stage=sft", *SMALL, f"strategy={strategy}", "trainer.devices=1", "sft.lr=1e-3"))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "sft" / "latest" / "model")
    w = "model.layers.0.mlp.up_proj.weight"
    # ZeRO-3 shards parameters: the saved checkpoint must hold full, gathered, trained tensors
    start = tiny_spec.load_model().state_dict()[w].cpu()  # load_model puts it on the GPU
    assert trained.state_dict()[w].shape == start.shape
    assert not torch.equal(trained.state_dict()[w], start)


# minibatch 4 of 8 rollouts: two steps, a separate scoring forward; 8: one step whose forward also scores.
# The tiny model is float32, so the frozen ref stores bf16 weights widened per use (a parametrization) under DeepSpeed.
@pytest.mark.parametrize("strategy,minibatch", [("deepspeed_zero2", 4), ("deepspeed_zero3", 4), ("deepspeed_zero3", 8)])
def test_ppo_under_deepspeed(make_cfg, tmp_path, tiny_spec, strategy, minibatch):
    """PPO generates from gathered (never sharded) weights under ZeRO-3 and saves full tensors."""
    import json

    from transformers import AutoModelForCausalLM

    small = (*SMALL, "data.n_helpful=4", "pairs.max_new_tokens=12")
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        run(make_cfg(f"stage={stage}", *small))
    ppo = (
        "ppo.iterations=2",
        "ppo.rollouts=8",
        "ppo.max_new_tokens=8",
        f"ppo.minibatch_size={minibatch}",
        "ppo.lr=1e-3",
        "ppo.snapshot_every=1",
    )
    run(make_cfg("stage=ppo", *small, *ppo, f"strategy={strategy}", "trainer.devices=1"))
    out = tmp_path / "artifacts" / "ppo" / "latest"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(h["ppo/train/response_len"] > 0 for h in history)
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "sft" / "latest" / "model")
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    w = "model.layers.0.mlp.up_proj.weight"
    assert policy.state_dict()[w].shape == sft.state_dict()[w].shape
    assert not torch.equal(policy.state_dict()[w], sft.state_dict()[w])
    assert (out / "snapshots" / "iter-00001" / "model.safetensors").exists()


def test_stage_all_puts_every_model_on_the_gpu(make_cfg):
    """The placement rule: every model of every stage (policy, feedback model, PM, ref, critic, judge) ran on cuda."""
    import json

    from cai.pipeline import STAGES, stage_path

    small = (*SMALL, "data.n_helpful=4", "pairs.max_new_tokens=12", "model.dtype=auto", "ppo.iterations=2", "ppo.rollouts=4")
    cfg = make_cfg("stage=all", *small, "eval.n_red_team=2", "eval.n_helpful=2", "eval.max_new_tokens=8")
    run(cfg)
    for stage in STAGES:
        models = json.loads((stage_path(cfg, stage) / "manifest.json").read_text())["models"]
        assert models and all(m["device"].startswith("cuda") for m in models.values()), (stage, models)
    sft = json.loads((stage_path(cfg, "sft") / "manifest.json").read_text())["models"]["policy"]
    assert sft["dtype"] == "float32" and sft["precision"] == "bf16-mixed"  # float32 masters, bf16 compute


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_pm_under_deepspeed(make_cfg, tmp_path, strategy):
    """The PM trains under ZeRO-2/3 and saves whole, gathered tensors."""
    from transformers import AutoModelForSequenceClassification

    small = (*SMALL, "data.n_helpful=4", "pairs.max_new_tokens=12")
    for stage in ("sl_data", "sft", "pairs", "label"):
        run(make_cfg(f"stage={stage}", *small))
    run(make_cfg("stage=pm", *small, f"strategy={strategy}", "trainer.devices=1", "pm.lr=1e-3"))
    pm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "artifacts" / "pm" / "latest" / "model")
    assert pm.score.weight.shape == (1, 64) and torch.isfinite(pm.score.weight).all()


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_lora_through_sft_pm_and_ppo_under_a_strategy(make_cfg, tmp_path, strategy):
    """peft=lora composes with DDP and ZeRO-2 on one GPU: adapters train, the merged models load with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    small = (*SMALL, "data.n_helpful=4", "pairs.max_new_tokens=12", "peft=lora")
    for stage in ("sl_data", "pairs", "label"):
        if stage == "pairs":
            run(make_cfg("stage=sft", *small, f"strategy={strategy}", "trainer.devices=1", "sft.lr=1e-3"))
        run(make_cfg(f"stage={stage}", *small))
    run(make_cfg("stage=pm", *small, f"strategy={strategy}", "trainer.devices=1"))
    ppo = ("ppo.iterations=2", "ppo.rollouts=8", "ppo.max_new_tokens=8", "ppo.minibatch_size=4", "ppo.lr=1e-3")
    run(make_cfg("stage=ppo", *small, *ppo, f"strategy={strategy}", "trainer.devices=1"))
    art = tmp_path / "artifacts"
    sft = AutoModelForCausalLM.from_pretrained(art / "sft" / "latest" / "model")
    policy = AutoModelForCausalLM.from_pretrained(art / "ppo" / "latest" / "model")
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(policy.state_dict()[w], sft.state_dict()[w])  # the merged adapter moved it
    assert (art / "ppo" / "latest" / "adapter" / "adapter_config.json").is_file()
    AutoModelForSequenceClassification.from_pretrained(art / "pm" / "latest" / "model")
