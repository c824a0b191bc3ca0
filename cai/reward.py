"""The preference model: a transformer backbone with a scalar head on the last token.

Saved as `<dir>/backbone` (an HF checkpoint), `<dir>/head.safetensors` and the tokenizer, so PPO,
`stage=pm_eval` and users can load it with `PreferenceModel.load(dir)`. `score` rates transcripts;
`hh_accuracy` rates a PM on human comparisons (the pm and pm_eval stages both report it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cai.artifacts import file_hash, fingerprint
from cai.data import Message, read_hh_rlhf
from cai.errors import CaiError
from cai.metrics import pairwise_accuracy, wilson_interval
from cai.models import resolve_dtype, run_device
from cai.training import pad


class PreferenceModel(nn.Module):
    """r(transcript) = head(h_last): the hidden state of the last real token, mapped to a scalar."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> PreferenceModel:
        """A PM initialised from a causal LM: its decoder becomes the backbone, the LM head is dropped."""
        return cls(lm.get_decoder())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T), right-padded -> rewards (B,)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1)  # (B,)

    def save(self, path: str | Path, tokenizer, state: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        state = state if state is not None else self.state_dict()
        self.backbone.save_pretrained(
            path / "backbone", state_dict={k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        )
        save_file({k[len("head.") :]: v.contiguous() for k, v in state.items() if k.startswith("head.")}, str(path / "head.safetensors"))
        tokenizer.save_pretrained(path / "backbone")
        (path / "pm.json").write_text(json.dumps({"format": "cai-pm-1", "backbone": "backbone", "head": "head.safetensors"}))

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreferenceModel, object]:
        """(model, tokenizer) from a directory written by `save`, on the run's device.

        dtype None is the inference default (bf16 on a GPU that has it, else float32); a PM that
        will be trained further (PPO's critic starts from it) is loaded in float32.
        """
        from transformers import AutoModel, AutoTokenizer

        path = Path(path).expanduser()
        check_pm_dir(path)
        backbone = AutoModel.from_pretrained(path / "backbone", dtype=dtype or resolve_dtype("auto"))
        pm = cls(backbone)
        pm.head.load_state_dict(load_file(str(path / "head.safetensors")))
        pm.to(run_device())
        tok = AutoTokenizer.from_pretrained(path / "backbone")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return pm.eval(), tok


def check_pm_dir(path: str | Path, field: str = "pm.checkpoint") -> None:
    """A clear error unless `path` holds a whole preference model (pm.json, backbone/, head.safetensors)."""
    path = Path(path).expanduser()
    if not (path / "pm.json").exists():
        raise CaiError(
            f"{field}: '{path}' is not a preference-model directory (no pm.json); point it at artifacts/pm/latest/model, "
            "or run stage=pm_eval with the overrides the pm stage ran with"
        )
    for part in ("backbone/config.json", "head.safetensors"):
        if not (path / part).exists():
            raise CaiError(
                f"{field}: '{path}' is an incomplete preference model: {part} is missing; copy the whole directory or retrain it"
            )


def pm_identity(path: str | Path) -> str:
    """What makes a PM directory score what it scores: its head and backbone config (content hashes)."""
    path = Path(path).expanduser()
    return fingerprint({"head": file_hash(path / "head.safetensors"), "backbone": file_hash(path / "backbone" / "config.json")})


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


def hh_accuracy(
    pm: PreferenceModel, tokenizer, path: str, max_length: int, n: int = 0, batch_size: int = 16, field: str = "pm.eval_data"
) -> dict:
    """Accuracy of a PM on hh-rlhf comparisons (chosen scored above rejected), with a 95% interval."""
    comps = read_hh_rlhf(path, field=field)
    comps = comps[:n] if n else comps
    transcripts = [(c.conversation, c.chosen) for c in comps] + [(c.conversation, c.rejected) for c in comps]
    rewards = score(pm, tokenizer, transcripts, max_length, batch_size, desc=f"scoring {Path(path).name}")
    margins = [rewards[i] - rewards[len(comps) + i] for i in range(len(comps))]
    acc = pairwise_accuracy(margins)
    low, high = wilson_interval(acc, len(comps))
    return {
        "data": str(path),
        "comparisons": len(comps),
        "accuracy": acc,
        "interval_95": [low, high],
        "mean_margin": sum(margins) / len(margins),
    }


def pm_reward(pm: PreferenceModel, tokenizer, max_length: int, batch_size: int):
    """PPO's reward role: a frozen PM scoring (conversation, completion) pairs -> list of floats."""

    def reward_fn(conversations: Sequence[Sequence[Message]], completions: Sequence) -> list[float]:
        transcripts = [(c, a.text) for c, a in zip(conversations, completions)]
        return score(pm, tokenizer, transcripts, max_length, batch_size, desc="ppo scoring")

    return reward_fn
