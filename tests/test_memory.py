"""The memory plan (cai/memory.py): parameter counts against real models, the arithmetic against hand
computation, and the plan through the front door (`python train.py`), before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_in_process

from cai import memory
from cai.memory import Setup, Shape, model_shape, trained

# Qwen/Qwen2.5-7B-Instruct's config.json (its public shape; no weights are needed to plan).
QWEN_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def qwen_7b(tmp_path_factory) -> Path:
    """A directory holding only Qwen2.5-7B's config: enough for the plan, which never reads weights."""
    d = tmp_path_factory.mktemp("qwen2_5_7b")
    (d / "config.json").write_text(json.dumps(QWEN_7B))
    return d


def qwen_cfg(qwen_7b: Path, *overrides: str):
    """The composed config of a run on Qwen2.5-7B's shape (planned only: its weights are never read)."""
    from hydra import compose, initialize_config_dir

    import cai

    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        return compose("train", overrides=["logger=none", "model=hf", f"model.name_or_path={qwen_7b}", *overrides])


def run(tmp_path: Path, capsys, *overrides: str) -> tuple[object, str]:
    """`python train.py` in this process: what it exited with (a refusal is its one line) and what it printed."""
    code = train_in_process("logger=none", f"paths.root={tmp_path}", f"paths.output={tmp_path}/out", *overrides)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_shape_counts_the_tiny_models_parameters_and_lora_counts_what_peft_trains(tiny_spec):
    from omegaconf import OmegaConf

    from cai.lora import add_adapters

    shape = model_shape(tiny_spec)
    model = tiny_spec.load_model(train=True)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_dim, shape.vocab) == (2, 64, 128, 32, 49152)
    peft = OmegaConf.create({"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    add_adapters(model, peft, "causal")
    assert shape.lora_params(4, "all-linear") == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A named subset: q_proj is 64 -> 64, v_proj 64 -> 32, in each of the 2 layers: 2 * 4 * (128 + 96).
    assert shape.lora_params(4, ["q_proj", "v_proj"]) == 2 * 4 * ((64 + 64) + (64 + 32))


def test_qwen_7b_shape_has_its_published_parameter_count(qwen_7b):
    from cai.models import ModelSpec

    shape = model_shape(ModelSpec(name="q", source="hf", name_or_path=str(qwen_7b)))
    assert shape.params == 7_615_616_512  # Qwen2.5-7B's 7.61B, untied head included
    assert shape.head_params == 152064 * 3584 and shape.kv_dim == 4 * 128


def test_trained_bytes_hand_computed():
    """16 bytes per trained parameter without DeepSpeed; ZeRO shards optimizer, gradients, weights in turn."""
    s = Shape(params=1000, layers=2, hidden=8, intermediate=16, kv_dim=4, vocab=10, head_params=0)
    plain = Setup(
        devices=4, zero=0, offload_optimizer=False, offload_parameters=False, bf16=False, lora=None, checkpointing=True, vllm_gib=0
    )
    r = trained("sft", "actor", s, plain, batch=1, length=1, trainable=1000, logits=0)
    assert (r.weights, r.gradients, r.optimizer) == (4000, 4000, 8000)
    z3 = Setup(devices=4, zero=3, offload_optimizer=False, offload_parameters=False, bf16=True, lora=None, checkpointing=True, vllm_gib=0)
    r = trained("sft", "actor", s, z3, batch=1, length=1, trainable=1000, logits=0)
    assert (r.weights, r.gradients, r.optimizer) == (2000 / 4, 2000 / 4, 12000 / 4)  # bf16 module, fp32 master + moments
    lora = trained("sft", "actor", s, plain, batch=1, length=1, trainable=10, logits=0)
    assert (lora.weights, lora.gradients, lora.optimizer) == (4000, 40, 80)  # the frozen base still sits there
    # Activations, 1 sequence of 1 token, float32, checkpointed: each layer's input (2 x 8 x 4) plus
    # one layer recomputed ((6*8 + 2*4 + 5*16) x 4).
    one = trained("sft", "actor", s, plain, batch=1, length=1, trainable=1000, logits=0)
    assert one.activations == 2 * 8 * 4 + (6 * 8 + 2 * 4 + 5 * 16) * 4
    assert memory.kv_cache(s, batch=3, length=5, dtype_bytes=2) == 2 * 2 * 4 * 3 * 5 * 2


def test_the_7b_plan_on_one_80gb_gpu_fits_with_lora_and_names_zero3_without(tmp_path, capsys, qwen_7b):
    model = ("model=hf", f"model.name_or_path={qwen_7b}", "model.dtype=bfloat16", "memory.device_gib=80")
    code, out = run(tmp_path, capsys, "stage=check", "peft=lora", *model)
    assert code is None, out
    assert "memory plan, GiB per device (budget 72.00 GiB: 1 x 80 GiB GPU" in out
    ppo_total = next(line for line in out.splitlines() if line.startswith("  ppo") and "= total" in line)
    assert ppo_total.endswith("fits") and 40 < float(ppo_total.split()[-2]) < 72
    assert not [line for line in out.splitlines() if line.startswith("  ppo") and line.split()[1] == "ref"]  # LoRA: no copy

    code, _ = run(tmp_path, capsys, "stage=check", "peft=none", *model)
    assert isinstance(code, str) and len(code.splitlines()) == 1  # sys.exit("error: ..."): exit status 1
    assert code.startswith("error: memory: stage ppo needs 149.7 GiB per device")
    assert "it fits with peft=lora or strategy=deepspeed_zero3_offload" in code
    assert "memory.check=false" in code


def test_a_plan_that_does_not_fit_is_one_line_before_any_model_loads(tmp_path, capsys, qwen_7b, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    code, _ = run(tmp_path, capsys, "model=hf", f"model.name_or_path={qwen_7b}", "model.dtype=bfloat16", "memory.device_gib=40")
    assert isinstance(code, str) and code.startswith("error: memory: stage ppo needs ")
    assert not (tmp_path / "artifacts" / "sl_data").exists()  # nothing ran, nothing was written

    code, out = run(
        tmp_path, capsys, "stage=check", "model=hf", f"model.name_or_path={qwen_7b}", "memory.device_gib=40", "memory.check=false"
    )
    assert code is None and "check: the config" in out  # warned, then went on


def test_more_devices_shard_under_zero3_and_the_plan_suggests_it(tmp_path, capsys, qwen_7b):
    """Planned for 8 GPUs of 40 GiB (trainer.devices=8 on this machine only plans: stage=check runs nothing)."""

    def cfg(*o):
        return qwen_cfg(qwen_7b, "memory.device_gib=40", *o)

    one = memory.plan(cfg("trainer.devices=1"), ("sft",)).stage_totals()["sft"]
    eight = memory.plan(cfg("trainer.devices=8", "strategy=deepspeed_zero3"), ("sft",)).stage_totals()["sft"]
    assert eight < one / 5  # weights, gradients and optimizer state split 8 ways; activations are not
    assert "strategy=deepspeed_zero3" in memory.candidates(cfg("trainer.devices=8"), "sft")


def test_the_label_stage_on_vllm_is_planned_as_the_engines_share(tmp_path, qwen_7b):
    """label.engine=vllm loads no HF feedback model: the stage needs what the engine reserves, as PPO's rollouts do."""

    def label_roles(*o):
        return memory.plan(qwen_cfg(qwen_7b, "model.dtype=bfloat16", "memory.device_gib=80", *o), ("label",)).roles

    [hf] = label_roles("generation=vllm")
    [engine] = label_roles("generation=vllm", "label.engine=vllm", "generation.gpu_memory_utilization=0.5")
    assert hf.weights > 14 * 2**30 and hf.activations > 0  # the 7B feedback model's bf16 weights, in this process
    assert (engine.weights, engine.activations, engine.kv_cache) == (0.0, 0.0, 0.5 * 80 * 2**30)
