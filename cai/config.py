"""Typed hyperparameters, registered in Hydra's ConfigStore.

Every YAML file under conf/ is merged onto one of these dataclasses (through its defaults list), so a
misspelled field fails when the config is composed, and the error names the field. The YAML files
carry the values and the comments; this file carries the types. Where an object is built from a
group (a ModelSpec, a generator, a strategy, a tracker), its fields are defined here once and the
object's class extends or takes them. `instantiate` builds one from its `_target_`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import cai
from cai.errors import CaiError


def ranged(default: Any, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A field with a valid range; `check_ranges` enforces it before any stage runs (OmegaConf checks only types)."""
    return field(default=default, metadata={"range": {"ge": ge, "gt": gt, "le": le, "lt": lt}})


@dataclass
class ModelConfig:
    """Which model to load: the embedded GGUF, the tiny random model, a hub id or a local dir."""

    _target_: str = "cai.models.ModelSpec"
    name: str = MISSING
    source: str = "hub"  # hf | embedded | tiny | hub | local
    name_or_path: str | None = None  # source=hf: a hub id or a checkpoint directory, as from_pretrained takes it
    path: str | None = None  # hub id (source=hub) or directory (source=local)
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    # Only for source=tiny: the shape of the random model.
    tiny_layers: int = 2
    tiny_hidden: int = 64
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate: int = 128
    seed: int = 0
    cache: str = "${paths.cache}"  # where the converted embedded model and tiny models are kept


@dataclass
class ConstitutionConfig:
    _target_: str = "cai.constitution.load_constitution"
    variant: str = MISSING  # default | ensemble | single | custom: how principles are drawn
    path: str = MISSING  # a YAML file, or a directory with the paper authors' JSON files
    ensemble_size: int = ranged(1, ge=0)  # RL principles averaged per comparison; 0 means all of them
    principle: str | None = None  # use only this RL principle id


@dataclass
class LabelConfig:
    kind: str = MISSING  # hard | soft | cot | likelihood | contrastive | human
    debias: bool = True
    clamp_low: float = ranged(0.0, ge=0, le=1)  # labels below are raised to it (label=cot: 0.4, the paper's clamp)
    clamp_high: float = ranged(1.0, ge=0, le=1)  # labels above are lowered to it (label=cot: 0.6)
    few_shot: bool = True
    cot_max_new_tokens: int = ranged(96, ge=1)
    options: str = "letters"  # multiple choice: letters (A/B) | numbers (1/2)
    brackets: bool = True  # multiple choice: "(A)" options read at "A"; false: "A." options read at " A"
    random_order: bool = False  # with debias=false: one order drawn per question instead of always a first
    ask: str = "better"  # better | worse (the question turned around) | both (averaged: cancels letter bias)
    temperature: float = ranged(1.0, gt=0)  # likelihood kinds: p(a) = sigmoid(score difference / temperature)
    max_length: int = ranged(512, ge=16)  # likelihood kinds: tokens per scored transcript
    reduce: str = "mean"  # likelihood kinds: an answer's score is the mean | sum of its token log-likelihoods
    batch_size: int = ranged(8, ge=1)
    engine: str = "hf"  # hf | vllm (with generation=vllm): what reads the option log-probs of labels and the feedback judge
    data: str | None = None  # hh-rlhf-format file, for kind=human
    n_human: int = ranged(0, ge=0)  # comparisons read from `data` for kind=human (0 = all)
    report_data: str | None = None  # hh-rlhf-format file: also write the constitution report
    report_n: int = ranged(100, ge=0)  # comparisons used by the report
    report_split: str = "all"  # all | tune (even positions of report_data) | report (odd positions)


@dataclass
class SamplingConfig:
    """How to sample: the one definition of these fields (the generators' SamplingParams extends it)."""

    max_new_tokens: int = ranged(128, ge=1)
    temperature: float = ranged(0.7, ge=0)  # 0 = greedy
    top_p: float = ranged(0.95, gt=0, le=1)
    seed: int = 0


@dataclass
class HFGenerationConfig(SamplingConfig):
    _target_: str = "cai.generation.hf.HFGenerator"
    batch_size: int = ranged(16, ge=1)
    truncate: bool = False  # a prompt too long for the context: cut its middle (True) or refuse it (False)


@dataclass
class VLLMGenerationConfig(SamplingConfig):
    _target_: str = "cai.generation.vllm.VLLMGenerator"
    batch_size: int = ranged(256, ge=1)
    dtype: str = "auto"
    gpu_memory_utilization: float = ranged(0.4, gt=0, le=1)
    tensor_parallel_size: int = ranged(1, ge=1)
    max_model_len: int = ranged(2048, ge=16)
    enforce_eager: bool | None = None  # None: eager on CPUs (starts ~4x faster), CUDA graphs on GPUs
    truncate: bool = False  # a prompt too long for the context: cut its middle (True) or refuse it (False)


@dataclass
class StrategyConfig:
    _target_: str = "cai.training.build_strategy"
    name: str = MISSING  # auto | ddp | deepspeed
    zero_stage: int = 0  # 2 or 3 for deepspeed
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class PeftConfig:
    """How the training stages train: every weight (none) or LoRA adapters (cai/lora.py)."""

    kind: str = MISSING  # none | lora
    r: int = ranged(16, ge=1)
    alpha: float = ranged(32.0, gt=0)
    dropout: float = ranged(0.05, ge=0, lt=1)
    target_modules: Any = "all-linear"  # 'all-linear' or a list of module names


@dataclass
class LoggerConfig:
    _target_: str = "cai.tracking.Tracker"
    backend: str = MISSING  # wandb | csv | none
    project: str = "cai"
    entity: str | None = None
    mode: str = "offline"  # wandb mode: offline | online | disabled
    dir: str | None = "${paths.output}"  # None only under --cfg job --resolve
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # None: the multirun or sweep, if any
    reference_mb: float = 100.0  # outputs larger than this are logged as references, not uploaded


@dataclass
class StageConfig:
    name: str = MISSING  # all | check | one stage's name | a command (pm_eval, frontier, label_report)


@dataclass
class PathsConfig:
    root: str = "${oc.env:CAI_ROOT,.}"
    artifacts: str = "${paths.root}/artifacts"
    output: str | None = "${paths.root}/outputs"  # None under --cfg job --resolve (no Hydra run dir yet)
    cache: str = "${oc.env:CAI_CACHE,'~/.cache/cai'}"


@dataclass
class DataConfig:
    red_team: str = "builtin"  # 'builtin', a prompt file (.jsonl with 'prompt', or .txt), or 'yours' (a file is required)
    helpful: str = "builtin"
    n_red_team: int = ranged(32, ge=0)  # train prompts used; 0 = all
    n_helpful: int = ranged(16, ge=0)
    truncate: bool = False  # a prompt longer than the model's context: refuse the run (False) or cut its middle (True)


@dataclass
class TrainerConfig:
    """`lightning.Trainer`'s arguments, passed to every Trainer cai builds (SFT, the PM, PPO).

    The first four are typed: cai reads them (placement, precision, ranks). Every other argument is
    open (`Any`) and None by default, meaning cai's choice or Lightning's default; set one and it
    goes to the Trainer as it is (`trainer.max_steps=100`, `trainer.gradient_clip_val=1.0`). Three
    are missing on purpose: `strategy`, `logger` and `callbacks` are config groups of their own.
    tests/test_config.py checks this list against the installed Lightning.
    """

    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "auto"  # auto: bf16-mixed where the hardware has it, else 32-true
    num_nodes: int = ranged(1, ge=1)
    fast_dev_run: Any = None
    max_epochs: Any = None  # cai's: sft.epochs / pm.epochs (PPO: one epoch per iteration, always)
    min_epochs: Any = None
    max_steps: Any = None
    min_steps: Any = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: Any = None
    num_sanity_val_steps: Any = None
    log_every_n_steps: Any = None
    enable_checkpointing: Any = None
    enable_progress_bar: Any = None
    enable_model_summary: Any = None
    accumulate_grad_batches: Any = None  # cai's: sft.grad_accum / pm.grad_accum (PPO: none, it steps by hand)
    gradient_clip_val: Any = None
    gradient_clip_algorithm: Any = None
    deterministic: Any = None
    benchmark: Any = None
    inference_mode: Any = None
    use_distributed_sampler: Any = None
    profiler: Any = None
    detect_anomaly: Any = None
    barebones: Any = None
    plugins: Any = None
    sync_batchnorm: Any = None
    reload_dataloaders_every_n_epochs: Any = None
    default_root_dir: Any = None
    enable_autolog_hparams: Any = None
    model_registry: Any = None


# Trainer arguments left out of the lineage key: those that only log, and where a run runs
# (accelerator, devices, num_nodes). Data parallelism does change the global batch, but a run on more
# devices is treated as the same experiment, so its SFT, PM and PPO outputs are reused across them.
TRAINER_LOGGING_ONLY = (
    "accelerator",
    "devices",
    "num_nodes",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "profiler",
    "default_root_dir",
    "enable_autolog_hparams",
    "model_registry",
)
# What the PPO loop cannot take from trainer.*: it steps by hand, one epoch per iteration.
TRAINER_NOT_FOR_PPO = ("max_epochs", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")


@dataclass
class SLConfig:
    n_revisions: int = ranged(1, ge=1)
    helpful_mix: float = ranged(0.25, ge=0)
    critique: bool = True
    n_few_shot: int = ranged(1, ge=0)
    max_new_tokens: int = ranged(96, ge=1)
    shard_size: int = ranged(64, ge=1)


@dataclass
class TrainingConfig:
    """What SFT and the PM both train with (through cai.training.fit): one definition of these fields and ranges."""

    epochs: int = ranged(1, ge=1)
    batch_size: int = ranged(8, ge=1)
    grad_accum: int = ranged(1, ge=1)
    lr: float = ranged(2e-5, gt=0)
    warmup_ratio: float = ranged(0.1, ge=0, le=1)
    max_length: int = ranged(512, ge=8)
    val_fraction: float = ranged(0.1, ge=0, lt=1)
    checkpoint_every: int = ranged(50, ge=0)


@dataclass
class SFTConfig(TrainingConfig):
    revision: Any = -1  # k (1..n_revisions), -1 = the last round, or "all": every round (checked by the sft stage)


@dataclass
class PairsConfig:
    temperature: float = ranged(1.0, gt=0)
    max_new_tokens: int = ranged(64, ge=1)
    shard_size: int = ranged(64, ge=1)


@dataclass
class PMConfig(TrainingConfig):
    lr: float = ranged(1e-5, gt=0)
    helpful_data: str | None = None
    n_helpful: int = ranged(0, ge=0)  # human helpfulness comparisons mixed in (0 = as many as harmlessness labels)
    eval_data: str | None = None
    n_eval: int = ranged(0, ge=0)  # comparisons of eval_data scored (0 = all)
    checkpoint: str | None = None
    trainable: str = "all"  # all | last_block | head: what the PM trains (a frozen backbone is much cheaper)
    share_prompt: bool = True  # both answers of a comparison in one row, their shared prompt computed once


@dataclass
class PPOConfig:
    iterations: int = ranged(8, ge=1)
    rollouts: int = ranged(16, ge=2)
    max_new_tokens: int = ranged(48, ge=1)
    ppo_epochs: int = ranged(2, ge=1)
    minibatch_size: int = ranged(8, ge=1)
    lr: float = ranged(1e-5, gt=0)
    clip_range: float = ranged(0.2, gt=0)
    value_clip: float = ranged(0.2, gt=0)
    value_coef: float = ranged(0.5, ge=0)
    entropy_coef: float = ranged(0.0, ge=0)
    gamma: float = ranged(1.0, gt=0, le=1)
    lam: float = ranged(0.95, ge=0, le=1)
    kl_coef: float = ranged(0.05, ge=0)
    adaptive_kl: bool = True
    target_kl: float = ranged(6.0, gt=0)
    kl_horizon: int = ranged(10000, ge=1)
    reward_norm: str = "batch"  # batch | running | none: how PM scores are normalised before the KL penalty
    missing_eos_penalty: float = ranged(0.0, ge=0)  # subtracted from the score of an answer cut at max_new_tokens (0 = off)
    reward_clip: float = ranged(5.0, gt=0)
    max_grad_norm: float = ranged(1.0, gt=0)  # gradient clipping (DeepSpeed applies it in its engine)
    value_model: str = "head"  # head | critic (ppo.advantage=gae only)
    advantage: str = "gae"  # gae (a critic) | grpo | rloo (critic-free: each answer against the others to its prompt)
    samples_per_prompt: int = ranged(1, ge=1)  # answers per prompt in an iteration (grpo and rloo need >= 2)
    share_prompt: bool = True  # a prompt's answers in one row, the prompt computed once (samples_per_prompt > 1)
    reward_model: str | None = None  # a one-label sequence classifier (directory or hub id) as the reward, instead of this run's PM
    policy: str | None = None  # a causal LM (directory or hub id) to start RL from, instead of this run's SFT model
    frozen_dtype: str = "bfloat16"  # bfloat16 | float32: how the frozen ref and reward model store their weights
    checkpoint_every: int = ranged(4, ge=0)
    table_every: int = ranged(4, ge=0)
    snapshot_every: int = ranged(4, ge=0)  # iterations between the policy snapshots that eval rates


@dataclass
class EvalConfig:
    judge: str = "feedback"  # feedback | pm
    n_red_team: int = ranged(16, ge=1)
    n_helpful: int = ranged(16, ge=1)
    max_new_tokens: int = ranged(64, ge=1)
    bootstrap: int = ranged(200, ge=1)
    judge_pm: str | None = None  # eval.judge=pm: a PM directory to judge with (e.g. one trained with label=human)
    judge_own_pm: bool = False  # allow judging by this run's own PM, the reward PPO optimised
    judge_check: str | None = None  # hh-rlhf harmlessness comparisons: measure the judge against humans first
    judge_check_helpful: str | None = None  # the same for the helpfulness axis
    judge_check_n: int = ranged(200, ge=0)  # comparisons read from each check file (0 = all)
    runs: list[str] = field(default_factory=list)  # stage=frontier: eval dirs or artifact roots to merge
    external: list[str] = field(default_factory=list)  # NAME:FILE answer sets of other systems, rated as players


@dataclass
class MemoryConfig:
    """The memory plan (cai/memory.py): what each stage needs per device, checked before any model loads."""

    check: bool = True  # refuse a plan that does not fit (False: print it, warn, and run anyway)
    device_gib: float | None = ranged(None, gt=0)  # plan for a GPU of this many GiB (None: this machine's GPU, else its memory)
    usable: float = ranged(0.9, gt=0, le=1)  # the fraction of a device the plan may fill (the allocator fragments the rest)
    prompt_tokens: int = ranged(512, ge=1)  # the longest prompt the plan assumes (critique and comparison prompts are long)


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING  # the policy
    feedback_model: ModelConfig = MISSING
    pm_model: ModelConfig = MISSING
    constitution: ConstitutionConfig = MISSING
    label: LabelConfig = MISSING
    strategy: StrategyConfig = MISSING
    peft: PeftConfig = MISSING
    generation: Any = MISSING  # typed by its option's schema (HF or vLLM)
    logger: LoggerConfig = MISSING
    stage: StageConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> a lightning Callback's _target_ entry (null: off)
    sl: SLConfig = field(default_factory=SLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    pm: PMConfig = field(default_factory=PMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # Lightning's seed_everything takes an unsigned 32-bit seed
    run_name: str | None = None  # default: made from the command-line overrides
    objective: str | None = "eval/summary/harmless_elo"  # returned to Hydra's sweepers: eval/summary/<elo.json field of the final policy>
    allow_other_code: bool = False  # reuse finished stages computed by another version of cai's code (with a warning)
    gradient_checkpointing: bool = True  # training stages recompute activations in backward: less memory, same numbers


def register() -> None:
    """Store the schemas that conf/*.yaml build on (`defaults: [/schema/<name>@_here_, _self_]`).

    They live in one `schema` group, apart from the axes, so `--help` and tab completion offer only
    real options (`label=soft`, never `label=label_schema`).
    """
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, node in [
        ("model", ModelConfig),
        ("constitution", ConstitutionConfig),
        ("label", LabelConfig),
        ("hf", HFGenerationConfig),
        ("vllm", VLLMGenerationConfig),
        ("strategy", StrategyConfig),
        ("peft", PeftConfig),
        ("logger", LoggerConfig),
        ("stage", StageConfig),
    ]:
        cs.store(group="schema", name=name, node=node)
    if not OmegaConf.has_resolver("cai_constitutions"):
        # ${cai_constitutions:} is the folder of shipped principle files (top level in a checkout, inside the
        # package in a wheel), so a config can name one wherever cai runs.
        OmegaConf.register_new_resolver("cai_constitutions", lambda: str(cai.CONSTITUTIONS))


register()


# The sections whose fields carry ranges, and their schemas (generation: by its option's _target_).
RANGED_SECTIONS = {
    "constitution": ConstitutionConfig,
    "label": LabelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "peft": PeftConfig,
    "sl": SLConfig,
    "sft": SFTConfig,
    "pairs": PairsConfig,
    "pm": PMConfig,
    "ppo": PPOConfig,
    "eval": EvalConfig,
    "memory": MemoryConfig,
}
BOUNDS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def check_finite(node: Any, where: str = "") -> None:
    """No number anywhere in the config is inf or NaN (`ppo.kl_coef=inf` would load every model, then diverge)."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_finite(v, f"{where}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise CaiError(f"{where}: must be a finite number, got {node} (fix it in conf/ or on the command line: {where}=...)")


def uses_vllm(cfg: DictConfig) -> bool:
    """True when the run generates with vLLM (`generation=vllm`): the generation section's target says so."""
    return "vllm" in str(cfg.generation.get("_target_", ""))


def check_ranges(cfg: DictConfig) -> None:
    """Check every ranged field (counts, batch sizes, epochs, learning rates, fractions) before any model loads."""
    check_finite({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"})
    sections = dict(RANGED_SECTIONS)
    sections["generation"] = VLLMGenerationConfig if uses_vllm(cfg) else HFGenerationConfig
    for section, schema in sections.items():
        for f in dataclasses.fields(schema):
            bounds = f.metadata.get("range")
            value = cfg[section].get(f.name) if bounds else None
            if value is None:
                continue
            failed = [f"{op} {b}" for kind, (op, ok) in BOUNDS.items() if (b := bounds[kind]) is not None and not ok(value, b)]
            if failed:
                wanted = " and ".join(f"{op} {b}" for kind, (op, _) in BOUNDS.items() if (b := bounds[kind]) is not None)
                raise CaiError(
                    f"{section}.{f.name}: must be {wanted}, got {value} (fix it in conf/ or on the command line: {section}.{f.name}=...)"
                )


def instantiate(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a CaiError raised inside comes out as itself (one clear line).

    Extra kwargs (live objects such as a ModelSpec or a loaded model) are passed through a partial,
    because Hydra would turn a dataclass kwarg into a config node.
    """
    try:
        if kwargs:
            return hydra.utils.instantiate(node, _partial_=True)(**kwargs)
        return hydra.utils.instantiate(node)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, CaiError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
