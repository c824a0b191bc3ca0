"""Typed hyperparameters, registered in Hydra's ConfigStore.

Every YAML file under conf/ is merged onto one of these dataclasses (through its defaults list), so a
misspelled field fails when the config is composed, and the error names the field. The YAML files
carry the values and the comments; this file carries the types. Where an object is built from a
group (a ModelSpec, a generator, a strategy, a tracker), its fields are defined here once and the
object's class extends or takes them. `instantiate` builds one from its `_target_`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import cai
from cai.errors import CaiError


@dataclass
class ModelConfig:
    """Which model to load: the embedded GGUF, the tiny random model, a hub id or a local dir."""

    _target_: str = "cai.models.ModelSpec"
    name: str = MISSING
    source: str = "hub"  # embedded | tiny | hub | local
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
    ensemble_size: int = 1  # RL principles averaged per comparison; 0 means all of them
    principle: str | None = None  # use only this RL principle id


@dataclass
class LabelConfig:
    kind: str = MISSING  # hard | soft | cot | human
    debias: bool = True
    clamp_low: float = 0.0
    clamp_high: float = 1.0
    few_shot: bool = True
    cot_max_new_tokens: int = 96
    batch_size: int = 8
    data: str | None = None  # hh-rlhf-format file, for kind=human
    n_human: int = 0  # comparisons read from `data` for kind=human (0 = all)
    report_data: str | None = None  # hh-rlhf-format file: also write the constitution report
    report_n: int = 100  # comparisons used by the report


@dataclass
class SamplingConfig:
    """How to sample: the one definition of these fields (the generators' SamplingParams extends it)."""

    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: int = 0


@dataclass
class HFGenerationConfig(SamplingConfig):
    _target_: str = "cai.generation.hf.HFGenerator"
    batch_size: int = 16


@dataclass
class VLLMGenerationConfig(SamplingConfig):
    _target_: str = "cai.generation.vllm.VLLMGenerator"
    batch_size: int = 256
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.4
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    enforce_eager: bool | None = None  # None: eager on CPUs (starts ~4x faster), CUDA graphs on GPUs


@dataclass
class StrategyConfig:
    _target_: str = "cai.training.build_strategy"
    name: str = MISSING  # auto | ddp | deepspeed
    zero_stage: int = 0  # 2 or 3 for deepspeed
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class LoggerConfig:
    _target_: str = "cai.tracking.Tracker"
    backend: str = MISSING  # wandb | csv | none
    project: str = "cai"
    entity: str | None = None
    mode: str = "offline"  # wandb mode: offline | online | disabled
    dir: str = "${paths.output}"
    tags: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    name: str = MISSING


@dataclass
class PathsConfig:
    root: str = "${oc.env:CAI_ROOT,.}"
    artifacts: str = "${paths.root}/artifacts"
    output: str = "${paths.root}/outputs"
    cache: str = "${oc.env:CAI_CACHE,'~/.cache/cai'}"


@dataclass
class DataConfig:
    red_team: str = "builtin"  # 'builtin' or a prompt file (.jsonl with 'prompt', or .txt)
    helpful: str = "builtin"
    n_red_team: int = 32  # train prompts used; 0 = all
    n_helpful: int = 16


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "auto"  # auto: bf16-mixed where the hardware has it, else 32-true
    num_nodes: int = 1


@dataclass
class SLConfig:
    n_revisions: int = 1
    helpful_mix: float = 0.25
    critique: bool = True
    n_few_shot: int = 1
    max_new_tokens: int = 96
    shard_size: int = 64


@dataclass
class SFTConfig:
    revision: int = -1
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_length: int = 512
    val_fraction: float = 0.1
    checkpoint_every: int = 50


@dataclass
class PairsConfig:
    temperature: float = 1.0
    max_new_tokens: int = 64
    shard_size: int = 64


@dataclass
class PMConfig:
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_ratio: float = 0.1
    max_length: int = 512
    val_fraction: float = 0.1
    checkpoint_every: int = 50
    helpful_data: str | None = None
    n_helpful: int = 0  # human helpfulness comparisons mixed in (0 = as many as harmlessness labels)
    eval_data: str | None = None
    n_eval: int = 0  # comparisons of eval_data scored (0 = all)
    checkpoint: str | None = None


@dataclass
class PPOConfig:
    iterations: int = 8
    rollouts: int = 16
    max_new_tokens: int = 48
    ppo_epochs: int = 2
    minibatch_size: int = 8
    lr: float = 1e-5
    clip_range: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    adaptive_kl: bool = True
    target_kl: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = True
    reward_clip: float = 5.0
    value_model: str = "head"  # head | critic
    checkpoint_every: int = 4
    table_every: int = 4
    snapshot_every: int = 4  # iterations between the policy snapshots that eval rates


@dataclass
class EvalConfig:
    judge: str = "feedback"  # feedback | pm
    n_red_team: int = 16
    n_helpful: int = 16
    max_new_tokens: int = 64
    bootstrap: int = 200
    runs: list[str] = field(default_factory=list)  # stage=frontier: eval dirs or artifact roots to merge


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING  # the policy
    feedback_model: ModelConfig = MISSING
    pm_model: ModelConfig = MISSING
    constitution: ConstitutionConfig = MISSING
    label: LabelConfig = MISSING
    strategy: StrategyConfig = MISSING
    generation: Any = MISSING  # typed by its option's schema (HF or vLLM)
    logger: LoggerConfig = MISSING
    stage: StageConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sl: SLConfig = field(default_factory=SLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    pm: PMConfig = field(default_factory=PMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    run_name: str | None = None  # default: made from the command-line overrides


def register() -> None:
    """Store the schemas that conf/*.yaml build on (`defaults: [schema_name, _self_]`)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, name, node in [
        ("model", "model_schema", ModelConfig),
        ("constitution", "constitution_schema", ConstitutionConfig),
        ("label", "label_schema", LabelConfig),
        ("generation", "hf_schema", HFGenerationConfig),
        ("generation", "vllm_schema", VLLMGenerationConfig),
        ("strategy", "strategy_schema", StrategyConfig),
        ("logger", "logger_schema", LoggerConfig),
        ("stage", "stage_schema", StageConfig),
    ]:
        cs.store(group=group, name=name, node=node)
    if not OmegaConf.has_resolver("cai_root"):
        # ${cai_root:} is the repository root, so a config can name constitutions/ wherever it runs.
        OmegaConf.register_new_resolver("cai_root", lambda: str(cai.ROOT))


register()


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
