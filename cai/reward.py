"""The preference model: a transformer with a scalar score on the last token, in the standard format.

A PM is a `*ForSequenceClassification` with `num_labels=1` and the pad token set: the reward-model
format of TRL and RewardBench. `stage=pm` saves it with `save_pretrained`, so
`AutoModelForSequenceClassification.from_pretrained(dir)` loads it with one line of transformers
and gives the same scores. Pooling is transformers' own: the last token that is not the pad token.
`PreferenceModel.load(dir)` also reads the older cai format (`pm.json`, `backbone/`,
`head.safetensors`), with a deprecation warning. `score` rates transcripts; `hh_accuracy` rates a
PM on human comparisons (the pm and pm_eval stages both report it).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from cai.artifacts import file_hash, fingerprint
from cai.data import Message, read_hh_rlhf
from cai.errors import CaiError
from cai.metrics import expected_calibration_error, pairwise_accuracy, wilson_interval
from cai.models import packed_attention_mask, packing_problem, resolve_dtype, run_device
from cai.training import pack_shared_prefix, pad

log = logging.getLogger(__name__)
OLD_FORMAT = "pm.json"  # cai's first PM format: backbone/ + head.safetensors (a head with a bias)


class PreferenceModel(nn.Module):
    """r(transcript) = score(h_last): a `*ForSequenceClassification` model with one label, and its scalar output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def backbone(self) -> nn.Module:
        """The transformer without the score head (what PPO's critic starts from)."""
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def head(self) -> nn.Linear:
        """The score head: hidden size -> 1, no bias (a constant cancels in every comparison)."""
        return self.model.score

    @classmethod
    def from_causal_lm(cls, lm: nn.Module, pad_token_id: int | None = None) -> PreferenceModel:
        """A PM initialised from a causal LM: its decoder becomes the backbone, the LM head is dropped."""
        model = one_label_classifier(lm.get_decoder(), pad_token_id)
        nn.init.normal_(model.score.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
        return cls(model.to(next(lm.parameters()).device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T), right-padded with the pad token -> rewards (B,)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)  # (B,)

    def packing_problem(self) -> str | None:
        """Why this PM cannot score packed rows (None if it can): it must be a decoder's classifier
        (a `score` head on causal attention; BERT-like encoders have a `classifier`), and its
        attention must take the mask (`packing_problem` of cai.models)."""
        if not hasattr(self.model, "score"):
            return f"{type(self.model).__name__} is not a decoder's sequence classifier"
        return packing_problem(self.model)

    def packed(self, batch: dict[str, torch.Tensor], field: str = "pm.share_prompt") -> torch.Tensor:
        """Rewards (N,) of the N sequences packed by `pack_shared_prefix(..., pool_skip=pad id)`, in order.

        The score head is linear, so scoring the hidden state at each sequence's last non-pad token
        is what `forward` does on the sequence alone (transformers pools the last non-pad token).
        """
        mask = packed_attention_mask(self.model, batch["attention_mask"], field)  # (G, 1, T, T)
        hidden = self.backbone(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
        ).last_hidden_state  # (G, T, H)
        return self.head(hidden[batch["row"], batch["ends"]]).squeeze(-1)  # (N, H) -> (N,)

    def save(self, path: str | Path, tokenizer, state: dict[str, torch.Tensor] | None = None) -> None:
        """An HF checkpoint of the whole PM (config, weights, tokenizer); `state` is this module's state dict."""
        state = state if state is not None else self.state_dict()
        self.model.save_pretrained(path, state_dict={k[len("model.") :]: v for k, v in state.items()})
        tokenizer.save_pretrained(path)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreferenceModel, object]:
        """(model, tokenizer) from a directory written by `save` (or the old format), on the run's device.

        dtype None is the inference default (bf16 on a GPU that has it, else float32); a PM that
        will be trained further (PPO's critic starts from it) is loaded in float32.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path).expanduser()
        check_pm_dir(path)
        dtype = dtype or resolve_dtype("auto")
        if (path / OLD_FORMAT).exists():
            pm, where = cls._load_old(path, dtype), path / "backbone"
        else:
            pm, where = cls(AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)), path
        tok = AutoTokenizer.from_pretrained(where)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return pm.to(run_device()).eval(), tok

    @classmethod
    def _load_old(cls, path: Path, dtype: torch.dtype) -> PreferenceModel:
        from transformers import AutoModel

        log.warning(
            "%s: this PM is in cai's old format (pm.json, backbone/, head.safetensors), which will stop being read; "
            "`python train.py stage=pm` now writes a standard AutoModelForSequenceClassification checkpoint",
            path,
        )
        model = one_label_classifier(AutoModel.from_pretrained(path / "backbone", dtype=dtype))
        model.score.weight.data.copy_(load_file(str(path / "head.safetensors"))["weight"])  # its bias shifted every score alike
        return cls(model)


def one_label_classifier(backbone: nn.Module, pad_token_id: int | None = None) -> nn.Module:
    """`*ForSequenceClassification` (num_labels=1) around a backbone's weights; its score head is new.

    The pad token must be set: transformers pools on the last token that is not the pad token.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels, config.architectures = 1, None
    config.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=next(backbone.parameters()).dtype)
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    return model


def check_pm_dir(path: str | Path, field: str = "pm.checkpoint") -> None:
    """A clear error unless `path` holds a whole preference model: a one-label sequence classifier (or the old format)."""
    path = Path(path).expanduser()
    if (path / OLD_FORMAT).exists():
        for part in ("backbone/config.json", "head.safetensors"):
            if not (path / part).exists():
                raise CaiError(
                    f"{field}: '{path}' is an incomplete preference model: {part} is missing; copy the whole directory or retrain it"
                )
        return
    config = path / "config.json"
    if not config.exists():
        raise CaiError(
            f"{field}: '{path}' is not a preference-model directory (no config.json); point it at artifacts/pm/latest/model, "
            "or run stage=pm_eval with the overrides the pm stage ran with"
        )
    data = json.loads(config.read_text())
    if not any(a.endswith("ForSequenceClassification") for a in data.get("architectures") or []) or len(data.get("id2label", {})) != 1:
        raise CaiError(
            f"{field}: '{path}' is not a preference model: its config.json is not a *ForSequenceClassification with num_labels=1"
        )
    if not list(path.glob("*.safetensors")):
        raise CaiError(
            f"{field}: '{path}' is an incomplete preference model: no *.safetensors weights; copy the whole directory or retrain it"
        )


def resolve_pm_dir(name: str, field: str) -> Path:
    """A reward model named by a directory or a hub id, as a checked local directory.

    A hub id is read from the local Hugging Face cache (downloaded first where the hub can be
    reached): any `AutoModelForSequenceClassification` with one label, the format of RewardBench
    and TRL, in which cai saves its own PMs.
    """
    path = Path(name).expanduser()
    if not path.is_dir() and name in _HUB_SNAPSHOTS:  # a hub id is looked up once per process (PPO's check, key, build; eval)
        path = _HUB_SNAPSHOTS[name]
    elif not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(name, local_files_only=True))
            except Exception:  # not cached: the hub, unless offline
                path = Path(snapshot_download(name))
        except Exception as err:
            raise CaiError(
                f"{field}: '{name}' is neither a directory nor a hub model this machine has or can download "
                f"({type(err).__name__}); give a directory holding an AutoModelForSequenceClassification with one label"
            ) from None
        _HUB_SNAPSHOTS[name] = path
    check_pm_dir(path, field=field)
    return path


_HUB_SNAPSHOTS: dict[str, Path] = {}  # hub id -> its snapshot directory in the local HF cache


def pm_identity(path: str | Path) -> str:
    """What makes a PM directory score what it scores: the content of its config and weights."""
    path = Path(path).expanduser()
    if (path / OLD_FORMAT).exists():
        return fingerprint({"head": file_hash(path / "head.safetensors"), "backbone": file_hash(path / "backbone" / "config.json")})
    return fingerprint({p.name: file_hash(p) for p in sorted([path / "config.json", *path.glob("*.safetensors")])})


def encode_transcript(tokenizer, conversation: Sequence[Message], response: str, max_length: int) -> list[int]:
    """Chat-template ids of the conversation plus the answer; long ones keep their end (the answer)."""
    text = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": response}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


@torch.no_grad()
def score(
    pm: PreferenceModel,
    tokenizer,
    transcripts: Sequence[tuple[Sequence[Message], str]],
    max_length: int,
    batch_size: int = 16,
    desc: str = "scoring",
) -> list[float]:
    """Rewards of (conversation, answer) transcripts, batched by length."""
    encoded = [encode_transcript(tokenizer, c, r, max_length) for c, r in transcripts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(pm.parameters()).device
    out = [0.0] * len(encoded)
    was_training = pm.training
    pm.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        ids, mask = pad([encoded[i] for i in idx], tokenizer.pad_token_id)  # (B, T), right-padded
        rewards = pm(ids.to(device), mask.to(device)).float().cpu()
        for i, r in zip(idx, rewards.tolist()):
            out[i] = r
    pm.train(was_training)
    return out


@torch.no_grad()
def score_groups(
    pm: PreferenceModel,
    tokenizer,
    transcripts: Sequence[tuple[Sequence[Message], str]],
    group: int,
    max_length: int,
    batch_size: int = 16,
    desc: str = "scoring",
    field: str = "ppo.share_prompt",
) -> list[float]:
    """`score` for transcripts in consecutive groups of `group` answers to one conversation (PPO's
    samples_per_prompt, a comparison's two answers), each group packed (`pack_shared_prefix`): its
    conversation computed once. A PM that cannot pack scores each transcript whole, with a warning
    naming `field`, the setting that asked for packing."""
    problem = pm.packing_problem()
    if problem is not None:
        if (field, problem) not in _WARNED:
            _WARNED.add((field, problem))
            log.warning("%s: %s; its transcripts are scored whole", field, problem)
        return score(pm, tokenizer, transcripts, max_length, batch_size, desc)
    encoded = [encode_transcript(tokenizer, c, r, max_length) for c, r in transcripts]
    groups = [range(i, min(i + group, len(encoded))) for i in range(0, len(encoded), group)]  # transcript indices
    groups.sort(key=lambda g: sum(len(encoded[i]) for i in g))
    device, per_batch, pad_id = next(pm.parameters()).device, max(1, batch_size // group), tokenizer.pad_token_id
    out = [0.0] * len(encoded)
    was_training = pm.training
    pm.eval()
    for start in tqdm(range(0, len(groups), per_batch), desc=desc, unit="batch", leave=False):
        chosen = groups[start : start + per_batch]
        packed = pack_shared_prefix([[encoded[i] for i in g] for g in chosen], pad_id, pool_skip=pad_id)
        rewards = pm.packed({k: v.to(device) for k, v in packed.items()}, field).float().cpu()  # (N,), the groups' transcripts in order
        for i, r in zip([i for g in chosen for i in g], rewards.tolist()):
            out[i] = r
    pm.train(was_training)
    return out


_WARNED: set[tuple[str, str]] = set()  # (setting, why) already warned about in this process


def hh_accuracy(
    pm: PreferenceModel,
    tokenizer,
    path: str,
    max_length: int,
    n: int = 0,
    batch_size: int = 16,
    field: str = "pm.eval_data",
    share_prompt: bool = True,
) -> dict:
    """Accuracy of a PM on hh-rlhf comparisons (chosen scored above rejected), with a 95% interval, and
    its calibration against the human choice: each comparison counted in both orders, P(chosen) =
    sigmoid(margin) with outcome 1 and its complement with outcome 0 (one order alone would put every
    outcome at 1). share_prompt (`pm.share_prompt`): both answers of a comparison in one packed row."""
    comps = read_hh_rlhf(path, field=field)
    comps = comps[:n] if n else comps
    transcripts = [(c.conversation, answer) for c in comps for answer in (c.chosen, c.rejected)]  # chosen at 2i, rejected at 2i + 1
    desc = f"scoring {Path(path).name}"
    if share_prompt:
        rewards = score_groups(pm, tokenizer, transcripts, 2, max_length, batch_size, desc, "pm.share_prompt")
    else:
        rewards = score(pm, tokenizer, transcripts, max_length, batch_size, desc)
    margins = [rewards[2 * i] - rewards[2 * i + 1] for i in range(len(comps))]
    acc = pairwise_accuracy(margins)
    low, high = wilson_interval(acc, len(comps))
    p_chosen = [1 / (1 + math.exp(-m)) for m in margins]
    probs, outcomes = p_chosen + [1 - p for p in p_chosen], [1.0] * len(margins) + [0.0] * len(margins)
    return {
        "data": str(path),
        "comparisons": len(comps),
        "accuracy": acc,
        "interval_95": [low, high],
        "mean_margin": sum(margins) / len(margins),
        "ece": expected_calibration_error(probs, outcomes),
        "calibration": (probs, outcomes),
    }


def pm_reward(pm: PreferenceModel, tokenizer, max_length: int, batch_size: int, group: int = 1):
    """PPO's reward role: a frozen PM scoring (conversation, completion) pairs -> list of floats.

    group > 1: the answers come in consecutive groups of that many to one conversation, scored packed
    (a shorter last group too).
    """

    def reward_fn(conversations: Sequence[Sequence[Message]], completions: Sequence) -> list[float]:
        transcripts = [(c, a.text) for c, a in zip(conversations, completions)]
        if group > 1:
            return score_groups(pm, tokenizer, transcripts, group, max_length, batch_size, "ppo scoring")
        return score(pm, tokenizer, transcripts, max_length, batch_size, desc="ppo scoring")

    return reward_fn
