"""Stage `sft`: fine-tune the initial model on (prompt -> revision k) plus the helpful answers.

The loss falls on the assistant's tokens only: prompt tokens carry label -100. Batches group
sequences of similar length (length bucketing) so little compute goes to padding. The optimizer is
AdamW with linear warmup and a cosine decay; gradient accumulation, bf16 where the hardware has it,
and any `strategy=` come from Lightning. A Lightning checkpoint is written every
`sft.checkpoint_every` optimizer steps, and an interrupted run resumes from the last one. The
result is an HF safetensors checkpoint under `${paths.artifacts}/sft/<lineage key>/model` (`sft/latest/model`);
with `peft=lora` only LoRA adapters train, `model/` holds them merged and `adapter/` the adapter alone.
"""

from __future__ import annotations

import logging
import random
import time

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from cai.artifacts import write_jsonl
from cai.config import instantiate
from cai.errors import CaiError
from cai.generation import LoadableModel
from cai.lora import add_adapters, trained_state
from cai.stages import Context, Stage
from cai.training import (
    TRAINING_LINEAGE,
    TRAINING_LOGGING_ONLY,
    LengthBucketSampler,
    adamw_with_cosine,
    fit,
    pad,
    trained_placement,
)

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss


# --- data ----------------------------------------------------------------------------------------


def check(cfg: DictConfig) -> None:
    r = cfg.sft.revision
    if not (r == "all" or (isinstance(r, int) and not isinstance(r, bool) and (r == -1 or r >= 1))):
        raise CaiError(f"sft.revision: give a round k >= 1, -1 for the last round, or all for every round; got {r!r}")


def select_pairs(rows: list[dict], revision: int | str) -> list[tuple[str, str]]:
    """(prompt, target) pairs: each red-team prompt with the answer kept after round k (-1 = the last;
    "all": after every round, one pair each), each helpful prompt with its answer.

    The answer kept after a round is that round's revision, or, when the revision came out empty,
    the answer kept before it: what the critique -> revision loop itself carried on from.
    """
    red = sorted((r for r in rows if r["kind"] == "red_team"), key=lambda r: (r["id"], r["round"]))
    last = max((r["round"] for r in red), default=0)
    k = last if revision in (-1, "all") else revision
    if red and not 1 <= k <= last:
        raise CaiError(f"sft.revision: the SL data has rounds 1..{last}; got {revision} (use -1 for the last round, or all)")
    pairs: list[tuple[str, str]] = []
    kept: dict[str, str] = {}
    for r in red:
        kept_before = kept.get(r["id"], r["response"])
        kept[r["id"]] = r["revision"] if (r["revision"] or "").strip() else kept_before
        if revision == "all" and (r["round"] == 1 or kept[r["id"]] != kept_before):  # each kept answer once
            pairs.append((r["prompt"], kept[r["id"]]))
        elif revision != "all" and r["round"] == k:
            pairs.append((r["prompt"], kept[r["id"]]))
    pairs += [(r["prompt"], r["response"]) for r in rows if r["kind"] == "helpful"]
    return [(p, t) for p, t in pairs if t and t.strip()]


def build_example(tokenizer, prompt: str, target: str, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels of one chat example; labels are -100 on every prompt token.

    input_ids = chat(prompt, generation prompt) + target + eos
    labels    = [-100] * len(prompt part)      + target + eos
    Too-long targets are cut at max_length; a prompt that alone fills max_length is dropped (None).
    """
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


class Examples(Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: pad tokens are masked out and carry no loss."""
    ids, mask = pad([b["input_ids"] for b in batch], pad_id)  # (B, T)
    labels, _ = pad([b["labels"] for b in batch], IGNORE)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- model ---------------------------------------------------------------------------------------


class SFTModule(L.LightningModule):
    """Causal-LM fine-tuning with the loss on assistant tokens only."""

    def __init__(self, model_spec, lr: float, warmup_ratio: float, peft: DictConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        # Loaded here, whole, not in configure_model: there Lightning's device context and ZeRO-3's
        # zero.Init are active, and from_pretrained (which transformers does not tell about
        # Lightning's DeepSpeed config) fills partitioned, empty parameters. DeepSpeed shards the
        # loaded model at setup instead (seen on an H200: zero.Init broke the load).
        self.model = model_spec.load_model(train=True) if isinstance(model_spec, LoadableModel) else model_spec  # float32 masters
        # peft=lora: the model is frozen and adapters train; PEFT's wrapper is kept outside the module
        # tree (its parameters are the model's), for saving and merging.
        self.lora = [add_adapters(self.model, peft, "causal", seed)] if peft is not None and peft.kind != "none" else []
        self.model.train()
        self.lr = lr
        self.warmup_ratio = warmup_ratio
        self._tokens = 0
        self._t0 = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # HF shifts labels by one and averages cross-entropy over tokens whose label is not -100.
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        loss = self(batch)
        self._tokens += int(batch["attention_mask"].sum())
        self.log("sft/train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        elapsed = time.perf_counter() - self._t0
        if elapsed > 0 and batch_idx > 0:
            self.log("sft/train/tokens_per_s", self._tokens / elapsed, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("sft/val/loss", self(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        trained = [p for p in self.model.parameters() if p.requires_grad]  # all of them, or the adapters
        return adamw_with_cosine(trained, self.lr, self.warmup_ratio, self.trainer, "sft")


# --- the stage -----------------------------------------------------------------------------------


def split_examples(cfg: DictConfig, sl_data, tokenizer) -> tuple[list[dict], list[dict]]:
    """(validation, train) examples from the SL data, shuffled by the seed; one clear line if too few."""
    pairs = select_pairs(sl_data.rows(), cfg.sft.revision)
    examples = []
    for prompt, target in pairs:
        if (e := build_example(tokenizer, prompt, target, cfg.sft.max_length)) is not None:
            examples.append({**e, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]})
    if len(examples) < 2:
        raise CaiError(f"sft: only {len(examples)} usable examples in {sl_data.path}; generate more SL data (data.n_red_team)")
    random.Random(cfg.seed).shuffle(examples)
    n_val = max(1, int(round(cfg.sft.val_fraction * len(examples)))) if cfg.sft.val_fraction > 0 else 0
    return examples[:n_val], examples[n_val:]


def build(ctx: Context) -> dict | None:
    cfg, out = ctx.cfg, ctx.out
    spec = instantiate(cfg.model)
    tokenizer = spec.load_tokenizer()
    val, train = split_examples(cfg, ctx.upstream["sl_data"], tokenizer)

    def loader(data: list[dict], shuffle: bool) -> DataLoader:
        lengths = [len(e["input_ids"]) for e in data]
        batching = (
            {"batch_sampler": LengthBucketSampler(lengths, cfg.sft.batch_size, cfg.seed)} if shuffle else {"batch_size": cfg.sft.batch_size}
        )
        return DataLoader(Examples(data), collate_fn=lambda b: collate(b, tokenizer.pad_token_id), **batching)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = SFTModule(spec, cfg.sft.lr, cfg.sft.warmup_ratio, cfg.peft, cfg.seed)
    trainer, seconds = fit(
        module,
        loader(train, True),
        loader(val, False) if val else None,
        cfg,
        out.path,
        stage="sft",
        epochs=cfg.sft.epochs,
        grad_accum=cfg.sft.grad_accum,
        checkpoint_every=cfg.sft.checkpoint_every,
        strategy=instantiate(cfg.strategy),
        logger=ctx.tracker.lightning_logger(),
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    lora = module.lora[0] if module.lora else None
    state = trained_state(module.model, lora, trainer.strategy, spec.torch_dtype)  # merged (LoRA), or gathered: every rank calls it
    if not trainer.is_global_zero:
        return None
    ctx.extra["models"] = {"policy": trained_placement(trainer, module.model)}
    module.model.save_pretrained(out.path / "model", state_dict=state)
    tokenizer.save_pretrained(out.path / "model")
    if lora is not None:
        lora.save_pretrained(out.path / "adapter")  # the adapter alone, as peft loads it
    (out.path / "data").mkdir(exist_ok=True)
    for split, data in (("train", train), ("val", val)):  # what it trained on, as chat rows (TRL's SFT format)
        write_jsonl(out.path / "data" / f"{split}.jsonl", [{"messages": e["messages"]} for e in data])
    train_tokens = sum(len(e["input_ids"]) for e in train) * cfg.sft.epochs
    return {
        "train_examples": len(train),
        "val_examples": len(val),
        "train_tokens": train_tokens,
        "train_loss": round(metrics.get("sft/train/loss", float("nan")), 4),
        "val_loss": round(metrics.get("sft/val/loss", float("nan")), 4),
        "optimizer_steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "train_tokens_per_s": round(train_tokens / seconds, 1),
    }


STAGE = Stage(
    name="sft",
    writes="`model/`: the fine-tuned policy (plain transformers; LoRA merged in), `adapter/` under `peft=lora` (peft), "
    "`data/train.jsonl`, `data/val.jsonl`: the examples it trained on as chat `messages` rows (TRL's SFT format)",
    description="SL-CAI supervised fine-tuning",
    build=build,
    after="sl_data",
    lineage=("sft", *TRAINING_LINEAGE),
    logging_only=("sft.checkpoint_every", *TRAINING_LOGGING_ONLY),
    reads=("sl_data",),
    check=check,
    metric=lambda c: f"val loss {c['val_loss']}, {c['train_tokens_per_s']:.0f} train tok/s",
    output="model",
    artifact=("sft_model", "model", "model"),
)
