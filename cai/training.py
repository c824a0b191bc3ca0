"""What the training stages share: strategy and precision from the config, the Trainer, batching.

- `fit` builds the one Lightning Trainer that SFT, the PM and PPO train with, and resumes it;
- `pad` turns token-id lists into a padded (B, T) batch and its attention mask;
- `LengthBucketSampler` batches sequences of similar length, sharded across ranks;
- `adamw_with_cosine`, `resolve_precision`, `build_strategy`, `gathered_state_dict`, `trained_placement`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import shutil
import time
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Sampler

from cai.config import TRAINER_LOGGING_ONLY, TRAINER_NOT_FOR_PPO, instantiate
from cai.errors import CaiError, signals_deferred
from cai.models import placement
from cai.usage import trim_heap

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "deepspeed")
# What a training stage's output also depends on: the Trainer arguments that are set, the callbacks
# (early stopping changes what trains) and LoRA or not. Those that only log are left out.
TRAINING_LINEAGE = ("trainer", "callbacks", "peft")
TRAINING_LOGGING_ONLY = (*(f"trainer.{k}" for k in TRAINER_LOGGING_ONLY), "callbacks.lr_monitor")


def build_strategy(name: str, zero_stage: int = 0, offload_optimizer: bool = False, offload_parameters: bool = False) -> Any:
    """What `strategy=` names, as Lightning's Trainer takes it ('auto', 'ddp' or a DeepSpeedStrategy)."""
    if name not in STRATEGIES:
        raise CaiError(f"strategy.name: unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    if name != "deepspeed":
        return name
    if zero_stage not in (1, 2, 3):
        raise CaiError(f"strategy.zero_stage: DeepSpeed ZeRO stage must be 1, 2 or 3, got {zero_stage}")
    if offload_parameters and zero_stage != 3:
        raise CaiError("strategy.offload_parameters: parameter offload needs ZeRO stage 3 (strategy=deepspeed_zero3_offload)")
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=zero_stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters)
    except (ImportError, ModuleNotFoundError) as err:
        raise CaiError(f"strategy=deepspeed_zero{zero_stage}: DeepSpeed is not importable ({err}); `pip install deepspeed`") from None


def resolve_precision(precision: str) -> str:
    """'auto' is bf16-mixed on GPUs that support it, else full float32.

    On a CPU, bf16 autocast pays only with native bf16 (1.3-1.5x faster training on AVX512-BF16,
    benchmarks/bench_peers.py) and is slower without it; float32 gives every CPU the same numbers.
    """
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def adamw(params, lr: float, trainer: L.Trainer | None = None, clips: bool = False) -> torch.optim.AdamW:
    """AdamW without weight decay, fused where PyTorch has the kernel (CPU and CUDA), unless AMP must clip.

    The fused step updates each parameter in one kernel; the default (foreach) one makes whole-model
    temporaries (a square root of every second moment), about a model's size at the step's peak.
    Measured on the PM's step, 2 CPU cores: 7% faster and 0.16 GB lower peak at float32; at
    bf16-mixed, the PM stage 38.4 / 40.7 s fused vs 42.7 / 44.4 s foreach (alternating runs).
    Under `*-mixed` precision Lightning refuses to clip a fused optimizer's gradients (it cannot
    unscale them first): where gradients are clipped (`clips`, as PPO's loop does, or
    `trainer.gradient_clip_val`) the step is foreach there.
    """
    params = list(params)
    amp = trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
    clips = clips or bool(amp and (trainer.gradient_clip_val or 0) > 0)  # Lightning's own clipping
    fused = not (amp and clips) and all(p.device.type in ("cpu", "cuda") for p in params if isinstance(p, torch.Tensor))
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)


def adamw_with_cosine(params, lr: float, warmup_ratio: float, trainer: L.Trainer, stage: str) -> dict:
    """AdamW with linear warmup then cosine decay to 0 over the trainer's steps (transformers' schedule, as TRL's
    trainers use it), stepped every step (Lightning's format).

    The scheduler's name is the metric LearningRateMonitor logs: `<stage>/train/lr`.
    """
    from transformers import get_cosine_schedule_with_warmup

    opt = adamw(params, lr, trainer)
    total = max(1, int(trainer.estimated_stepping_batches))
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=int(warmup_ratio * total), num_training_steps=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": f"{stage}/train/lr"}}


def checkpoint_activations(model: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing (`gradient_checkpointing`): keep each block's input, recompute the rest in backward.

    The activations of a 30-layer model over a batch are gigabytes on a CPU, more than its weights;
    recomputing them costs about one more forward pass per step and changes no number.
    """
    if not on or not getattr(model, "supports_gradient_checkpointing", False):
        return
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad, which frozen embeddings lack
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20's name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_finite(stage: str, step: int, what: str, value: float) -> None:
    """Stop at the first NaN or inf, with one line naming the stage, step and value, before anything is saved."""
    if not math.isfinite(value):
        raise CaiError(
            f"{stage}: the {what} became {value} at step {step}; training diverged and nothing was saved or marked complete. "
            f"Lower {stage}.lr (or raise {stage}.warmup_ratio where there is one) and run again"
        )


def parameter_norm(module: torch.nn.Module) -> float:
    """The L2 norm of all parameters (NaN or inf if any parameter is)."""
    with torch.no_grad():
        return float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in module.parameters() if p.numel()) or torch.tensor(0.0)))


class FileCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint straight to a temporary file, then renames it: atomic, like Lightning's own.

    Lightning's default first serialises the whole checkpoint into memory (weights and optimizer
    state, three times the model) and then copies that buffer out: on a CPU run it was the job's
    memory peak (+1.5 GB at a PPO checkpoint of the 135M model).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("FileCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_deferred():  # SIGTERM mid-write stops the run once this checkpoint is whole
            self._write(checkpoint, path)

    @staticmethod
    def _write(checkpoint: dict, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a power cut leaves the old checkpoint, not a torn one
        except (OSError, RuntimeError) as err:
            tmp.unlink(missing_ok=True)
            # torch's zip writer reports a failed write as "RuntimeError: ... unexpected pos": say what it was.
            if isinstance(err, RuntimeError) and shutil.disk_usage(path.parent).free < 2 * tmp_size_hint(checkpoint):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from err
            if isinstance(err, OSError) and not err.filename:
                raise OSError(err.errno, err.strerror, str(path)) from err
            raise
        os.replace(tmp, path)


def tmp_size_hint(checkpoint: dict) -> int:
    """About how many bytes a checkpoint takes on disk: its tensors' bytes (weights and optimizer state)."""
    total = 0
    stack: list[Any] = [checkpoint]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def usable_checkpoint(ckpt_dir: Path, stage: str) -> Path | None:
    """The checkpoint to resume from: `last.ckpt` if it reads whole, else the newest other one that does.

    A kill while a checkpoint was being copied or a damaged disk can leave a `last.ckpt` that is not a
    whole zip archive; resuming from it would fail on every rerun. A damaged one is renamed
    `*.damaged` (kept until the stage completes), with a warning, and the next one is tried; with none
    left, the stage restarts from its first step.
    """
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda f: (f.name != "last.ckpt", -f.stat().st_mtime))
    for ckpt in candidates:
        try:
            with zipfile.ZipFile(ckpt) as z:  # torch.save's format; testzip checks every member's CRC
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as err:
            bad = str(err)
        if bad is None:
            return ckpt
        aside = ckpt.with_name(ckpt.name + ".damaged")
        os.replace(ckpt, aside)
        log.warning("%s: checkpoint %s is damaged (%s); moved it to %s and trying the previous one", stage, ckpt, bad, aside.name)
    if candidates:
        log.warning("%s: no readable checkpoint left in %s; the stage restarts from its first step", stage, ckpt_dir)
    return None


class HeapTrim(L.Callback):
    """Returns freed heap memory to the system (cai.usage.trim_heap) before every backward, so RSS stays flat.

    A forward leaves up to ~1 GB of freed temporaries in glibc's heap (a PPO step on the embedded
    model), which backward would stack its gradients on; trimmed, the step's peak fell by ~0.4 GB.
    Once a step is enough: a second trim after each batch cost 4% of the PM's time (76.0 s against
    72.8 s) for 0.11 GiB less peak (3.18 against 3.29 GiB; TRL's RewardTrainer: 3.39 GiB).
    """

    def on_before_backward(self, trainer, module, loss) -> None:
        trim_heap()


class FiniteGuard(L.Callback):
    """Stops training at the first non-finite loss, gradient norm or parameter, and warns when it trends badly.

    The error is raised before the checkpoint callback saves (Lightning runs checkpoints last), so a
    diverged model is never written, marked complete or pointed at by `latest`. Warnings (the loss
    ended above where it started, the weights grew more than 10x) go to the log and to the logger
    as `<stage>/train/warning_*`.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.losses: list[float] = []
        self.start_norm = 0.0

    def on_train_start(self, trainer, module) -> None:
        self.start_norm = parameter_norm(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))
            check_finite(self.stage, trainer.global_step, "training loss", self.losses[-1])

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad.detach().float().norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            check_finite(self.stage, trainer.global_step, "gradient norm", float(torch.stack(grads).norm()))

    def on_train_end(self, trainer, module) -> None:
        norm = parameter_norm(module)
        check_finite(self.stage, trainer.global_step, "parameter norm", norm)
        flags = {}
        quarter = len(self.losses) // 4
        if quarter >= 1 and sum(self.losses[-quarter:]) > sum(self.losses[:quarter]):
            flags["loss_rose"] = 1.0
            log.warning(
                "%s: the training loss rose from %.3g to %.3g; %s.lr may be too high",
                self.stage,
                self.losses[0],
                self.losses[-1],
                self.stage,
            )
        if self.start_norm > 0 and norm > 10 * self.start_norm:
            flags["weights_exploded"] = 1.0
            log.warning(
                "%s: the weight norm grew from %.3g to %.3g; %s.lr is probably too high", self.stage, self.start_norm, norm, self.stage
            )
        if flags and trainer.logger:
            trainer.logger.log_metrics({f"{self.stage}/train/warning_{k}": v for k, v in flags.items()}, step=trainer.global_step)


class SamplerResume(L.Callback):
    """Saves where the length-bucket sampler stands in the checkpoint, so a resumed run continues mid-epoch exactly.

    Lightning restores the epoch and the count of batches already trained but restarts a plain
    DataLoader from its first batch; the sampler is told to skip the batches already trained.
    """

    def __init__(self, sampler: LengthBucketSampler) -> None:
        self.sampler = sampler
        self.done = 0  # batches trained in the current epoch

    def on_train_epoch_start(self, trainer, module) -> None:
        # Lightning calls set_epoch on samplers, not on batch samplers: do it here, before the epoch's iterator.
        self.sampler.set_epoch(trainer.current_epoch)
        self.done = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.done += 1  # runs before the checkpoint callback saves (Lightning runs checkpoints last)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = state["epoch"], state["done"]
        if done >= len(self.sampler):  # saved at an epoch's end: Lightning goes on with the next epoch's iterator
            epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.done = done
        self.sampler.skip = (epoch, done)


class ResumeCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's checkpoint, without the one it writes when training ends if none was written yet.

    cai's checkpoints exist to resume an interrupted fit, and the stage deletes them once it has
    written its output: a checkpoint of a finished fit (weights and both Adam moments, 1.6 GB for
    135M parameters) is written, fsynced and deleted for nothing, 4-5% of a short PM stage.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


def fit(
    module: L.LightningModule,
    train_loader,
    val_loader,
    cfg: DictConfig,
    out_dir: Path,
    *,
    stage: str,
    epochs: int,
    grad_accum: int = 1,
    checkpoint_every: int,
    checkpoint_unit: str = "steps",
    strategy: Any,
    logger: Any,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[L.Trainer, float]:
    """Train with Lightning, checkpointing every N optimizer steps (or epochs) and resuming from the last one.

    `checkpoint_unit="epochs"` suits PPO, where one epoch is one iteration of several optimizer
    steps. `checkpoint_every=0` writes no checkpoint. Extra callbacks run after the checkpoint is
    saved. The checkpoints (weights + optimizer) live in out_dir/checkpoints only until the stage
    has written its real output: call `drop_checkpoints(out_dir)` then.
    """
    ckpt_dir = Path(out_dir) / "checkpoints"
    every = {"every_n_train_steps" if checkpoint_unit == "steps" else "every_n_epochs": checkpoint_every}
    sampler = getattr(train_loader, "batch_sampler", None)
    resume_sampler = [SamplerResume(sampler)] if isinstance(sampler, LengthBucketSampler) else []
    saver = [ResumeCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1, **every)] if checkpoint_every else []
    own = [FiniteGuard(stage), HeapTrim(), *resume_sampler, *saver, *callbacks, *configured_callbacks(cfg, has_logger=bool(logger))]
    ours = dict(
        max_epochs=epochs,
        accumulate_grad_batches=grad_accum,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in own),  # ours, or a user's
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val_loader is not None else 0,
        default_root_dir=str(out_dir),
        enable_model_summary=False,
        use_distributed_sampler=False,  # our batch samplers shard across ranks themselves
    )
    for model in module.modules():  # every model held, PPO's frozen ref too (inert there: it runs in eval mode)
        checkpoint_activations(model, bool(cfg.get("gradient_checkpointing", False)))
    args = trainer_args(cfg, ours, manual=not module.automatic_optimization)
    if isinstance(strategy, str) and not args.get("plugins"):  # 'auto' or 'ddp'; a DeepSpeedStrategy writes its own checkpoints
        args["plugins"] = [FileCheckpointIO()]
    trainer = L.Trainer(strategy=strategy, logger=logger, callbacks=own, **args)
    resume = usable_checkpoint(ckpt_dir, stage) if isinstance(strategy, str) else (ckpt_dir / "last.ckpt")
    # SamplerResume makes our mid-epoch resume exact; Lightning cannot see that and would warn otherwise.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume and resume.exists() else None)
    if trainer.global_step == 0:  # completion means work was done
        raise CaiError(f"{stage}: training took no optimizer step (no training batches); give it more data or a smaller {stage}.batch_size")
    return trainer, time.perf_counter() - t0


def deepspeed_for_manual_loop(strategy: Any, max_grad_norm: float | None) -> None:
    """Fit DeepSpeed's config to PPO's manual loop, before the Trainer reads it.

    Manual optimization clips with `clip_gradients`, which DeepSpeed ignores: it clips inside its
    engine, by its config's `gradient_clipping` (Lightning fills that key only when it is absent).
    PPO's one-step loader has no batch sampler, from which Lightning would read the micro-batch size
    (seen on an H200: AttributeError in `_auto_select_batch_size`); one loader item is one step.
    """
    if not isinstance(getattr(strategy, "config", None), dict):
        return
    if max_grad_norm:
        strategy.config["gradient_clipping"] = max_grad_norm
    strategy.config.setdefault("train_micro_batch_size_per_gpu", 1)


def trainer_args(cfg: DictConfig, ours: dict[str, Any], manual: bool = False) -> dict[str, Any]:
    """A Trainer's arguments: cai's for this stage, then every `trainer.*` the user set, which win.

    `manual` (PPO's hand-stepped loop) keeps its own epochs, accumulation and clipping: Lightning
    refuses those with manual optimisation, so a user's value is dropped there with a warning.
    """
    user = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    user["precision"] = resolve_precision(user.get("precision", "auto"))
    if manual:
        for key in [k for k in TRAINER_NOT_FOR_PPO if k in user]:
            log.warning("trainer.%s does not apply to PPO (it steps by hand; see ppo.* instead): PPO ignores it", key)
            user.pop(key)
    return {**ours, **user}


def check_trainer(cfg: DictConfig) -> None:
    """Every `trainer.*` the user set, by Lightning's own rules, before any model loads.

    Each argument is given to a bare Trainer on its own (then all of them together), so the one
    Lightning refuses is named: `trainer.max_steps=-5`, `trainer.precision=bogus`.
    """
    user = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    user["precision"] = resolve_precision(user.get("precision", "auto"))
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    chatter = logging.getLogger("lightning.pytorch")  # the bare Trainers' info lines (GPU available: ..., tips)
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        for key, value in [*user.items(), (None, None)]:
            _try_trainer(key, value, {key: value} if key else user, quiet)
    finally:
        chatter.setLevel(level)


def _try_trainer(key: str | None, value: Any, args: dict, quiet: dict) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(**{**quiet, **args})
    except Exception as err:  # MisconfigurationException, ValueError, TypeError: Lightning's refusal
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        field, what = (f"trainer.{key}", repr(value)) if key else ("trainer", "these Trainer arguments together")
        raise CaiError(f"{field}: Lightning refuses {what}: {first} (fix {field} in conf/ or on the command line)") from None


def configured_callbacks(cfg: DictConfig, has_logger: bool) -> list[L.Callback]:
    """The `callbacks` group's entries, built from their `_target_` (a null entry is switched off).

    LearningRateMonitor needs a logger; with `logger=none` it is left out, not an error.
    """
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        try:
            callback = instantiate(node)
        except Exception as err:  # an import or argument error in the user's entry: name the entry
            raise CaiError(f"callbacks.{name}: could not build {node.get('_target_')}: {err}".splitlines()[0]) from None
        if not isinstance(callback, L.Callback):
            raise CaiError(f"callbacks.{name}: {node.get('_target_')} is not a lightning Callback")
        if has_logger or not isinstance(callback, L.pytorch.callbacks.LearningRateMonitor):
            built.append(callback)
    return built


def drop_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def gathered_state_dict(model: torch.nn.Module, strategy: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A module's full weights on the CPU, gathering DeepSpeed ZeRO-3 shards first where needed.

    A collective under ZeRO-3: every rank must call it. `dtype` casts the floating-point weights
    (training keeps float32 masters; checkpoints are written in the model's configured dtype).
    """

    def cast(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: cast(v).clone() for k, v in model.state_dict().items()}
    return {k: cast(v) for k, v in model.state_dict().items()}


def trained_placement(trainer: L.Trainer, model: torch.nn.Module) -> dict:
    """Where a Lightning-trained model ran, for manifests: this rank's device, the weights' dtype, the precision."""
    # Lightning moves the module back to the CPU when fit ends: the device is the strategy's.
    return {**placement(model), "device": str(trainer.strategy.root_device), "precision": str(trainer.precision)}


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tensor of the sequences padded with `value` to the longest, and its (B, T) 0/1 mask.

    Right padding for training and scoring; left padding for generation, so that every prompt
    ends at the same column.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar-length sequences, in a seeded random order that changes every epoch.

    Indices are shuffled, cut into pools of `batch_size * pool` items, each pool sorted by length
    and cut into batches; then the batches are shuffled. Little padding, still random. Under
    DDP/DeepSpeed each rank takes every world_size-th batch (the same seed on every rank keeps them
    disjoint), with the list padded by wrapping so all ranks run the same number of steps.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, pool: int = 50) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.pool = pool
        self.epoch = 0
        self.skip = (0, 0)  # (epoch, batches of it already trained): set when resuming mid-epoch

    def set_epoch(self, epoch: int) -> None:
        """Called before every epoch (fit's SamplerResume does it), so the order depends on the epoch alone."""
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(idx), size):
            chunk = sorted(idx[start : start + size], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        rank, world = rank_and_world()
        if world > 1:
            per_rank = math.ceil(len(batches) / world)
            batches = (batches * world)[: per_rank * world][rank::world]
        epoch, skip = self.skip
        return iter(batches[skip:] if epoch == self.epoch else batches)

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / rank_and_world()[1])


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all the sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


# A packed row may hold up to max(2 x its longest sequence, PACKED_ROW) tokens; a group that would pass it is cut
# into several rows (attention grows with the square of a row's length, while the prefix it saves grows linearly).
PACKED_ROW = 2048


def pack_shared_prefix(groups: Sequence[Sequence[Sequence[int]]], pad_id: int, pool_skip: int | None = None) -> dict[str, torch.Tensor]:
    """Groups of sequences that share a prefix (a prompt and its answers), packed into rows: the prefix
    once, then each sequence's remainder, so the prefix's tokens are computed once, not once per answer.

    Each token sees the prefix and the earlier tokens of its own remainder, at the position it has in
    its own sequence, so every sequence's hidden states are those it has alone (up to rounding). A
    group whose row would pass max(2 x its longest sequence, PACKED_ROW) tokens is cut into several
    rows, each with its own prefix: a longer row costs more attention (its square) than it saves.
    Returns, over G rows and the N sequences in order:
      input_ids, position_ids (G, T), right-padded;
      attention_mask (G, 1, T, T) bool, True where a token may attend (a pad column sees itself only:
        a row that sees nothing is NaN in SDPA);
      row (N,) each sequence's row; columns (N, L) the column of each of its tokens (0 past its end,
        L the longest sequence); ends (N,) the column of its last token that is not `pool_skip`
        (transformers' sequence classifiers read the last token that is not the pad token).
    """
    rows, positions, segments, where, columns, ends = [], [], [], [], [], []
    for group in groups:
        limit, start = max(2 * max(len(s) for s in group), PACKED_ROW), 0
        while start < len(group):  # the longest run of the group's sequences that fits one row
            stop = start + 1
            while stop < len(group) and packed_length(group[start : stop + 1]) <= limit:
                stop += 1
            part, start = group[start:stop], stop
            c = common_prefix(part)
            ids, pos, seg = list(part[0][:c]), list(range(c)), [0] * c
            for j, s in enumerate(part):
                cols = list(range(c)) + list(range(len(ids), len(ids) + len(s) - c))  # (len(s),)
                kept = [i for i, t in enumerate(s) if t != pool_skip]
                where.append(len(rows)), columns.append(cols), ends.append(cols[kept[-1] if kept else len(s) - 1])
                ids += s[c:]
                pos += range(c, len(s))
                seg += [j + 1] * (len(s) - c)
            rows.append(ids), positions.append(pos), segments.append(seg)
    input_ids, _ = pad(rows, pad_id)  # (G, T)
    position_ids, _ = pad(positions, 0)  # (G, T)
    seg, _ = pad(segments, -1)  # (G, T): 0 the prefix, j + 1 sequence j's remainder, -1 padding
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # (G, T, T): query row, key column
    real = (seg[:, None, :] >= 0) & (seg[:, :, None] >= 0)  # (G, T, T): neither is padding
    mask = (causal & visible & real) | torch.eye(width, dtype=torch.bool)  # (G, T, T)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "row": torch.tensor(where),
        "columns": pad(columns, 0)[0],
        "ends": torch.tensor(ends),
    }


def packed_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens in the row that packs these sequences: their common prefix once, then each remainder."""
    c = common_prefix(seqs)
    return c + sum(len(s) - c for s in seqs)
