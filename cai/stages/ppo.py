"""Stage `ppo`: RL-CAI. PPO on the SFT policy against the preference model.

Roles, named as in verl (the rollout, critic and reward roles are in cai/rl.py):
- actor (the policy): initialised from SFT, trained;
- ref: a frozen copy of SFT, for the KL penalty;
- critic: the value model, a value head on the actor's backbone (`ppo.value_model=head`) or a
  separate backbone with a head, initialised from the PM (`ppo.value_model=critic`); none with the
  critic-free advantages (`ppo.advantage=grpo|rloo`), whose baseline is the other answers to the prompt;
- reward: the frozen PM (any `reward_fn(conversations, completions) -> scores`, e.g. a synthetic one in tests);
- rollout: the generation backend that samples the actor's answers.

One PPO iteration is one Lightning "epoch" of one step, so Lightning's checkpoints hold the exact
iteration, the optimizer state and (through on_save_checkpoint) the KL controller:
  1. rollout: `ppo.rollouts` prompts, answered by the actor through the generation backend (batched);
  2. score: PM reward (whitened, clipped) minus beta * KL(actor || ref) per token;
  3. advantages: GAE with the critic's values (`ppo.advantage=gae`), or each answer against the
     other `ppo.samples_per_prompt - 1` answers to its prompt (`grpo`, `rloo`);
  4. `ppo.ppo_epochs` passes of minibatch updates on the clipped policy loss + clipped value loss
     (+ optional entropy bonus); when that is one step on every rollout (`one_step`), the step's
     forward, run before scoring, also gives the sampling-time log-probs and values;
  5. log `ppo/train/*`, every `ppo.table_every` iterations a table of rollouts, and every
     `ppo.snapshot_every` iterations a snapshot of the policy for the eval stage.
`training_step` reads as those calls: rollout, make_experience, update, log_iteration.
Sampling seeds depend only on (seed, iteration), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from cai.artifacts import fingerprint, write_json
from cai.config import instantiate, uses_vllm
from cai.data import Message, Prompt, load_prompts
from cai.distributed import all_gather, mean, rank, world
from cai.errors import CaiError, check_choice
from cai.generation import Completion, Generator, SamplingParams, derive_seed
from cai.lora import add_adapters, trained_state
from cai.losses import (
    AdaptiveKLController,
    RunningMoments,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from cai.metrics import boilerplate_rate, refusal_rate
from cai.models import DTYPES, disable_dropout, frozen, packing_problem, placement, resolve_dtype, same_tokenizer
from cai.reward import PreferenceModel, pm_identity, pm_reward, resolve_pm_dir
from cai.rl import Critic, CriticModel, Experience, RewardFn, Rollout, ValueHead, batch_rollouts, own_policy, response_logprobs
from cai.stages import Context, Stage
from cai.training import (
    TRAINING_LINEAGE,
    TRAINING_LOGGING_ONLY,
    adamw,
    check_finite,
    deepspeed_for_manual_loop,
    fit,
    trained_placement,
)
from cai.usage import trim_after_each_layer, trim_heap

log = logging.getLogger(__name__)
VALUE_MODELS = ("head", "critic")
ADVANTAGES = ("gae", "grpo", "rloo")
REWARD_NORMS = ("batch", "running", "none")
FROZEN_DTYPES = ("bfloat16", "float32")
# The policy is saved in files of at most this size (with an index): safetensors serialises a file's
# tensors into one buffer before writing it, so smaller files bound that buffer.
SHARD = "100MB"


class PPOModule(L.LightningModule):
    """PPO with manual optimization: one training_step is one whole iteration."""

    def __init__(
        self,
        actor: torch.nn.Module,
        tokenizer,
        reward_fn: RewardFn,
        prompts: Sequence[list[Message]],
        ppo: DictConfig,
        seed: int,
        critic: Critic | None = None,
        generation_batch_size: int = 16,
        tracker=None,
        snapshot_dir: Path | None = None,
        engine: Generator | None = None,
        ref_dtype: torch.dtype | None = None,
        frozen_dtype: torch.dtype | None = None,
        lora=None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = actor  # float32 master weights (AdamW); bf16 compute comes from the trainer's autocast
        # peft=lora: `lora` is PEFT's wrapper of the actor (adapters injected in place, the rest frozen),
        # kept outside the module tree; the ref is then the actor with its adapter off, not a copy.
        self.lora = [lora] if lora is not None else []
        # The frozen SFT for the KL penalty: never trained, so it runs in the inference dtype (bf16 on a
        # GPU), with its weights stored in frozen_dtype (`ppo.frozen_dtype`: bf16 halves them on a CPU too).
        ref_dtype = ref_dtype or next(actor.parameters()).dtype
        storage = frozen_dtype or ref_dtype
        if lora is None:
            with torch.no_grad():  # the actor starts exactly where the ref is: from SFT's weights as `storage` holds them
                for p in actor.parameters():  # (a no-op on a GPU, where SFT saved bf16 weights)
                    p.copy_(p.to(storage))
        self.ref = frozen(copy.deepcopy(actor), storage, ref_dtype) if lora is None else None
        # grpo and rloo need no critic: the other answers to the same prompt are the baseline.
        self.critic = None if ppo.advantage != "gae" else critic if critic is not None else ValueHead(actor.config.hidden_size)
        self.tok = tokenizer
        self.reward_fn = reward_fn
        # engine: vLLM, or None for HF on the actor; vLLM gets the actor's weights (merged, with LoRA) before each rollout
        self.rollout_role = Rollout(actor, tokenizer, generation_batch_size, engine, weights=self.policy_state)
        self.prompts = list(prompts)
        self.cfg = ppo
        self.seed = seed
        self.pack_group = pack_group(actor, ppo)
        self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon, ppo.adaptive_kl)
        self.score_moments = RunningMoments()  # ppo.reward_norm=running
        # Log-probs, KL and values are computed in train mode (Lightning's), sampling in eval mode: with
        # dropout on, the ratio and the KL would measure dropout noise. TRL and OpenRLHF turn it off too.
        disable_dropout(self.actor)
        trim_after_each_layer(self.actor)  # on a CPU: the forward's small temporaries do not pile up in the heap
        if self.critic is not None:
            disable_dropout(self.critic)
        self.tracker = tracker
        self.snapshot_dir = snapshot_dir
        self.history: list[dict[str, float]] = []
        self.rollout_digest = ""  # this rank's last rollouts, to show that the ranks sampled different ones

    def policy_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The policy's full weights under the plain model's names (LoRA merged in): what vLLM, snapshots and the output get.

        A collective under ZeRO-3 (every rank must call it).
        """
        strategy = self.trainer.strategy if self._trainer is not None else None
        trim_heap()  # the update's freed temporaries, before a copy of the whole policy is made
        return trained_state(self.actor, self.lora[0] if self.lora else None, strategy, dtype)

    def ref_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen SFT policy's log-probs of the response tokens (B, L-1): its copy, or the actor with its adapter off."""
        if not self.lora:
            return response_logprobs(self.ref, batch)[0]
        with self.lora[0].disable_adapter():
            return response_logprobs(self.actor, batch)[0]

    def actor_forward(
        self, batch: dict[str, torch.Tensor], with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Log-probs of the taken tokens, entropies (if asked) and the critic's values (0 without one), each (B, L-1).

        The LM head runs on response positions only (`response_logprobs`); elsewhere logp and
        entropy are 0, and every use of them is masked by action_mask.
        """
        # The entropy only enters the loss with an entropy bonus; otherwise it is logged, and kept out of the graph.
        logp, entropy, hidden = response_logprobs(self.actor, batch, with_entropy, entropy_grad=self.cfg.entropy_coef != 0)
        if self.critic is None:
            return logp, entropy, torch.zeros_like(logp)
        values = self.critic(batch, hidden if self.critic.shares_actor else None)
        return logp, entropy, values.float()

    # --- one iteration: rollout -> experience -> update -> log ------------------------------------

    def training_step(self, batch, batch_idx: int) -> None:
        iteration = self.current_epoch
        t0 = time.perf_counter()
        conversations, completions = self.rollout(iteration)
        t1 = time.perf_counter()
        batch = self.rollout_batch(completions)
        # One PPO step on the whole batch (ppo_epochs=1, one minibatch, as in the quickstart): that
        # step's forward is also the sampling-time log-probs and values (the same weights), so the
        # actor runs once per iteration, not twice. Its graph is kept until the update.
        shared = self.actor_forward(batch) if self.one_step else None
        trim_heap()  # the forward's freed temporaries (~1 GB on the main job), before the ref and the PM allocate theirs
        experience = self.make_experience(conversations, completions, batch, shared)
        t2 = time.perf_counter()
        stats = self.update(experience, iteration, shared)
        t3 = time.perf_counter()
        times = {"generation_s": t1 - t0, "scoring_s": t2 - t1, "update_s": t3 - t2}
        self.log_iteration(iteration, conversations, completions, experience, stats, times)

    def rollout(self, iteration: int) -> tuple[list[list[Message]], list[Completion]]:
        """`ppo.rollouts` answers per rank: rollouts / samples_per_prompt prompts, drawn with a seed per
        (iteration, rank), each answered samples_per_prompt times by the actor (a group, contiguous).

        Each rank rolls out its own prompts (data parallelism); rank 0's draws are those of a
        1-process run, and a resumed run repeats an uninterrupted one.
        """
        r, k = rank(), self.cfg.samples_per_prompt
        rng = random.Random(f"{self.seed}/ppo/{iteration}" + (f"/rank{r}" if r else ""))
        drawn = [self.prompts[rng.randrange(len(self.prompts))] for _ in range(self.cfg.rollouts // k)]
        conversations = [conv for conv in drawn for _ in range(k)]
        # PPO needs samples from the policy itself: temperature 1, no nucleus truncation.
        seed = derive_seed(self.seed, "ppo", iteration, r)
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0, top_p=1.0, seed=seed)
        strategy = self.trainer.strategy if self._trainer is not None else None
        completions = self.rollout_role(conversations, params, strategy, desc=f"ppo rollouts {iteration}")
        self.rollout_digest = fingerprint([[c[-1]["content"], o.text] for c, o in zip(conversations, completions)])
        return conversations, completions

    @property
    def one_step(self) -> bool:
        """True when an iteration's update is one step on all its rollouts (one PPO epoch, one minibatch)."""
        return self.cfg.ppo_epochs == 1 and self.cfg.minibatch_size >= self.cfg.rollouts

    def rollout_batch(self, completions: list[Completion]) -> dict[str, Any]:
        """The rollouts as one right-padded batch on this rank's device (`batch_rollouts`), packed by prompt where it can be."""
        responses = [c.token_ids if c.token_ids else [self.tok.eos_token_id] for c in completions]
        prompts = [c.prompt_token_ids for c in completions]
        batch = batch_rollouts(prompts, responses, self.tok.pad_token_id, self.pack_group)
        return {k: {n: t.to(self.device) for n, t in v.items()} if k == "packed" else v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def make_experience(
        self, conversations: list[list[Message]], completions: list[Completion], batch: dict[str, torch.Tensor], actor_out=None
    ) -> Experience:
        """Score the rollouts: PM reward (normalised, clipped) minus beta * KL, then the advantages.

        gae: the KL per token, the score at the last token, GAE with the critic's values, whitened.
        grpo / rloo: the KL summed over the answer comes off its score (as RLOO does; GRPO's paper
        puts it in the loss instead), then each answer is compared with the others to its prompt
        (`group_advantages`), one advantage for all its tokens.

        actor_out: the actor's (logp, entropy, values) on `batch` when the update's forward ran already.
        """
        cfg = self.cfg
        scores = torch.tensor(self.reward_fn(conversations, completions), dtype=torch.float32)  # (B,)
        truncated = torch.tensor([not c.finished for c in completions], dtype=torch.float32)  # (B,) cut at max_new_tokens
        mask = batch["action_mask"]  # (B, L-1)
        old_logp, _, old_values = actor_out if actor_out is not None else self.actor_forward(batch, with_entropy=False)
        old_logp, old_values = old_logp.detach(), old_values.detach()
        ref_logp = self.ref_logprobs(batch)
        trim_heap()  # likewise before the update's passes
        kl = kl_estimate(old_logp, ref_logp, "k1") * mask  # (B, L-1)
        shaped = self.normalise(scores - cfg.missing_eos_penalty * truncated).to(self.device)
        shaped = shaped.clamp(-cfg.reward_clip, cfg.reward_clip)
        if self.critic is None:  # critic-free
            sequence = shaped - self.kl_ctl.beta * kl.sum(1)  # (B,)
            advantages = group_advantages(sequence, cfg.samples_per_prompt, cfg.advantage)[:, None] * mask  # (B, L-1)
            return Experience(batch, old_logp, old_values, kl, advantages, torch.zeros_like(advantages), scores, truncated)
        rewards = token_rewards(shaped, kl, mask, self.kl_ctl.beta)
        advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
        return Experience(batch, old_logp, old_values, kl, whiten(advantages, mask), returns, scores, truncated)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """`ppo.reward_norm`: by this batch's mean and std, by every score so far (all ranks'), or not at all."""
        if self.cfg.reward_norm == "batch" and len(scores) > 1:
            return (scores - scores.mean()) / (scores.std() + 1e-8)
        if self.cfg.reward_norm == "running":
            mean, std = self.score_moments.update([s for r in all_gather(scores.tolist()) for s in r])
            return (scores - mean) / (std + 1e-8)
        return scores

    def update(self, experience: Experience, iteration: int, actor_out=None) -> dict[str, float]:
        """`ppo.ppo_epochs` passes of minibatch steps on the clipped policy + clipped value loss (+ entropy bonus).

        actor_out: the actor's (logp, entropy, values) on the whole batch, with their graph, for the one step of `one_step`.
        """
        cfg, opt = self.cfg, self.optimizers()
        keys = ("policy_loss", "entropy", "clipfrac", "approx_kl") + (() if self.critic is None else ("value_loss",))
        stats: dict[str, list[float]] = {k: [] for k in keys}
        rng = random.Random(f"{self.seed}/ppo/{iteration}/minibatches")
        n = len(experience.scores)
        for _ in range(cfg.ppo_epochs):
            order = list(range(n))
            rng.shuffle(order)
            for start in range(0, n, cfg.minibatch_size):
                if actor_out is not None:  # the one step, on every rollout: its forward ran before scoring
                    minibatch, (logp, entropy, values) = experience, actor_out
                else:
                    minibatch = experience.minibatch(torch.tensor(order[start : start + cfg.minibatch_size], device=self.device))
                    logp, entropy, values = self.actor_forward(minibatch.batch)
                mask = minibatch.mask
                policy_loss, info = ppo_policy_loss(logp, minibatch.old_logp, minibatch.advantages, mask, cfg.clip_range)
                no_critic = self.critic is None
                critic_loss = (
                    torch.zeros(()) if no_critic else value_loss(values, minibatch.old_values, minibatch.returns, mask, cfg.value_clip)
                )
                mean_entropy = masked_mean(entropy, mask)
                loss = policy_loss + cfg.value_coef * critic_loss - cfg.entropy_coef * mean_entropy
                check_finite("ppo", iteration, "PPO loss", float(loss.detach()))
                opt.zero_grad()
                self.manual_backward(loss)
                # A no-op under DeepSpeed, whose engine clips by the same norm (train_ppo puts it in its config).
                self.clip_gradients(opt, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                step = {"policy_loss": policy_loss, "value_loss": critic_loss, "entropy": mean_entropy, **info}
                for key in stats:
                    stats[key].append(float(step[key].detach()))
        opt.zero_grad()  # free the gradients now: the next rollout and scoring need none (set to None)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def log_iteration(self, iteration, conversations, completions, experience: Experience, stats: dict, times: dict) -> None:
        """Metrics, the KL controller's step, the rollout table and the policy snapshot of one iteration."""
        n = len(completions)
        texts = [c.text for c in completions]
        # Means over every rank's rollouts, so the KL controller (and what is logged) agree across ranks.
        mean_kl = mean(float(experience.kl.sum(1).mean()))  # nats per answer
        beta = self.kl_ctl.beta  # the coefficient these rollouts were penalised with, not the next one
        self.kl_ctl.update(mean_kl, n * world())
        new_tokens = int(experience.mask.sum())
        metrics = {
            "ppo/train/reward": mean(float(experience.scores.mean())),
            "ppo/train/kl": mean_kl,
            "ppo/train/kl_coef": beta,
            "ppo/train/truncated_rate": mean(float(experience.truncated.mean())),
            "ppo/train/response_len": new_tokens / n,
            "ppo/train/refusal_rate": refusal_rate(texts),
            "ppo/train/boilerplate_rate": boilerplate_rate(texts),
            "ppo/train/tokens_per_s": new_tokens / sum(times.values()),
            **{f"ppo/time/{k}": v for k, v in times.items()},
            **{f"ppo/train/{k}": mean(v) for k, v in stats.items()},
        }
        self.history.append({"iteration": iteration, **metrics})
        # Already means over the ranks; sync_dist only tells Lightning so (the same values average to themselves).
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=False, batch_size=n, sync_dist=True)
        # The progress bar's short name only: the logger already has it as ppo/train/reward.
        self.log(
            "reward", metrics["ppo/train/reward"], prog_bar=True, logger=False, on_step=False, on_epoch=True, batch_size=n, sync_dist=True
        )
        done = iteration + 1
        if self.tracker is not None and self.cfg.table_every and done % self.cfg.table_every == 0:
            rows = [[iteration, c[-1]["content"], t, float(s)] for c, t, s in zip(conversations, texts, experience.scores)]
            self.tracker.table("ppo/rollouts", ["iteration", "prompt", "response", "reward"], rows)
        if self.snapshot_dir is not None and self.cfg.snapshot_every and done % self.cfg.snapshot_every == 0:
            state = self.policy_state()  # a collective under ZeRO-3: every rank calls it
            if self.trainer.is_global_zero:
                save_policy(self.actor, self.tok, state, self.snapshot_dir / f"iter-{done:05d}")

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("ref.")]
        opt = adamw(params, self.cfg.lr, self.trainer, clips=True)  # clip_gradients at every step
        # A constant schedule, only so LearningRateMonitor logs the rate as ppo/train/lr.
        constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": constant, "name": "ppo/train/lr"}}

    # The KL controller is not a parameter: keep it in the checkpoint so a resumed run continues it.
    # The frozen ref is left out (it is the SFT model, rebuilt on resume): a third less to write.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["score_moments"] = self.score_moments.state_dict()
        checkpoint["ppo_history"] = self.history
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ref.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.score_moments.load_state_dict(checkpoint.get("score_moments", RunningMoments().state_dict()))
        self.history = checkpoint.get("ppo_history", [])
        if self.ref is not None:
            checkpoint["state_dict"].update({f"ref.{k}": v for k, v in self.ref.state_dict().items()})


def pack_group(actor: torch.nn.Module, ppo: DictConfig) -> int:
    """`ppo.share_prompt`: how many answers to one prompt go in a packed row (its prompt run once); 1 is unpacked.

    The samples_per_prompt answers of a prompt, where the actor can run a packed row (`packing_problem`).
    """
    problem = packing_problem(actor) if ppo.share_prompt and ppo.samples_per_prompt > 1 else None
    if problem is not None:
        log.warning("ppo.share_prompt: %s; every answer runs whole", problem)
    return ppo.samples_per_prompt if ppo.share_prompt and problem is None else 1


def train_ppo(
    module: PPOModule, iterations: int, out_dir: Path, checkpoint_every: int, cfg: DictConfig, strategy="auto", logger=False, callbacks=()
) -> L.Trainer:
    """Run (or resume from out_dir/checkpoints/last.ckpt) PPO for `iterations` iterations: one Lightning epoch of one step each."""
    one_step = torch.utils.data.DataLoader([0], batch_size=None)
    deepspeed_for_manual_loop(strategy, module.cfg.max_grad_norm)  # PPO's own clip_gradients call is a no-op there
    trainer, _ = fit(
        module,
        one_step,
        None,
        cfg,
        Path(out_dir),
        stage="ppo",
        epochs=iterations,
        checkpoint_every=checkpoint_every,
        checkpoint_unit="epochs",
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
    )
    return trainer


# --- the stage -------------------------------------------------------------------------------------


def save_policy(model: torch.nn.Module, tok, state: dict[str, torch.Tensor], where: Path) -> None:
    """A plain transformers checkpoint of the policy (files of at most SHARD), written beside `where` and
    moved into place whole: a snapshot directory that exists is complete, even after a kill mid-save."""
    partial = where.with_name(where.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state, max_shard_size=SHARD)
    tok.save_pretrained(partial)
    move_into_place(partial, where)


def move_into_place(source: Path, where: Path, copy: bool = False) -> None:
    """Replace `where` by `source` (a copy of it with copy=True), never leaving a mix of both."""
    if copy:
        partial = where.with_name(where.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        source = partial
    shutil.rmtree(where, ignore_errors=True)
    os.replace(source, where)


def placements(trainer, module: PPOModule, pm, engine) -> dict:
    """Where each PPO role ran, for the manifest."""
    actor = module.actor
    return {
        "actor": trained_placement(trainer, actor),
        # frozen, but moved and autocast by the trainer like the actor; with LoRA, the actor itself with its adapter off
        "ref": trained_placement(trainer, module.ref if module.ref is not None else actor),
        **({"critic": trained_placement(trainer, module.critic)} if module.critic is not None else {}),
        "reward": placement(pm),
        **({"rollout": engine.placement()} if engine is not None else {}),
    }


def check_ranks_agree(state: dict[str, torch.Tensor], rollout_digest: str) -> list[dict]:
    """Every rank's weights digest and last-rollout digest; an error if the ranks' weights differ.

    Data-parallel PPO is only right if the gradient all-reduce kept every rank's actor identical
    while each rank sampled its own rollouts. One line per rank goes into the manifest.
    """

    def sums(v: torch.Tensor) -> list[float]:  # in float64, a million values at a time (a whole copy is the embedding twice)
        total = absolute = 0.0
        for c in v.detach().flatten().split(1 << 20):
            c = c.double()
            total, absolute = total + float(c.sum()), absolute + float(c.abs().sum())
        return [total, absolute]

    weights = fingerprint([[k, *sums(v)] for k, v in sorted(state.items())])
    ranks = all_gather({"rank": rank(), "weights": weights, "rollouts": rollout_digest})
    if len({r["weights"] for r in ranks}) > 1:
        raise CaiError(f"ppo: the ranks' policies differ after training ({ranks}); the gradient all-reduce did not keep them in step")
    return ranks


def train_prompts(cfg: DictConfig) -> dict[str, list[Prompt]]:
    """The prompts rollouts are sampled from: the same train prompts as the SL data and the pairs."""
    return {kind: load_prompts(kind, cfg.data[kind], "train", cfg.data[f"n_{kind}"], cfg.seed) for kind in ("red_team", "helpful")}


def conversations(prompts: dict[str, list[Prompt]]) -> list[list[Message]]:
    return [[{"role": "user", "content": p.text}] for ps in prompts.values() for p in ps]


def reward_identity(cfg: DictConfig) -> dict:
    """Your own reward model, by the content of its config and weights (a changed one is never reused silently)."""
    if not cfg.ppo.reward_model:
        return {}  # this run's PM: its fingerprint and output digest are upstream inputs already
    return {"reward_model": pm_identity(resolve_pm_dir(cfg.ppo.reward_model, "ppo.reward_model"))}


def policy_identity(cfg: DictConfig) -> dict:
    """Your own starting policy, by content (a directory's weight digest, a hub model's resolved commit)."""
    spec = own_policy(cfg)
    return {"policy": spec.identity()} if spec is not None else {}


def check(cfg: DictConfig) -> None:
    check_choice("ppo.value_model", cfg.ppo.value_model, VALUE_MODELS)
    check_choice("ppo.frozen_dtype", cfg.ppo.frozen_dtype, FROZEN_DTYPES)
    check_choice("ppo.reward_norm", cfg.ppo.reward_norm, REWARD_NORMS)
    check_choice("ppo.advantage", cfg.ppo.advantage, ADVANTAGES)
    k = cfg.ppo.samples_per_prompt
    if cfg.ppo.advantage != "gae" and k < 2:
        raise CaiError(
            f"ppo.samples_per_prompt: ppo.advantage={cfg.ppo.advantage} compares answers to one prompt, so it needs >= 2, got {k}"
        )
    if cfg.ppo.rollouts % k:
        raise CaiError(
            f"ppo.rollouts: {cfg.ppo.rollouts} answers must split into groups of ppo.samples_per_prompt={k}; make it a multiple of {k}"
        )
    if cfg.ppo.reward_model:
        resolve_pm_dir(cfg.ppo.reward_model, "ppo.reward_model")  # a whole one-label classifier, before any model loads
    if cfg.ppo.value_model == "critic" and cfg.ppo.reward_model and cfg.ppo.advantage == "gae":
        raise CaiError(
            "ppo.value_model=critic: the critic starts from this run's PM, and ppo.reward_model replaces it; "
            "use ppo.value_model=head (or ppo.advantage=grpo|rloo, which need no critic)"
        )
    if cfg.ppo.policy and str(cfg.ppo.policy).startswith(("/", ".", "~")) and not Path(cfg.ppo.policy).expanduser().is_dir():
        raise CaiError(f"ppo.policy: '{cfg.ppo.policy}' is not a directory; give a checkpoint directory or a hub id of a causal LM")
    policy = own_policy(cfg) or instantiate(cfg.model)
    if cfg.ppo.value_model == "critic" and cfg.ppo.advantage == "gae" and not same_tokenizer(policy, instantiate(cfg.pm_model)):
        # The critic starts from the PM and reads the actor's token ids: another vocabulary would read other words.
        raise CaiError(
            f"ppo.value_model=critic: the PM backbone (pm_model={cfg.pm_model.name}) has another tokenizer than the policy "
            f"(model={cfg.model.name}), and the critic reads the policy's token ids; use ppo.value_model=head, or a pm_model "
            "with the policy's tokenizer"
        )


def reward_and_critic(cfg: DictConfig, ctx: Context) -> tuple[PreferenceModel, RewardFn, CriticModel | None]:
    """The reward model (this run's PM or `ppo.reward_model`), loaded once: PPO's reward role, and the
    separate critic's start (`ppo.value_model=critic`). A critic is trained, so it is copied in float32
    (with its own adapter under peft=lora); the reward is frozen and runs in the inference dtype."""
    critic_start = cfg.ppo.value_model == "critic" and cfg.ppo.advantage == "gae"
    reward_dir = resolve_pm_dir(cfg.ppo.reward_model, "ppo.reward_model") if cfg.ppo.reward_model else ctx.upstream["pm"].model_dir
    pm, pm_tok = PreferenceModel.load(reward_dir, dtype=torch.float32 if critic_start else None)
    critic = CriticModel(copy.deepcopy(pm.backbone), copy.deepcopy(pm.head)) if critic_start else None
    if critic is not None:
        add_adapters(critic.backbone, cfg.peft, "feature", seed=cfg.seed)  # none with peft=none
    group = cfg.ppo.samples_per_prompt if cfg.ppo.share_prompt else 1  # a prompt's answers scored in one packed row
    reward_fn = pm_reward(
        frozen(pm, DTYPES[cfg.ppo.frozen_dtype], resolve_dtype("auto")), pm_tok, cfg.pm.max_length, cfg.pm.batch_size, group
    )
    return pm, reward_fn, critic


def build(ctx: Context) -> dict | None:
    cfg, out = ctx.cfg, ctx.out
    spec = own_policy(cfg) or ctx.upstream["sft"].model_spec(f"sft({cfg.model.name})", cfg.model.dtype, cfg.paths.cache)
    actor, tok = spec.load_model(train=True), spec.load_tokenizer()
    actor.train()
    lora = add_adapters(actor, cfg.peft, "causal", seed=cfg.seed)  # None with peft=none
    pm, reward_fn, critic = reward_and_critic(cfg, ctx)
    frozen_dtype = DTYPES[cfg.ppo.frozen_dtype]
    L.seed_everything(cfg.seed, verbose=False)
    prompts = train_prompts(cfg)
    ctx.extra["prompt_ids"] = {kind: [p.id for p in ps] for kind, ps in prompts.items()}
    args = (actor, tok, reward_fn, conversations(prompts), cfg.ppo, cfg.seed, critic, cfg.generation.batch_size, ctx.tracker)
    # generation=vllm: one engine for the run (on a GPU it shares the device with the trainer, within
    # generation.gpu_memory_utilization); the actor's weights are pushed into it before every rollout.
    engine = instantiate(cfg.generation, model=spec, weight_sync=True) if uses_vllm(cfg) else None
    module = PPOModule(
        *args, snapshot_dir=out.path / "snapshots", engine=engine, ref_dtype=spec.torch_dtype, frozen_dtype=frozen_dtype, lora=lora
    )
    t0 = time.perf_counter()
    strategy, logger = instantiate(cfg.strategy), ctx.tracker.lightning_logger()
    try:
        trainer = train_ppo(module, cfg.ppo.iterations, out.path, cfg.ppo.checkpoint_every, cfg, strategy, logger)
    finally:
        if engine is not None:
            engine.close()
    seconds = time.perf_counter() - t0
    state = module.policy_state(spec.torch_dtype)  # a collective under ZeRO-3: every rank calls it
    ranks = check_ranks_agree(state, module.rollout_digest)
    if not trainer.is_global_zero:
        return None
    ctx.extra["ranks"] = ranks
    ctx.extra["models"] = placements(trainer, module, pm, engine)
    last = out.path / "snapshots" / f"iter-{cfg.ppo.iterations:05d}"
    if last.is_dir() and next(actor.parameters()).dtype == spec.torch_dtype:  # snapshots keep the training dtype
        del state  # copied, not saved again: a save holds the policy twice in memory (the LoRA stage's peak on a CPU)
        move_into_place(last, out.path / "model", copy=True)
    else:
        save_policy(actor, tok, state, out.path / "model")
    if lora is not None:
        lora.save_pretrained(out.path / "adapter")  # the policy's adapter alone, as peft loads it (on the SFT model)
    history = module.history
    write_json(out.path / "history.json", history)
    return {
        "iterations": len(history),
        "first_reward": history[0]["ppo/train/reward"] if history else None,
        "final_reward": history[-1]["ppo/train/reward"] if history else None,
        "final_kl": history[-1]["ppo/train/kl"] if history else None,
        "seconds": round(seconds, 1),
    }


STAGE = Stage(
    name="ppo",
    writes="`model/`: the final policy (plain transformers; LoRA merged in), `adapter/` under `peft=lora`, `snapshots/iter-N/`: the policies eval rates",
    description="PPO against the preference model",
    build=build,
    after="pm",
    lineage=("ppo", *TRAINING_LINEAGE),
    logging_only=("ppo.checkpoint_every", "ppo.table_every", *TRAINING_LOGGING_ONLY),
    reads=lambda cfg: (() if cfg.ppo.policy else ("sft",)) + (() if cfg.ppo.reward_model else ("pm",)),
    inputs=lambda cfg: {"prompts": fingerprint(conversations(train_prompts(cfg))), **reward_identity(cfg), **policy_identity(cfg)},
    check=check,
    metric=lambda c: f"reward {c['first_reward']:.3f} -> {c['final_reward']:.3f}, KL {c['final_kl']:.2f}",
    output="model",
    artifact=("ppo_policy", "model", "model"),
)
