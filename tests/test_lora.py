"""peft=lora: LoRA adapters for SFT, the PM and PPO, through `python train.py` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, train_in_process
from omegaconf import OmegaConf

from cai.config import PPOConfig
from cai.lora import add_adapters, merged_state_dict
from cai.rl import batch_rollouts, response_logprobs
from cai.stages.ppo import PPOModule

LORA = OmegaConf.create({"kind": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"})


def stage_dir(root: Path, stage: str) -> Path:
    [path] = [p for p in (root / "artifacts" / stage).iterdir() if p.is_dir() and not p.is_symlink()]
    return path


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    ppo = ("ppo.iterations=2", "ppo.rollouts=4", "ppo.max_new_tokens=6", "ppo.minibatch_size=4", "ppo.snapshot_every=1")
    for stage in ("sl_data", "sft", "pairs", "label", "pm", "ppo"):
        args = (*TINY_RUN, "logger=none", f"paths.root={root}", f"paths.output={root}/out", "peft=lora", "sft.lr=1e-3", "pm.lr=1e-3")
        assert train_in_process(*args, "ppo.lr=1e-3", *ppo, f"stage={stage}") is None
    return root


def test_lora_trains_adapters_and_writes_a_merged_model_and_the_adapter(lora_root, tiny_spec):
    """Each training stage writes a model plain transformers loads (merged) and the adapter peft loads, and they agree."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = stage_dir(lora_root, "sft")
    assert json.loads((sft / "adapter" / "adapter_config.json").read_text())["r"] == 16  # conf/peft/lora.yaml
    ids = torch.tensor([[1, 5, 9, 23, 7, 2]])
    merged = AutoModelForCausalLM.from_pretrained(sft / "model").eval()
    base = tiny_spec.load_model()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    with_adapter = PeftModel.from_pretrained(base, sft / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5)
    # The embeddings were not adapted: LoRA froze them.
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    pm = stage_dir(lora_root, "pm")
    assert (pm / "adapter" / "adapter_config.json").exists()
    score = AutoModelForSequenceClassification.from_pretrained(pm / "model").eval()
    with torch.no_grad():
        assert torch.isfinite(score(input_ids=ids).logits).all()
    ppo = stage_dir(lora_root, "ppo")
    manifest = json.loads((ppo / "manifest.json").read_text())
    assert manifest["status"] == "complete" and (ppo / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in (ppo / "snapshots").iterdir()) == ["iter-00001", "iter-00002"]
    history = json.loads((ppo / "history.json").read_text())
    assert abs(history[0]["ppo/train/kl"]) < 1e-5 < abs(history[-1]["ppo/train/kl"])  # the ref is SFT: KL 0 at the start


def test_the_ref_is_the_sft_model_with_the_adapter_off(tiny_spec):
    """PPO with LoRA keeps no copy of the policy: the ref's log-probs are the SFT model's, exactly."""
    actor, tok = tiny_spec.load_model(train=True), tiny_spec.load_tokenizer()
    lora = add_adapters(actor, LORA)
    torch.manual_seed(0)
    for name, p in actor.named_parameters():
        if "lora_B" in name:  # as after some training: the adapter changes the policy
            p.data.normal_(0, 0.05)
    ppo = OmegaConf.structured(PPOConfig(rollouts=2, max_new_tokens=4, minibatch_size=2, ppo_epochs=1))
    module = PPOModule(actor, tok, lambda c, o: [0.0] * len(o), [[{"role": "user", "content": "hi"}]], ppo, seed=0, lora=lora)
    assert module.ref is None
    batch = batch_rollouts([[1, 5, 9], [1, 7]], [[23, 4, 2], [8, 2]], tok.pad_token_id)
    sft = tiny_spec.load_model()
    with torch.no_grad():
        ref = module.ref_logprobs(batch)
        expected = response_logprobs(sft, batch)[0]
        policy = response_logprobs(actor, batch)[0]
    assert torch.allclose(ref, expected, atol=1e-6)
    assert not torch.allclose(policy, expected, atol=1e-3)
    # The merged weights are the adapted policy, under the plain model's names.
    plain = tiny_spec.load_model()
    plain.load_state_dict(merged_state_dict(lora))
    with torch.no_grad():
        assert torch.allclose(response_logprobs(plain, batch)[0], policy, atol=1e-5)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("critic.") for n in trainable)


def test_lora_refuses_what_it_does_not_run(tmp_path):
    code = train_in_process(*TINY_RUN, "logger=none", f"paths.root={tmp_path}", "peft=lora", "pm.trainable=head", "stage=check")
    assert isinstance(code, str) and "pm.trainable=head with peft=lora" in code
