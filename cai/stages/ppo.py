"""Stage `ppo`: RL-CAI. PPO on the SFT policy against the preference model.

Four roles, named as in verl:
- actor (the policy): initialised from SFT, trained;
- ref: a frozen copy of SFT, for the KL penalty;
- critic: the value model, a value head on the actor's backbone (`ppo.value_model=head`) or a
  separate backbone with a head, initialised from the PM (`ppo.value_model=critic`);
- reward: the frozen PM (any `reward_fn(conversations, completions) -> scores`, e.g. a synthetic one in tests).

One PPO iteration is one Lightning "epoch" of one step, so Lightning's checkpoints hold the exact
iteration, the optimizer state and (through on_save_checkpoint) the KL controller:
  1. rollout: `ppo.rollouts` prompts, answered by the actor through the generation backend (batched);
  2. score: PM reward (whitened, clipped) minus beta * KL(actor || ref) per token;
  3. GAE advantages and returns;
  4. `ppo.ppo_epochs` passes of minibatch updates on the clipped policy loss + clipped value loss
     (+ optional entropy bonus);
  5. log `ppo/train/*`, and every `ppo.table_every` iterations a table of rollouts.
Sampling seeds depend only on (seed, iteration), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cai.artifacts import StageDir, fingerprint, require_complete, stage_path, write_json
from cai.data import load_prompts
from cai.errors import CaiError
from cai.generation import Completion, Generator, SamplingParams
from cai.generation.hf import HFGenerator
from cai.losses import (
    AdaptiveKLController,
    gae,
    kl_estimate,
    logprobs_and_entropy,
    masked_mean,
    ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from cai.metrics import boilerplate_rate, refusal_rate
from cai.pipeline import instantiate
from cai.tracking import Tracker
from cai.training import drop_checkpoints, gathered_state_dict, resolve_precision

log = logging.getLogger(__name__)
STAGE = "ppo"
Message = dict[str, str]
RewardFn = Callable[[Sequence[list[Message]], Sequence[Completion]], list[float]]  # (conversations, answers) -> scores


class Critic(nn.Module):
    """A separate value model: a backbone with a scalar head at every position."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (B, L)


def batch_rollouts(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids, and masks aligned with the *predicted* tokens.

    input_ids, attention_mask: (B, L). action_mask: (B, L-1), 1 where token j+1 is a response token,
    so that position j of log-prob/value tensors (computed from logits at j) scores that token.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    L_ = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L_), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L_), dtype=torch.long)
    action = torch.zeros((len(seqs), L_ - 1))
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        action[i, len(p) - 1 : len(s) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "action_mask": action}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token j+1 | prefix) for every position j. logits (B, L, V), ids (B, L) -> (B, L-1)."""
    return logprobs_and_entropy(logits[:, :-1], input_ids[:, 1:], with_entropy=False)[0]


class PPOModule(L.LightningModule):
    """PPO with manual optimization: one training_step is one whole iteration."""

    def __init__(
        self,
        actor: nn.Module,
        tokenizer,
        reward_fn: RewardFn,
        prompts: Sequence[list[Message]],
        ppo: DictConfig,
        seed: int,
        critic: Critic | None = None,
        generation_batch_size: int = 16,
        tracker: Tracker | None = None,
        snapshot_dir: Path | None = None,
        snapshot_every: int = 0,
        engine: Generator | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = actor
        self.ref = copy.deepcopy(actor).eval().requires_grad_(False)  # frozen SFT for the KL penalty
        self.value_head = nn.Linear(actor.config.hidden_size, 1) if critic is None else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.critic = critic
        self.tok = tokenizer
        self.reward_fn = reward_fn
        self.prompts = list(prompts)
        self.cfg = ppo
        self.seed = seed
        self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon, ppo.adaptive_kl)
        self.generation_batch_size = generation_batch_size
        self.tracker = tracker
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = snapshot_every
        self.history: list[dict[str, float]] = []
        self.engine = engine  # a vLLM generator; None = generate with HF from the actor itself

    # --- the roles' forward passes ------------------------------------------------------------

    def actor_forward(
        self, batch: dict[str, torch.Tensor], with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Log-probs of the taken tokens, entropies (if asked) and values, each (B, L-1)."""
        out = self.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=self.critic is None)
        logp, entropy = logprobs_and_entropy(out.logits[:, :-1], batch["input_ids"][:, 1:], with_entropy)
        if self.critic is None:
            values = self.value_head(out.hidden_states[-1][:, :-1].to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            values = self.critic(batch["input_ids"], batch["attention_mask"])[:, :-1]
        return logp, entropy, values.float()

    # --- one iteration ---------------------------------------------------------------------------

    def rollout(self, iteration: int) -> tuple[list[list[Message]], list, list[str]]:
        rng = random.Random(f"{self.seed}/ppo/{iteration}")
        convs = [self.prompts[rng.randrange(len(self.prompts))] for _ in range(self.cfg.rollouts)]
        # PPO needs samples from the policy itself: temperature 1, no nucleus truncation.
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0, top_p=1.0, seed=self.seed * 100_003 + iteration)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if self.engine is not None:  # vLLM: push this iteration's weights into the engine (no disk)
            self.engine.load_weights(gathered_state_dict(self.actor, strategy).items())
            completions = self.engine.generate(convs, params, desc=f"ppo rollouts {iteration}")
            return convs, completions, [c.text for c in completions]
        gen = HFGenerator(self.actor, self.tok, batch_size=self.generation_batch_size)
        if getattr(strategy, "zero_stage_3", False):  # never generate from sharded weights
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.actor.parameters())):
                completions = gen.generate(convs, params, desc=f"ppo rollouts {iteration}")
        else:
            completions = gen.generate(convs, params, desc=f"ppo rollouts {iteration}")
        return convs, completions, [c.text for c in completions]

    def training_step(self, batch, batch_idx: int) -> None:
        iteration = self.current_epoch
        cfg = self.cfg
        opt = self.optimizers()
        t0 = time.perf_counter()
        convs, completions, texts = self.rollout(iteration)
        responses = [c.token_ids if c.token_ids else [self.tok.eos_token_id] for c in completions]
        t1 = time.perf_counter()

        scores = torch.tensor(self.reward_fn(convs, completions), dtype=torch.float32)  # (B,)
        rb = {
            k: v.to(self.device)
            for k, v in batch_rollouts([c.prompt_token_ids for c in completions], responses, self.tok.pad_token_id).items()
        }
        mask = rb["action_mask"]
        with torch.no_grad():
            old_logp, _, old_values = self.actor_forward(rb, with_entropy=False)
            ref_logp = token_logprobs(self.ref(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits, rb["input_ids"])
            kl = kl_estimate(old_logp, ref_logp, "k1") * mask  # (B, L-1)
            shaped = scores.to(self.device)
            if cfg.whiten_rewards and len(shaped) > 1:
                shaped = (shaped - shaped.mean()) / (shaped.std() + 1e-8)
            shaped = shaped.clamp(-cfg.reward_clip, cfg.reward_clip)
            rewards = token_rewards(shaped, kl, mask, self.kl_ctl.beta)
            advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)
        t2 = time.perf_counter()

        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")}
        rng = random.Random(f"{self.seed}/ppo/{iteration}/minibatches")
        n = len(responses)
        for _ in range(cfg.ppo_epochs):
            order = list(range(n))
            rng.shuffle(order)
            for start in range(0, n, cfg.minibatch_size):
                idx = torch.tensor(order[start : start + cfg.minibatch_size], device=self.device)
                mb = {k: v[idx] for k, v in rb.items()}
                m = mb["action_mask"]
                logp, entropy, values = self.actor_forward(mb)
                pg, info = ppo_policy_loss(logp, old_logp[idx], advantages[idx], m, cfg.clip_range)
                vl = value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                ent = masked_mean(entropy, m)
                loss = pg + cfg.value_coef * vl - cfg.entropy_coef * ent
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
                opt.step()
                for key, value in (
                    ("policy_loss", pg),
                    ("value_loss", vl),
                    ("entropy", ent),
                    ("clipfrac", info["clipfrac"]),
                    ("approx_kl", info["approx_kl"]),
                ):
                    stats[key].append(float(value.detach()))
        t3 = time.perf_counter()

        mean_kl = float(kl.sum(1).mean())  # nats per answer
        self.kl_ctl.update(mean_kl, n)
        new_tokens = int(mask.sum())
        metrics = {
            "ppo/train/reward": float(scores.mean()),
            "ppo/train/kl": mean_kl,
            "ppo/train/kl_coef": self.kl_ctl.beta,
            "ppo/train/response_len": new_tokens / n,
            "ppo/train/refusal_rate": refusal_rate(texts),
            "ppo/train/boilerplate_rate": boilerplate_rate(texts),
            "ppo/train/tokens_per_s": new_tokens / (t3 - t0),
            "ppo/time/generation_s": t1 - t0,
            "ppo/time/scoring_s": t2 - t1,
            "ppo/time/update_s": t3 - t2,
            **{f"ppo/train/{k}": sum(v) / len(v) for k, v in stats.items()},
        }
        self.history.append({"iteration": iteration, **metrics})
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=False, batch_size=n)
        self.log("reward", metrics["ppo/train/reward"], prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        if self.tracker is not None and cfg.table_every and (iteration + 1) % cfg.table_every == 0:
            rows = [[iteration, c[-1]["content"], t, float(s)] for c, t, s in zip(convs, texts, scores)]
            self.tracker.table(f"ppo/rollouts/iter_{iteration + 1}", ["iteration", "prompt", "response", "reward"], rows)
        if (
            self.snapshot_dir is not None
            and self.snapshot_every
            and (iteration + 1) % self.snapshot_every == 0
            and self.trainer.is_global_zero
        ):
            self.actor.save_pretrained(
                self.snapshot_dir / f"iter-{iteration + 1:05d}", state_dict=gathered_state_dict(self.actor, self.trainer.strategy)
            )
            self.tok.save_pretrained(self.snapshot_dir / f"iter-{iteration + 1:05d}")

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("ref.")]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)

    # The KL controller is not a parameter: keep it in the checkpoint so a resumed run continues it.
    # The frozen ref is left out (it is the SFT model, rebuilt on resume): a third less to write.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["ppo_history"] = self.history
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ref.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.history = checkpoint.get("ppo_history", [])
        checkpoint["state_dict"].update({f"ref.{k}": v for k, v in self.ref.state_dict().items()})


def train_ppo(
    module: PPOModule, iterations: int, out_dir: Path, checkpoint_every: int, cfg: DictConfig, strategy="auto", logger=False, callbacks=()
) -> L.Trainer:
    """Run (or resume from out_dir/checkpoints/last.ckpt) PPO for `iterations` iterations: one Lightning epoch of one step each."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    saver = (
        [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=checkpoint_every, save_last=True, save_top_k=1)]
        if checkpoint_every
        else []
    )
    callbacks = saver + list(callbacks)  # extra callbacks run after the checkpoint is saved
    trainer = L.Trainer(
        max_epochs=iterations,
        precision=resolve_precision(cfg.trainer.precision),
        strategy=strategy,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=bool(checkpoint_every),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(out_dir),
    )
    resume = ckpt_dir / "last.ckpt"
    trainer.fit(module, torch.utils.data.DataLoader([0], batch_size=None), ckpt_path=str(resume) if resume.exists() else None)
    return trainer


def pm_reward(cfg: DictConfig) -> tuple[RewardFn, str]:
    """The frozen PM as reward: scores (conversation, answer) transcripts."""
    from cai.reward import PreferenceModel, score

    path = stage_path(cfg, "pm") / "model"
    pm, tok = PreferenceModel.load(path)
    pm.requires_grad_(False)

    def reward_fn(convs: Sequence[list[Message]], completions: Sequence[Completion]) -> list[float]:
        return score(pm, tok, [(c, a.text) for c, a in zip(convs, completions)], cfg.pm.max_length, cfg.pm.batch_size, desc="ppo scoring")

    return reward_fn, str(path)


def run(cfg: DictConfig, tracker: Tracker) -> dict:
    if cfg.ppo.value_model not in ("head", "critic"):
        raise CaiError(f"ppo.value_model: choose head or critic, got '{cfg.ppo.value_model}'")
    sft = require_complete(cfg, "sft", STAGE)
    pm = require_complete(cfg, "pm", STAGE)
    from cai.stages.sft import trained_spec

    red = load_prompts("red_team", cfg.data.red_team, "train", cfg.data.n_red_team)
    helpful = load_prompts("helpful", cfg.data.helpful, "train", cfg.data.n_helpful)
    prompts = [[{"role": "user", "content": p.text}] for p in red + helpful]
    config = {"ppo": OmegaConf.to_container(cfg.ppo), "seed": cfg.seed, "snapshot_every": cfg.eval.snapshot_every}
    out = StageDir(cfg, STAGE, config, {"sft": sft["fingerprint"], "pm": pm["fingerprint"], "prompts": fingerprint(prompts)})
    if out.is_complete():
        log.info("ppo: up to date at %s, skipping", out.path)
        return {"metric": f"final reward {out.manifest()['counts']['final_reward']:.3f} (cached)", "path": str(out.path / "model")}
    out.open()

    spec = trained_spec(cfg)
    actor, tok = spec.load_model(), spec.load_tokenizer()
    actor.train()
    reward_fn, _ = pm_reward(cfg)
    critic = None
    if cfg.ppo.value_model == "critic":
        from cai.reward import PreferenceModel

        pm_model, _ = PreferenceModel.load(stage_path(cfg, "pm") / "model")
        critic = Critic(pm_model.backbone, pm_model.head)
    L.seed_everything(cfg.seed, verbose=False)
    module = PPOModule(
        actor,
        tok,
        reward_fn,
        prompts,
        cfg.ppo,
        cfg.seed,
        critic,
        cfg.generation.batch_size,
        tracker,
        out.path / "snapshots",
        cfg.eval.snapshot_every,
    )
    t0 = time.perf_counter()
    trainer = train_ppo(
        module, cfg.ppo.iterations, out.path, cfg.ppo.checkpoint_every, cfg, instantiate(cfg.strategy), tracker.lightning_logger()
    )
    seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {"metric": "", "path": str(out.path / "model")}
    model_dir = out.path / "model"
    actor.save_pretrained(model_dir, state_dict=gathered_state_dict(actor, trainer.strategy))
    tok.save_pretrained(model_dir)
    history = module.history
    counts = {
        "iterations": len(history),
        "first_reward": history[0]["ppo/train/reward"] if history else None,
        "final_reward": history[-1]["ppo/train/reward"] if history else None,
        "final_kl": history[-1]["ppo/train/kl"] if history else None,
        "seconds": round(seconds, 1),
    }
    write_json(out.path / "history.json", history)
    out.complete(counts)
    drop_checkpoints(out.path)
    tracker.artifact(model_dir, name="ppo_policy", type="model")
    return {
        "metric": f"reward {counts['first_reward']:.3f} -> {counts['final_reward']:.3f}, KL {counts['final_kl']:.2f}",
        "path": str(model_dir),
    }
