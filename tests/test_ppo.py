"""PPO on the tiny model: the optimiser raises a synthetic reward, resume equals an uninterrupted run,
and the stage runs end to end against a real preference model."""

from __future__ import annotations

import collections
import copy
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_RUN, train_in_process
from omegaconf import OmegaConf

from cai.config import PPOConfig
from cai.errors import CaiError
from cai.generation import SamplingParams, derive_seed
from cai.generation.hf import HFGenerator
from cai.pipeline import run, stage_path
from cai.rl import batch_rollouts
from cai.stages.ppo import PPOModule, train_ppo

PROMPTS = [[{"role": "user", "content": f"Tell me something about topic {i}."}] for i in range(16)]
TRAINER = OmegaConf.create({"trainer": {"precision": "32-true", "accelerator": "cpu", "devices": 1, "num_nodes": 1}})


def ppo_cfg(**kw):
    base = dict(rollouts=8, max_new_tokens=8, minibatch_size=4, ppo_epochs=2, lr=1e-3, kl_coef=0.01, adaptive_kl=False, table_every=0)
    return OmegaConf.structured(PPOConfig(**{**base, **kw}))


def test_batch_rollouts_masks_the_response_tokens():
    b = batch_rollouts([[1, 2, 3], [4, 5]], [[7, 8], [9]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 5, 9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position j scores token j+1: response tokens 7, 8 sit at 3, 4 -> positions 2, 3
    assert b["action_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]


def test_response_only_log_probs_equal_the_full_computation(tiny_spec, monkeypatch):
    """PPO runs the LM head on answer positions only; log-probs, entropies, hidden states and their
    gradients must be those of the full (B, L, V) computation, on the answers, with ragged prompts."""
    from cai.losses import logprobs_and_entropy
    from cai.rl import response_logprobs, token_logprobs

    model = tiny_spec.load_model()
    with torch.no_grad():  # a peaked model, so that a wrong position would show
        model.lm_head.weight.mul_(20)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (7, 3, 11)]
    responses = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (4, 9, 1)]
    batch = batch_rollouts(prompts, responses, pad_id=0)
    mask = batch["action_mask"].bool()
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    want_logp = token_logprobs(full.logits, batch["input_ids"])
    want_entropy = logprobs_and_entropy(full.logits[:, :-1], batch["input_ids"][:, 1:])[1]
    monkeypatch.setattr("cai.rl.HEAD_CHUNK", 4)  # training runs the head in chunks: several here
    logp, entropy, hidden = response_logprobs(model, batch, with_entropy=True)
    with torch.no_grad():  # scoring runs it in one go
        assert torch.allclose(response_logprobs(model, batch)[0], logp, atol=1e-5)
    assert mask.sum() == 14 and logp.shape == want_logp.shape == mask.shape
    assert torch.allclose(logp[mask], want_logp[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], want_entropy[mask], atol=1e-5)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert torch.allclose(hidden, full.hidden_states[-1], atol=1e-5)  # what the value head reads
    # the same gradients reach the weights
    (want_logp * mask).sum().backward()
    want_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logp.sum().backward()
    assert torch.allclose(model.lm_head.weight.grad, want_grad, atol=1e-4)


def test_packed_rollouts_score_and_train_as_the_rollouts_alone(tiny_spec):
    """batch_rollouts(group=k): each prompt's k answers in one packed row; log-probs, hidden states (what
    the value head reads), a separate critic's values, PM rewards and gradients are those of each rollout alone."""
    from cai.models import packing_problem
    from cai.reward import PreferenceModel, pm_reward
    from cai.rl import CriticModel, response_logprobs

    model = tiny_spec.load_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (7, 3)]
    responses = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (4, 9, 1, 6)]
    prompts = [prompts[0], prompts[0], prompts[1], prompts[1]]  # two groups of two answers
    packed, alone = batch_rollouts(prompts, responses, 0, group=2), batch_rollouts(prompts, responses, 0)
    assert packed["packed"]["input_ids"].shape == (2, 7 + 4 + 9)
    outs = [response_logprobs(model, b) for b in (packed, alone)]
    mask = alone["action_mask"].bool()
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][2][:, :-1][mask], outs[1][2][:, :-1][mask], atol=1e-5, rtol=1e-5)
    grads = []
    for logp, _, _ in outs:
        model.zero_grad()
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # scoring: the head in one go
        torch.testing.assert_close(response_logprobs(model, packed)[0], outs[1][0].detach(), atol=1e-5, rtol=1e-5)
    model.config.sliding_window = 4  # a window a custom mask would drop: the packed rows are not run
    assert "sliding window" in packing_problem(model)
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(model, packed)[0], response_logprobs(model, alone)[0])
    pm = PreferenceModel.from_causal_lm(tiny_spec.load_model()).eval()
    critic = CriticModel(pm.backbone, pm.head)
    with torch.no_grad():
        torch.testing.assert_close(critic(packed)[mask], critic(alone)[mask], atol=1e-5, rtol=1e-5)
    tok = tiny_spec.load_tokenizer()
    convs = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    answers = [collections.namedtuple("Answer", "text")(t) for t in ("Sure.", "No, I won't.", "Here you go", "Maybe")]
    both = [pm_reward(pm, tok, 128, 8, group)(convs, answers) for group in (2, 1)]
    assert both[0] == pytest.approx(both[1], abs=1e-5)


def test_ppo_raises_a_synthetic_reward(tiny_spec):
    actor, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    # The random model is near-uniform over 49k tokens, so no token would be sampled often enough
    # to learn from. Sharpen it (logits x13 through the tied embeddings: one token then comes about
    # once per 8-token answer, on every prompt), then reward +1 per occurrence of the token it samples most.
    with torch.no_grad():
        actor.model.embed_tokens.weight.mul_(13.0)
    counts = collections.Counter()
    for s in range(4):
        params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=derive_seed("target", s))
        counts.update(t for c in HFGenerator(actor, tok, batch_size=16).generate(PROMPTS, params) for t in c.token_ids)
    target = counts.most_common(1)[0][0]

    def reward(convs, completions):
        return [float(sum(t == target for t in c.token_ids)) for c in completions]

    module = PPOModule(actor.train(), tok, reward, PROMPTS, ppo_cfg(), seed=0)
    train_ppo(module, 30, "unused", 0, TRAINER)
    rewards = [h["ppo/train/reward"] for h in module.history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 2.0 and last > 2 * first, rewards
    assert all(h["ppo/train/kl"] == h["ppo/train/kl"] for h in module.history)  # no NaN


class Stop(Exception):
    pass


class StopAfter(L.Callback):
    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch + 1 == self.iterations:
            raise Stop


def test_the_separate_critic_trains_and_the_reward_model_stays_frozen(tiny_spec):
    from cai.reward import PreferenceModel, pm_reward
    from cai.rl import CriticModel

    pm = PreferenceModel.from_causal_lm(tiny_spec.load_model())
    critic = CriticModel(copy.deepcopy(pm.backbone), copy.deepcopy(pm.head))
    reward_fn = pm_reward(pm.requires_grad_(False), tiny_spec.load_tokenizer(), 128, 8)
    frozen = {k: v.clone() for k, v in pm.state_dict().items()}
    start = {k: v.clone() for k, v in critic.state_dict().items()}
    module = PPOModule(tiny_spec.load_model().train(), tiny_spec.load_tokenizer(), reward_fn, PROMPTS, ppo_cfg(), seed=0, critic=critic)
    train_ppo(module, 2, "unused", 0, TRAINER)
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in frozen.items())  # the reward model never moves
    assert any(not torch.equal(v, critic.state_dict()[k]) for k, v in start.items())  # the value model learns
    assert all(math.isfinite(h["ppo/train/value_loss"]) for h in module.history)


def test_one_step_iterations_reuse_the_update_forward_and_train_alike(tiny_spec, monkeypatch):
    """With one PPO step per iteration (one epoch, one minibatch), the update's forward is also the
    sampling-time log-probs and values: the actor runs once per iteration, and training is unchanged."""
    calls = []
    forward = PPOModule.actor_forward
    monkeypatch.setattr(PPOModule, "actor_forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))

    def trained(reuse: bool) -> PPOModule:
        monkeypatch.setattr(PPOModule, "one_step", property(lambda self: reuse))
        reward = lambda convs, completions: [len(c.token_ids) / 8 + (c.token_ids[0] % 7) / 7 for c in completions]  # noqa: E731
        cfg = ppo_cfg(rollouts=8, minibatch_size=8, ppo_epochs=1)
        module = PPOModule(tiny_spec.load_model().train(), tiny_spec.load_tokenizer(), reward, PROMPTS, cfg, seed=5)
        calls.clear()
        train_ppo(module, 3, "unused", 0, TRAINER)
        assert len(calls) == 3 * (1 if reuse else 2)
        return module

    reused, apart = trained(True), trained(False)
    for a, b in zip(reused.history, apart.history):
        for key in ("reward", "kl", "policy_loss", "value_loss", "clipfrac"):
            assert a[f"ppo/train/{key}"] == pytest.approx(b[f"ppo/train/{key}"], abs=1e-5), key
    # The same steps up to float rounding, which AdamW can scale up where a gradient is ~0: within 1/10 of one lr=1e-3 step.
    for (name, p), q in zip(reused.actor.named_parameters(), apart.actor.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name
    monkeypatch.undo()  # the real rule: one epoch and a minibatch of every rollout
    assert reused.one_step and not PPOModule(tiny_spec.load_model(), tiny_spec.load_tokenizer(), None, PROMPTS, ppo_cfg(), 0).one_step


def test_resume_equals_an_uninterrupted_run(tiny_spec, tmp_path):
    def module():
        def reward(convs, completions):
            return [len(c.token_ids) / 8 + (c.token_ids[0] % 7) / 7 for c in completions]

        return PPOModule(
            tiny_spec.load_model().train(),
            tiny_spec.load_tokenizer(),
            reward,
            PROMPTS,
            ppo_cfg(rollouts=4, max_new_tokens=6, adaptive_kl=True, target_kl=0.1),
            seed=3,
        )

    straight = module()
    train_ppo(straight, 6, tmp_path / "straight", 0, TRAINER)

    interrupted = module()
    with pytest.raises(Stop):
        train_ppo(interrupted, 6, tmp_path / "resumed", 2, TRAINER, callbacks=[StopAfter(4)])
    assert len(interrupted.history) == 4 and (tmp_path / "resumed" / "checkpoints" / "last.ckpt").exists()
    resumed = module()
    train_ppo(resumed, 6, tmp_path / "resumed", 2, TRAINER)
    assert [h["iteration"] for h in resumed.history] == list(range(6))
    for a, b in zip(straight.history, resumed.history):
        assert a["ppo/train/reward"] == pytest.approx(b["ppo/train/reward"], abs=1e-6)
        assert a["ppo/train/kl_coef"] == pytest.approx(b["ppo/train/kl_coef"], abs=1e-9)
    assert (
        resumed.kl_ctl.beta == pytest.approx(straight.kl_ctl.beta) and resumed.kl_ctl.beta != 0.01
    )  # the controller moved and was restored
    for (name, p), q in zip(straight.actor.named_parameters(), resumed.actor.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_ppo_stage_end_to_end(make_cfg, tmp_path):
    small = TINY_RUN
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        run(make_cfg(f"stage={stage}", *small))
    ppo = (
        "ppo.iterations=4",
        "ppo.rollouts=8",
        "ppo.max_new_tokens=8",
        "ppo.minibatch_size=4",
        "ppo.checkpoint_every=2",
        "ppo.table_every=2",
        "ppo.snapshot_every=2",
    )
    cfg = make_cfg("stage=ppo", *small, *ppo, "logger=csv", f"logger.dir={tmp_path}/log")
    [summary] = run(cfg)
    out = stage_path(cfg, "ppo")
    assert (out / "model" / "model.safetensors").exists() and summary["path"] == str(out / "model")
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["iter-00002", "iter-00004"]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 4
    # The ref keeps bf16 weights (ppo.frozen_dtype) and the actor starts from the same rounded ones: no KL at the
    # start beyond float rounding (with the SFT weights unrounded, this tiny model's reads ~1e-3).
    assert abs(history[0]["ppo/train/kl"]) < 1e-4 and abs(history[-1]["ppo/train/kl"]) > 1e-4
    for key in (
        "reward",
        "kl",
        "entropy",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "policy_loss",
        "response_len",
        "refusal_rate",
        "boilerplate_rate",
        "tokens_per_s",
    ):
        assert f"ppo/train/{key}" in history[-1]
    assert 0 < history[-1]["ppo/train/response_len"] <= 8
    log = "".join(p.read_text() for p in (tmp_path / "log").rglob("metrics.csv"))
    assert "ppo/train/kl" in log and "ppo/time/generation_s" in log
    rollouts = (tmp_path / "log" / "tables" / "ppo_rollouts.jsonl").read_text().splitlines()  # one key, every iteration
    assert len({json.loads(r)["iteration"] for r in rollouts}) > 1
    assert not (out / "checkpoints").exists()

    # The other critic form: a separate value model initialised from the PM (loaded once, copied).
    critic = make_cfg("stage=ppo", *small, *ppo, "ppo.value_model=critic")
    [summary] = run(critic)
    assert stage_path(critic, "ppo") != out and "cached" not in summary["metric"]
    history = json.loads((stage_path(critic, "ppo") / "history.json").read_text())
    assert len(history) == 4 and all(math.isfinite(h["ppo/train/value_loss"]) for h in history)
    # ppo.frozen_dtype=float32 keeps the ref and reward whole: no bf16 storage, no widening.
    whole = make_cfg("stage=ppo", *small, *ppo, "ppo.frozen_dtype=float32")
    run(whole)
    models = json.loads((stage_path(whole, "ppo") / "manifest.json").read_text())["models"]
    assert all(models[r]["dtype"] == "float32" and "compute_dtype" not in models[r] for r in ("ref", "reward")), models


def test_mixed_precision_clips_the_fused_step(make_cfg, tmp_path):
    """Under `*-mixed` precision (a GPU's default; bf16-mixed runs on a CPU too) PPO and SFT clip gradients.

    Lightning's AMP plugin refuses to clip a fused optimizer's gradients, so the GPU check's PPO failed at its
    first step; the optimizer is foreach there.
    """
    mixed = (*TINY_RUN, "trainer.precision=bf16-mixed")
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        run(make_cfg(f"stage={stage}", *mixed))
    ppo = make_cfg("stage=ppo", *mixed, "ppo.iterations=1", "ppo.rollouts=4", "ppo.max_new_tokens=4")
    [summary] = run(ppo)
    assert len(json.loads((stage_path(ppo, "ppo") / "history.json").read_text())) == 1
    assert "bf16-mixed" in summary["ran_on"]
    [summary] = run(make_cfg("stage=sft", *mixed, "trainer.gradient_clip_val=1.0"))  # Lightning's own clipping
    assert "bf16-mixed" in summary["ran_on"]


def test_ppo_on_a_model_with_dropout_and_the_reward_options(make_cfg, tmp_path, tiny_spec):
    """Dropout is off in PPO's passes (the actor equals the ref at the start: KL 0, as TRL and OpenRLHF
    do); kl_coef is logged as the value that penalised the iteration; running reward normalisation and
    the missing-eos penalty run through stage=ppo."""
    import shutil

    mine = tmp_path / "with-dropout"
    shutil.copytree(tiny_spec.local_dir(), mine)
    config = json.loads((mine / "config.json").read_text())
    (mine / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    small = (*[a for a in TINY_RUN if a != "model=tiny"], "model=hf", f"model.name_or_path={mine}")
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        run(make_cfg(f"stage={stage}", *small))
    ppo = ("ppo.iterations=3", "ppo.rollouts=8", "ppo.max_new_tokens=8", "ppo.reward_norm=running", "ppo.missing_eos_penalty=1.0")
    cfg = make_cfg("stage=ppo", *small, *ppo)
    run(cfg)
    history = json.loads((stage_path(cfg, "ppo") / "history.json").read_text())
    assert abs(history[0]["ppo/train/kl"]) < 1e-4  # 0.035 nats with dropout left on in the actor's passes
    assert history[0]["ppo/train/kl_coef"] == cfg.ppo.kl_coef  # the coefficient iteration 0 was penalised with
    assert history[1]["ppo/train/kl_coef"] != cfg.ppo.kl_coef  # the adaptive controller moved it after
    assert all(0 <= h["ppo/train/truncated_rate"] <= 1 for h in history) and history[0]["ppo/train/truncated_rate"] > 0
    assert json.loads((mine / "config.json").read_text())["attention_dropout"] == 0.5


def test_the_critic_refuses_a_pm_with_another_tokenizer(make_cfg, tmp_path, tiny_spec):
    """ppo.value_model=critic reads the actor's token ids with the PM's backbone: another vocabulary is refused before any model loads."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_spec.local_dir(), other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<new-word-1>", "<new-word-2>"])
    model = AutoModelForCausalLM.from_pretrained(other)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    cfg = make_cfg("stage=ppo", "model=tiny", "model@pm_model=hf", f"pm_model.name_or_path={other}", "ppo.value_model=critic")
    with pytest.raises(CaiError, match="ppo.value_model=critic: the PM backbone .* has another tokenizer than the policy"):
        run(cfg)
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("manifest.json"))


@pytest.fixture(scope="module")
def upstream_of_ppo(tmp_path_factory) -> Path:
    """An artifacts root with every stage before PPO, on the tiny model, made through `python train.py`."""
    root = tmp_path_factory.mktemp("ppo-root")
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        assert train_in_process(*TINY_RUN, "logger=none", f"paths.root={root}", f"paths.output={root}/out", f"stage={stage}") is None
    return root


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_critic_free_ppo_through_the_cli(upstream_of_ppo, tmp_path, advantage):
    """`python train.py stage=ppo ppo.advantage=grpo|rloo ppo.samples_per_prompt=4`: no critic is built, each
    prompt is answered 4 times in a row, and the policy moves away from SFT (the KL grows from 0)."""
    root = tmp_path / "root"
    shutil.copytree(upstream_of_ppo / "artifacts", root / "artifacts", symlinks=True)
    ppo = ("ppo.iterations=3", "ppo.rollouts=8", "ppo.samples_per_prompt=4", "ppo.max_new_tokens=8", "ppo.minibatch_size=4")
    ppo += ("ppo.table_every=1", "ppo.lr=1e-3", f"ppo.advantage={advantage}", "logger=csv", f"logger.dir={tmp_path}/log")
    assert train_in_process(*TINY_RUN, f"paths.root={root}", f"paths.output={root}/out", "stage=ppo", *ppo) is None
    [out] = [p for p in (root / "artifacts" / "ppo").iterdir() if p.is_dir() and not p.is_symlink()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "critic" not in manifest["models"] and "actor" in manifest["models"]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and "ppo/train/value_loss" not in history[-1]
    assert all(math.isfinite(h["ppo/train/policy_loss"]) for h in history)
    assert abs(history[0]["ppo/train/kl"]) < 1e-4 and abs(history[-1]["ppo/train/kl"]) > 1e-4
    rows = [json.loads(r) for r in (tmp_path / "log" / "tables" / "ppo_rollouts.jsonl").read_text().splitlines()]
    first = [r["prompt"] for r in rows if r["iteration"] == 0]
    assert len(first) == 8 and all(len(set(first[g : g + 4])) == 1 for g in (0, 4))  # two groups of 4 answers to one prompt


@pytest.mark.parametrize("minibatch", [8, 4])
def test_sharing_the_prompt_trains_as_each_answer_alone(upstream_of_ppo, tmp_path, minibatch):
    """`ppo.share_prompt` (on by default) packs each prompt's answers into one row for the actor, the
    reference and the PM: the same run as `ppo.share_prompt=false`, up to float rounding. With one
    minibatch the update reuses the packed forward; with two, scoring runs packed and the update unpacked."""
    ppo = ("stage=ppo", "ppo.iterations=2", "ppo.rollouts=8", "ppo.samples_per_prompt=4", "ppo.max_new_tokens=8")
    ppo += (f"ppo.minibatch_size={minibatch}", "ppo.ppo_epochs=1", "ppo.lr=1e-3", "ppo.advantage=grpo", "logger=none")
    histories, tokens = [], []
    for share in ("true", "false"):
        root = tmp_path / share
        shutil.copytree(upstream_of_ppo / "artifacts", root / "artifacts", symlinks=True)
        assert train_in_process(*TINY_RUN, f"paths.root={root}", f"paths.output={root}/out", *ppo, f"ppo.share_prompt={share}") is None
        [out] = [p for p in (root / "artifacts" / "ppo").iterdir() if p.is_dir() and not p.is_symlink()]
        histories.append(json.loads((out / "history.json").read_text()))
        tokens.append(json.loads((out / "manifest.json").read_text())["usage"]["forward_tokens"])
    assert tokens[0] < 0.9 * tokens[1], tokens  # each prompt run once, not 4 times
    for shared, alone in zip(*histories):
        for key in ("reward", "kl", "policy_loss", "entropy", "response_len"):
            assert shared[f"ppo/train/{key}"] == pytest.approx(alone[f"ppo/train/{key}"], abs=1e-4), key


def test_your_own_reward_model_replaces_the_pm(upstream_of_ppo, tmp_path, tiny_spec):
    """`ppo.reward_model=DIR`: any one-label AutoModelForSequenceClassification is PPO's reward (and eval's
    reference reward); this run's PM is not needed. It is keyed by its content: changed, PPO is redone."""
    from cai.reward import PreferenceModel

    root = tmp_path / "root"
    shutil.copytree(upstream_of_ppo / "artifacts", root / "artifacts", symlinks=True)
    shutil.rmtree(root / "artifacts" / "pm")  # not read: the reward is yours
    torch.manual_seed(7)
    mine = tmp_path / "my-rm"
    PreferenceModel.from_causal_lm(tiny_spec.load_model(), tiny_spec.load_tokenizer().pad_token_id).save(mine, tiny_spec.load_tokenizer())
    args = (*TINY_RUN, "logger=none", f"paths.root={root}", f"paths.output={root}/out", f"ppo.reward_model={mine}")
    args += ("ppo.iterations=2", "ppo.rollouts=4", "ppo.max_new_tokens=6", "ppo.minibatch_size=4", "ppo.snapshot_every=2")
    assert train_in_process(*args, "stage=ppo") is None
    [out] = [p for p in (root / "artifacts" / "ppo").iterdir() if p.is_dir() and not p.is_symlink()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "reward_model" in manifest["inputs"] and "pm" not in manifest["inputs"]
    assert train_in_process(*args, "stage=eval", "eval.n_red_team=2", "eval.n_helpful=2") is None  # no PM stage needed either
    # Another reward model at the same path is another run: PPO is redone, the old one moved aside.
    weights = mine / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0x01
    weights.write_bytes(bytes(blob))
    assert train_in_process(*args, "stage=ppo") is None
    assert len(list((root / "artifacts" / "ppo").glob("*.stale-*"))) == 1


def test_rl_from_your_own_policy_skips_sl_cai(upstream_of_ppo, tmp_path, tiny_spec):
    """`ppo.policy=DIR`: PPO starts from a causal LM you already have; no SFT stage is read, and eval rates it
    as the run's starting point ('policy'). Keyed by the policy's weights."""
    root = tmp_path / "root"
    shutil.copytree(upstream_of_ppo / "artifacts", root / "artifacts", symlinks=True)
    shutil.rmtree(root / "artifacts" / "sft")  # not read: RL starts from your policy
    mine = tmp_path / "my-policy"
    shutil.copytree(tiny_spec.local_dir(), mine)
    args = (*TINY_RUN, "logger=none", f"paths.root={root}", f"paths.output={root}/out", f"ppo.policy={mine}")
    args += ("ppo.iterations=2", "ppo.rollouts=4", "ppo.max_new_tokens=6", "ppo.minibatch_size=4", "ppo.snapshot_every=2")
    assert train_in_process(*args, "stage=ppo") is None
    [out] = [p for p in (root / "artifacts" / "ppo").iterdir() if p.is_dir() and not p.is_symlink()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["policy"].startswith("weights:") and "sft" not in manifest["inputs"]
    assert train_in_process(*args, "stage=eval", "eval.n_red_team=2", "eval.n_helpful=2") is None
    [elo] = [p for p in (root / "artifacts" / "eval").glob("*/elo.json") if not p.parent.is_symlink()]
    labels = {s["label"] for s in json.loads(elo.read_text())["snapshots"]}
    assert {"initial", "policy", "ppo@2"} <= labels and "sft" not in labels, labels
