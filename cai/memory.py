"""The memory plan: what each role of each stage needs per device, worked out before any model loads.

A 7B policy trained in full needs about 16 bytes per parameter for the actor alone (float32
weights, float32 gradients, AdamW's two moments): far past one 80 GB GPU. Finding that out after
the models have loaded costs minutes; finding it out from an out-of-memory error half-way through
PPO costs hours. So the pipeline plans first: from each model's config (its shape, never its
weights: the parameters are counted on the meta device), `peft`, `strategy`, the precision, the
device count, the batch sizes and the lengths, it adds up per device, for every stage the run
will run and every role in it (verl's names: actor, critic, ref, reward, rollout):

  weights      parameters as they sit on the device (train: float32, or bf16 under DeepSpeed;
               frozen roles: their storage dtype; ZeRO-3 shards them, offload moves them to the host)
  gradients    one per trained parameter (ZeRO-2 and -3 shard them)
  optimizer    AdamW's two moments per trained parameter, plus DeepSpeed's float32 master copy
               (ZeRO shards it; `offload_optimizer` moves it to the host)
  activations  a training micro-batch's saved activations (with gradient checkpointing: each layer's
               input, plus one layer recomputed), and the logits the loss reads
  kv cache     generation's keys and values for a whole batch at its full length; under
               generation=vllm on a GPU, the share of the device the engine reserves

A plan whose largest stage does not fit `memory.usable` of the device is refused in one line that
names the stage, what it needs and each single override that makes it fit (peft=lora, a ZeRO
strategy, a smaller micro-batch), found by planning each candidate. The numbers are estimates
(the allocator's fragmentation, CUDA's context and kernels' workspaces are one flat `runtime`
line), so `memory.check=false` prints the plan and runs anyway.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cai.config import uses_vllm
from cai.errors import CaiError

log = logging.getLogger(__name__)

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# SmolLM2-135M-Instruct, the embedded model: its shape, so planning never converts the GGUF (30 s).
EMBEDDED_SHAPE = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)
RUNTIME_GIB = 1.0  # CUDA's context and kernels' workspaces on a GPU; Python, torch and the libraries on a CPU


@dataclass
class Shape:
    """What the plan needs to know of a model: its parameter counts and the sizes that set activations."""

    params: int  # every parameter, tied ones once
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head size
    vocab: int
    head_params: int  # the output head's own parameters (0 when tied to the embedding)
    linear: dict[str, tuple[int, int]] = field(default_factory=dict)  # every linear layer but the head: name -> (in, out)

    def lora_params(self, r: int, targets: Any) -> int:
        """LoRA's trainable parameters: r (in + out) per adapted linear layer (all-linear: every one but the head)."""
        names = None if isinstance(targets, str) and targets == "all-linear" else {targets} if isinstance(targets, str) else set(targets)
        return sum(r * (i + o) for n, (i, o) in self.linear.items() if names is None or n.rsplit(".", 1)[-1] in names)

    def layer_params(self) -> int:
        return sum(i * o for i, o in self.linear.values()) // max(self.layers, 1)


def shape_of(config) -> Shape:
    """Count a transformers config's parameters on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linear = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=text.vocab_size,
        head_params=0 if tied or head is None else head.weight.numel(),
        linear=linear,
    )


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )


_SHAPES: dict[str, Shape | None] = {}


def model_shape(spec) -> Shape | None:
    """A ModelSpec's shape, from its config alone; None when its config cannot be read here (a hub id, offline, not cached)."""
    if spec.source == "tiny":
        key = spec.tiny_name()
    elif spec.source == "embedded":
        key = "embedded"
    else:
        key = f"{spec.source}:{spec.name_or_path or spec.path}@{spec.revision}"
    if key in _SHAPES:
        return _SHAPES[key]
    if spec.source == "tiny":
        config = spec.tiny_config(EMBEDDED_SHAPE["vocab"])  # the tiny model has the embedded tokenizer
    elif spec.source == "embedded":
        config = llama_config(**EMBEDDED_SHAPE)
    else:
        config = read_config(spec.name_or_path if spec.source == "hf" else spec.path, spec.revision, spec.trust_remote_code)
    _SHAPES[key] = shape_of(config) if config is not None else None
    return _SHAPES[key]


def read_config(where: str, revision: str | None = None, trust_remote_code: bool = False):
    """A model's config.json from a directory, the local HF cache, or the hub when it can be reached; None if none of them has it."""
    from transformers import AutoConfig

    from cai.models import hub_offline

    local = Path(where).expanduser()
    if local.is_dir():
        where = str(local)
    attempts = [True] if local.is_dir() or hub_offline() else [True, False]
    for local_only in attempts:
        try:
            return AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only)
        except Exception:  # not cached, no network, no config.json: the plan says so and goes on
            continue
    return None


# --- the arithmetic: bytes per role --------------------------------------------------------------


@dataclass
class Setup:
    """How this run trains and generates, as far as memory goes."""

    devices: int  # ranks sharing the work (ZeRO shards over them)
    zero: int  # DeepSpeed ZeRO stage, 0 without DeepSpeed
    offload_optimizer: bool
    offload_parameters: bool
    bf16: bool  # the trainer's precision computes in 16 bits
    lora: DictConfig | None  # cfg.peft under peft=lora
    checkpointing: bool  # gradient checkpointing
    vllm_gib: float  # generation=vllm on a GPU: what its engine reserves per device (0 otherwise)


@dataclass
class Role:
    """What one role of one stage needs per device, in bytes, by kind."""

    stage: str
    role: str
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache


COLUMNS = ("weights", "gradients", "optimizer", "activations", "kv_cache")


def trained(stage: str, role: str, shape: Shape, setup: Setup, batch: int, length: int, trainable: int, logits: int) -> Role:
    """A model being trained: its weights, gradients and optimizer state for `trainable` parameters, and
    the activations of a micro-batch of `batch` sequences of `length` tokens (`logits` of them read the vocabulary).

    Without DeepSpeed the weights are float32 (AdamW's master weights; bf16 compute is autocast), the
    gradients float32, AdamW's moments 8 bytes. Under DeepSpeed with bf16 the module is bf16 and its
    engine keeps float32 master weights beside the moments: 2 + 2 + 12 bytes. ZeRO-1 shards the
    optimizer state over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too.
    """
    ds16 = setup.zero > 0 and setup.bf16
    w, g, o = (2, 2, 12) if ds16 else (4, 4, 8)
    n = setup.devices
    weights = (shape.params * w) / (n if setup.zero == 3 else 1)
    if setup.offload_parameters and setup.zero == 3:
        weights = 2 * shape.params * w / max(shape.layers, 1)  # in the host's memory; about two layers gathered at a time
    role = Role(stage, role, weights=weights)
    role.gradients = trainable * g / (n if setup.zero >= 2 else 1)
    role.optimizer = 0.0 if setup.offload_optimizer else trainable * o / (n if setup.zero >= 1 else 1)
    role.activations = activations(shape, setup, batch, length, logits, train=True)
    return role


def activations(shape: Shape, setup: Setup, batch: int, length: int, logits: int, train: bool) -> float:
    """Bytes of activations: a training step's saved ones, or an inference forward's largest transient.

    One decoder layer keeps about (6 hidden + 2 kv + 5 intermediate) values per token for its backward
    (the norms' outputs, q/k/v, attention's output, the MLP's gate, up, activation and product;
    SDPA's attention keeps no T x T matrix). With gradient checkpointing only each layer's input is
    kept, and one layer is recomputed at a time. The loss's logits are float32, with their gradient.
    """
    a = 2 if setup.bf16 else 4  # matmul outputs under autocast
    residual = 2 if setup.zero > 0 and setup.bf16 else 4  # the residual stream has the weights' dtype
    tokens = batch * length
    per_layer = tokens * (6 * shape.hidden + 2 * shape.kv_dim + 5 * shape.intermediate) * a
    if not train:
        return tokens * shape.hidden * residual * 4 + logits * shape.vocab * 4
    kept = tokens * shape.hidden * residual * shape.layers + per_layer if setup.checkpointing else per_layer * shape.layers
    return kept + logits * shape.vocab * 4 * 3  # logits, log-softmax, their gradient


def kv_cache(shape: Shape, batch: int, length: int, dtype_bytes: int) -> float:
    """Keys and values of every layer for `batch` sequences of `length` tokens."""
    return 2 * shape.layers * shape.kv_dim * batch * length * dtype_bytes


def inference(stage: str, role: str, shape: Shape, dtype_bytes: int, setup: Setup, batch: int, length: int, generate: bool) -> Role:
    """A frozen model answering (generate: its KV cache, or vLLM's reserved share) or scoring (a forward's activations)."""
    r = Role(stage, role, weights=shape.params * dtype_bytes)
    if generate and setup.vllm_gib:
        r.weights, r.kv_cache = 0.0, setup.vllm_gib * GIB  # the engine holds its own weights inside its share
    elif generate:
        r.kv_cache = kv_cache(shape, batch, length, dtype_bytes) + batch * shape.vocab * 4
    else:
        r.activations = activations(shape, setup, batch, length, batch, train=False)
    return r


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class Plan:
    budget: float  # bytes usable per device
    device: str  # what the budget is: "1 x 80.0 GiB (memory.device_gib)", "cuda:0 H100 ...", "host memory"
    roles: list[Role]
    unknown: list[str]  # models whose config could not be read here: left out of the plan

    def stage_totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for r in self.roles:
            totals[r.stage] = totals.get(r.stage, 0.0) + r.total
        return {s: t + RUNTIME_GIB * GIB for s, t in totals.items()}

    def peak(self) -> tuple[str, float]:
        totals = self.stage_totals()
        stage = max(totals, key=totals.get) if totals else ""
        return stage, totals.get(stage, 0.0)

    def fits(self) -> bool:
        return self.peak()[1] <= self.budget

    def table(self) -> str:
        """The plan as the log prints it: one row per role, one total per stage, GiB per device."""
        header = ("stage", "role", *COLUMNS, "total")
        rows = []
        totals = self.stage_totals()
        for stage in dict.fromkeys(r.stage for r in self.roles):
            for r in (r for r in self.roles if r.stage == stage):
                rows.append((stage, r.role, *(gib(getattr(r, c)) for c in COLUMNS), gib(r.total)))
            rows.append(
                (stage, "= total", *([""] * len(COLUMNS)), gib(totals[stage]) + (" fits" if totals[stage] <= self.budget else " TOO MUCH"))
            )
        widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        extra = f"; runtime {RUNTIME_GIB:.1f} GiB per stage" + (
            f"; not planned (config not readable here): {', '.join(self.unknown)}" if self.unknown else ""
        )
        return f"memory plan, GiB per device (budget {gib(self.budget)} GiB: {self.device}{extra}):\n" + "\n".join(
            "  " + line for line in lines
        )  # indented: no line of it reads as the run's summary


def gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def device_count(cfg: DictConfig) -> int:
    """The ranks the run's Trainer would use: trainer.devices (a count, a list of ids, 'auto' or -1) x num_nodes."""
    devices = cfg.trainer.devices
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1, None):
        count = torch.cuda.device_count() if gpu and cfg.strategy.name != "auto" else 1
    elif isinstance(devices, int):
        count = devices
    elif isinstance(devices, str):  # "0,1"
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        count = len(list(devices))
    return max(count, 1) * int(cfg.trainer.num_nodes)


def device_budget(cfg: DictConfig, devices: int) -> tuple[float, str, bool]:
    """Bytes per device, what they are, and whether the plan is for a GPU: memory.device_gib (a GPU of
    that size, wherever the plan is made), else this machine's GPU, else the host (shared by every rank on a CPU)."""
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if cfg.memory.device_gib:
        total, what, gpu = cfg.memory.device_gib * GIB, f"{devices} x {cfg.memory.device_gib:g} GiB GPU (memory.device_gib)", True
    elif gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        total, what = float(props.total_memory), f"{devices} x {props.name} {props.total_memory / GIB:.1f} GiB"
    else:
        total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / devices
        what = f"host memory {total * devices / GIB:.1f} GiB" + (f" shared by {devices} ranks" if devices > 1 else "")
    return total, what, gpu


def setup_of(cfg: DictConfig, devices: int, total_bytes: float, gpu: bool) -> Setup:
    """The run's memory-relevant settings; precision 'auto' is bf16-mixed on a planned GPU, as it resolves on one."""
    from cai.training import resolve_precision

    deepspeed = cfg.strategy.name == "deepspeed"
    precision = "bf16-mixed" if gpu and cfg.trainer.precision == "auto" else resolve_precision(cfg.trainer.precision)
    vllm = uses_vllm(cfg) and gpu
    return Setup(
        devices=devices,
        zero=int(cfg.strategy.zero_stage) if deepspeed else 0,
        offload_optimizer=deepspeed and bool(cfg.strategy.offload_optimizer),
        offload_parameters=deepspeed and bool(cfg.strategy.offload_parameters),
        bf16=precision.startswith(("bf16", "16")),
        lora=cfg.peft if cfg.peft.kind == "lora" else None,
        checkpointing=bool(cfg.gradient_checkpointing),
        vllm_gib=(cfg.generation.gpu_memory_utilization * total_bytes / GIB) if vllm else 0.0,
    )


class Planner:
    """The roles of each stage for one config: one method per stage, each returning its roles."""

    def __init__(self, cfg: DictConfig) -> None:
        from cai.config import instantiate
        from cai.models import ModelSpec

        self.cfg, self.unknown = cfg, []
        self.devices = device_count(cfg)
        total, device, self.gpu = device_budget(cfg, self.devices)
        self.setup = setup_of(cfg, self.devices, total, self.gpu)
        self.budget, self.device = total * cfg.memory.usable, f"{device}, {cfg.memory.usable:.0%} usable"

        def shape(key: str, override: str | None = None) -> Shape | None:
            spec = ModelSpec(name=override, source="hf", name_or_path=override) if override else instantiate(cfg[key])
            found = model_shape(spec)
            if found is None:
                self.unknown.append(override or spec.name)
            return found

        self.policy, self.feedback, self.pm_shape = shape("model"), shape("feedback_model"), shape("pm_model")
        self.actor = shape("model", cfg.ppo.policy) if cfg.ppo.policy else self.policy
        self.reward = shape("pm_model", cfg.ppo.reward_model) if cfg.ppo.reward_model else self.pm_shape
        self.gen, self.prompt = cfg.generation.batch_size, cfg.memory.prompt_tokens

    def dtype_bytes(self, key: str) -> int:
        """Bytes per weight of a model that only runs forward: its `dtype` ('auto' is bf16 on a planned GPU)."""
        from cai.models import resolve_dtype

        dtype = self.cfg[key].dtype
        name = str(resolve_dtype("bfloat16" if self.gpu and dtype == "auto" else dtype)).removeprefix("torch.")
        return BYTES.get(name, 4)

    def trainable(self, s: Shape, kind: str = "causal") -> int:
        """Trained parameters: LoRA's adapters (and a PM's score head), or every weight (a PM's LM head replaced by its score head)."""
        head = s.hidden if kind == "seq_cls" else 0
        if self.setup.lora is not None:
            return s.lora_params(int(self.setup.lora.r), self.setup.lora.target_modules) + head
        return s.params - (s.head_params if kind == "seq_cls" else 0) + head

    def generating(self, stage: str, shape: Shape | None, key: str, new_tokens: int) -> list[Role]:
        if shape is None:
            return []
        return [inference(stage, "rollout", shape, self.dtype_bytes(key), self.setup, self.gen, self.prompt + new_tokens, True)]

    def sl_data(self) -> list[Role]:
        return self.generating("sl_data", self.policy, "model", self.cfg.sl.max_new_tokens)

    def pairs(self) -> list[Role]:
        return self.generating("pairs", self.policy, "model", self.cfg.pairs.max_new_tokens)

    def sft(self) -> list[Role]:
        if self.policy is None:
            return []
        b, s = self.cfg.sft.batch_size, self.cfg.sft.max_length
        return [trained("sft", "actor", self.policy, self.setup, b, s, self.trainable(self.policy), logits=b * s)]

    def label(self) -> list[Role]:
        cfg, f = self.cfg, self.feedback
        if f is None or cfg.label.kind == "human":
            return []
        if cfg.label.engine == "vllm" and self.setup.vllm_gib:  # the engine holds the feedback model inside its share
            return [Role("label", "reward", kv_cache=self.setup.vllm_gib * GIB)]
        length = max(cfg.label.max_length, self.prompt + 2 * cfg.pairs.max_new_tokens)
        role = inference("label", "reward", f, self.dtype_bytes("feedback_model"), self.setup, cfg.label.batch_size, length, False)
        if cfg.label.kind == "cot":  # it generates its reasoning first
            role.kv_cache = kv_cache(f, cfg.label.batch_size, length + cfg.label.cot_max_new_tokens, self.dtype_bytes("feedback_model"))
        return [role]

    def pm(self) -> list[Role]:
        s = self.pm_shape
        if s is None:
            return []
        b, length = 2 * self.cfg.pm.batch_size, self.cfg.pm.max_length  # chosen and rejected
        frozen_backbone = {"head": s.hidden, "last_block": s.layer_params() + s.hidden}.get(self.cfg.pm.trainable)
        return [trained("pm", "reward", s, self.setup, b, length, frozen_backbone or self.trainable(s, "seq_cls"), logits=0)]

    def ppo(self) -> list[Role]:
        from cai.rl import HEAD_CHUNK

        cfg, setup, actor, reward = self.cfg, self.setup, self.actor, self.reward
        if actor is None:
            return []
        length, mb = self.prompt + cfg.ppo.max_new_tokens, cfg.ppo.minibatch_size
        logits = min(mb * cfg.ppo.max_new_tokens, HEAD_CHUNK)  # the head runs on answer positions, a chunk at a time
        roles = [trained("ppo", "actor", actor, setup, mb, length, self.trainable(actor), logits=logits)]
        frozen_bytes = BYTES.get(cfg.ppo.frozen_dtype, 2)
        if setup.lora is None:  # with LoRA the ref is the actor with its adapter off
            roles.append(Role("ppo", "ref", weights=actor.params * frozen_bytes))
        if cfg.ppo.advantage == "gae" and cfg.ppo.value_model == "critic" and reward:
            roles.append(trained("ppo", "critic", reward, setup, mb, length, self.trainable(reward, "seq_cls"), logits=0))
        if reward:
            scoring = activations(reward, setup, cfg.pm.batch_size, cfg.pm.max_length, 0, train=False)
            roles.append(Role("ppo", "reward", weights=reward.params * frozen_bytes, activations=scoring))
        train_bytes = 2 if setup.zero and setup.bf16 else 4
        cache = setup.vllm_gib * GIB if setup.vllm_gib else kv_cache(actor, min(self.gen, cfg.ppo.rollouts), length, train_bytes)
        return [*roles, Role("ppo", "rollout", kv_cache=cache)]  # HF generates on the actor itself: only its cache

    def eval(self) -> list[Role]:
        if self.policy is None:
            return []
        [answer] = self.generating("eval", self.policy, "model", self.cfg.eval.max_new_tokens)
        # Snapshots answer first; then the judge compares and the PM scores: the larger of the two phases.
        by_pm = self.cfg.eval.judge == "pm"
        judge, score = self.pm_shape if by_pm else self.feedback, Role("eval", "reward")
        if judge:
            score.weights += judge.params * self.dtype_bytes("pm_model" if by_pm else "feedback_model")
        if self.reward:
            score.weights += self.reward.params * self.dtype_bytes("pm_model")
        return [answer if answer.total >= score.total else score]


def plan(cfg: DictConfig, stages: tuple[str, ...]) -> Plan:
    """Every role of every stage in `stages`, per device, for this config (no model is loaded)."""
    planner = Planner(cfg)
    roles = [role for stage in stages for role in getattr(planner, stage)()]
    return Plan(budget=planner.budget, device=planner.device, roles=roles, unknown=sorted(set(planner.unknown)))


# The single overrides tried, in order, when a plan does not fit: the first ones that fit are named.
def candidates(cfg: DictConfig, stage: str) -> list[str]:
    out = []
    if cfg.peft.kind != "lora":
        out.append("peft=lora")
    zero = int(cfg.strategy.zero_stage) if cfg.strategy.name == "deepspeed" else 0
    if device_count(cfg) > 1:
        out += [s for s, z in (("strategy=deepspeed_zero2", 2), ("strategy=deepspeed_zero3", 3)) if zero < z]
    if not (cfg.strategy.name == "deepspeed" and cfg.strategy.offload_parameters):
        out.append("strategy=deepspeed_zero3_offload")
    batch = {"sft": "sft.batch_size", "pm": "pm.batch_size", "ppo": "ppo.minibatch_size", "label": "label.batch_size"}.get(stage)
    batch = batch or "generation.batch_size"
    value, factor = OmegaConf.select(cfg, batch), 1
    while value and value > 1:
        value, factor = value // 2, factor * 2
        if stage in ("sft", "pm"):  # a smaller micro-batch, with gradient accumulation keeping the batch each update sees
            out.append(f"{batch}={value} {stage}.grad_accum={OmegaConf.select(cfg, f'{stage}.grad_accum') * factor}")
        else:
            out.append(f"{batch}={value}")
    return out


def with_override(cfg: DictConfig, override: str) -> DictConfig:
    """cfg with the `group=option` or `field=value` overrides of one candidate applied (space-separated;
    a strategy's or peft's option fields are read from conf/)."""
    import yaml

    import cai

    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for one in override.split():
        key, value = one.split("=", 1)
        if key in ("strategy", "peft"):
            fields = yaml.safe_load((cai.CONF / key / f"{value}.yaml").read_text())
            fields.pop("defaults", None)
            for k, v in fields.items():
                OmegaConf.update(new, f"{key}.{k}", v, force_add=True)
        else:
            OmegaConf.update(new, key, yaml.safe_load(value), force_add=True)
    return new


def check(cfg: DictConfig, stages: tuple[str, ...]) -> Plan:
    """Plan the stages, log the plan, and refuse one that cannot fit, naming the overrides that would."""
    p = plan(cfg, stages)
    if not p.roles:
        return p
    log.info("%s", p.table())
    if p.fits():
        return p
    stage, need = p.peak()
    fixes = []
    for override in candidates(cfg, stage):
        if override.startswith("peft=lora") and getattr(cfg.strategy, "zero_stage", 0) == 3:
            continue  # cai does not run LoRA under ZeRO-3 (lora.check)
        if plan(with_override(cfg, override), stages).fits():
            fixes.append(override)
    fix = (
        f"; it fits with {' or '.join(fixes[:3])}"
        if fixes
        else "; no single override makes it fit: more devices, a smaller model, or several of the overrides together"
    )
    message = (
        f"memory: stage {stage} needs {need / GIB:.1f} GiB per device and {p.device} gives {p.budget / GIB:.1f} GiB"
        f"{fix} (the plan is in the log; memory.check=false runs anyway)"
    )
    if cfg.memory.check:
        raise CaiError(message)
    log.warning("%s", message)
    return p
