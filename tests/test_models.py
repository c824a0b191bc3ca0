"""Model loading: the tiny random model, the embedded GGUF conversion, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.errors import CaiError
from cai.models import ModelSpec


def test_tiny_model_shape_and_tokenizer(tiny_spec):
    model = tiny_spec.load_model()
    tok = tiny_spec.load_tokenizer()
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tok) == 49152
    assert tok.padding_side == "left" and tok.pad_token is not None
    # seeded: the same spec builds the same weights, another seed different ones
    again = tiny_spec.load_model()
    other = ModelSpec(name="tiny", source="tiny", seed=1, cache=tiny_spec.cache).load_model()
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_tiny_local_dir_is_a_loadable_checkpoint(tiny_spec):
    from transformers import AutoModelForCausalLM

    path = Path(tiny_spec.local_dir())
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert reloaded.config.num_hidden_layers == 2


@pytest.mark.slow
def test_embedded_model_converts_to_a_plain_checkpoint(embedded_spec):
    path = Path(embedded_spec.local_dir())
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM refuses a gguf quantization_config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (path / "model.safetensors").exists() and (path / ".complete").exists()
    model = embedded_spec.load_model()
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_bad_model_settings_fail_clearly(tmp_path):
    with pytest.raises(CaiError, match="model.source: unknown source 'gguf'"):
        ModelSpec(name="x", source="gguf")
    with pytest.raises(CaiError, match="model.path: model 'x' has source=hub but no path"):
        ModelSpec(name="x", source="hub")
    with pytest.raises(CaiError, match="is not a directory"):
        ModelSpec(name="x", source="local", path=str(tmp_path / "nope"))
    with pytest.raises(CaiError, match="model.dtype: unknown dtype 'fp8'"):
        ModelSpec(name="x", source="tiny", dtype="fp8")


def test_unknown_hub_id_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = ModelSpec(name="nope", source="hub", path="no-such-org/no-such-model")
    with pytest.raises(CaiError, match="model.path: could not load model 'nope' from 'no-such-org/no-such-model'"):
        spec.load_tokenizer()


def test_training_loads_float32_masters_so_a_tiny_update_lands(tiny_spec):
    """A bf16 model trained with plain AdamW at PPO's learning rate: in bf16 most updates round away.

    `load_model(train=True)` loads float32 whatever the spec's dtype, so one step at lr 1e-6 changes
    every parameter that has a gradient; the inference load keeps the spec's dtype.
    """
    import dataclasses

    import torch

    spec = dataclasses.replace(tiny_spec, dtype="bfloat16")
    assert next(spec.load_model().parameters()).dtype == torch.bfloat16

    def changed_after_one_step(model) -> float:
        before = [p.detach().clone() for p in model.parameters()]
        ids = torch.randint(0, 1000, (2, 16))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0).step()
        with_grad = [(b, p) for b, p in zip(before, model.parameters()) if p.grad is not None]
        return sum(int((b != p.detach()).sum()) for b, p in with_grad) / sum(p.numel() for _, p in with_grad)

    trained = spec.load_model(train=True)
    assert next(trained.parameters()).dtype == torch.float32
    assert changed_after_one_step(trained) > 0.99  # every weight with a gradient moved (a few grads are exactly 0)
    assert changed_after_one_step(spec.load_model()) < 0.5  # the bf16-master failure this guards against


def test_a_frozen_model_stores_bf16_weights_and_computes_in_float32(tiny_spec):
    """PPO's ref and reward (`ppo.frozen_dtype=bfloat16`): half the weight memory, and exactly the
    maths of float32 weights rounded to bf16, since each weight is widened where a layer uses it."""
    from cai.models import frozen, placement

    model = tiny_spec.load_model()
    rounded = tiny_spec.load_model()  # the same weights, rounded, stored wide; RoPE's inv_freq stays float32
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16))
    stored = frozen(tiny_spec.load_model(), torch.bfloat16, torch.float32)
    assert placement(stored) == {"device": "cpu", "dtype": "bfloat16", "compute_dtype": "float32"}
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(stored) * 2 == bytes_of(model)
    assert not any(p.requires_grad for p in stored.parameters()) and not stored.training
    if model.config.tie_word_embeddings:  # still one tensor for the embedding and the LM head
        assert (
            stored.get_output_embeddings().parametrizations.weight.original
            is stored.get_input_embeddings().parametrizations.weight.original
        )
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        out, want, exact = stored(input_ids=ids).logits, rounded(input_ids=ids).logits, model(input_ids=ids).logits
    assert out.dtype == torch.float32 and torch.equal(out, want)
    # Buffers are not weights: RoPE's frequencies stay float32 and exact (rounded, positions drift).
    buffers = dict(model.named_buffers())
    assert all(b.dtype == buffers[n].dtype and torch.equal(b, buffers[n]) for n, b in stored.named_buffers())
    drifted = tiny_spec.load_model().to(torch.bfloat16).float()  # what `.to(bfloat16)` did: inv_freq rounded too
    with torch.no_grad():
        assert not torch.equal(drifted(input_ids=ids).logits, want)
    assert 0 < (out - exact).abs().max() < 0.05  # the rounding moves the logits a little, not far
    # Storage as wide as the compute dtype is a plain cast: nothing to widen.
    assert "compute_dtype" not in placement(frozen(tiny_spec.load_model(), torch.float32, torch.float32))


def test_a_hub_model_is_known_by_the_commit_it_resolves_to(tmp_path, monkeypatch, tiny_spec):
    """A hub id names whatever its branch points at now: the identity is the commit, read from the HF cache offline."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-chat"
    for sha in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_spec.local_dir(), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name="tiny-chat", source="hf", name_or_path="someone/tiny-chat", dtype="float32", cache=str(tmp_path))
    (repo / "refs" / "main").write_text("a" * 40)
    assert spec.identity() == f"hub:someone/tiny-chat@{'a' * 40}"
    (repo / "refs" / "main").write_text("b" * 40)  # the branch moved on
    assert spec.identity() == f"hub:someone/tiny-chat@{'b' * 40}"
    missing = ModelSpec(name="x", source="hf", name_or_path="someone/not-cached", dtype="float32", cache=str(tmp_path))
    assert "unresolved" in missing.identity()


def test_a_directory_is_known_by_its_files(tmp_path, tiny_spec):
    import shutil

    from cai.models import weights_digest

    shutil.copytree(tiny_spec.local_dir(), tmp_path / "a")
    before = weights_digest(tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("a model card changes no weights")
    assert weights_digest(tmp_path / "a") == before
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert weights_digest(tmp_path / "a") != before
