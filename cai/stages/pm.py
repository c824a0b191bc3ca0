"""Stage `pm`: train the preference model on AI harmlessness labels mixed with helpfulness comparisons.

The PM is the `pm_model` backbone with a scalar head on the last token, trained with the
Bradley-Terry loss against the (soft) labels. Helpfulness comparisons come from a human
hh-rlhf-format file when `pm.helpful_data` is given, else from AI labels under a helpfulness
question (the `label` stage makes them). On held-out comparisons it reports
`pm/val/labeller_agreement` (how often the PM prefers the answer the labeller preferred: agreement
with AI labels, not accuracy) and `pm/val/ece` with a calibration plot, against the soft targets the
PM was trained on; and on `pm.eval_data` (human harmlessness comparisons), when given,
`pm/hh/accuracy` and `pm/hh/ece`, against the human choice.
"""

from __future__ import annotations

import logging
import random

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from cai.artifacts import write_json
from cai.config import instantiate
from cai.data import human_pairs, read_hh_rlhf, source_hash
from cai.errors import CaiError
from cai.lora import add_adapters, trained_state
from cai.losses import bradley_terry_loss
from cai.metrics import expected_calibration_error, pairwise_accuracy
from cai.plots import calibration_plot
from cai.reward import PreferenceModel, encode_transcript, hh_accuracy
from cai.stages import Context, Stage
from cai.training import (
    TRAINING_LINEAGE,
    TRAINING_LOGGING_ONLY,
    LengthBucketSampler,
    adamw_with_cosine,
    fit,
    pack_shared_prefix,
    packed_length,
    pad,
    trained_placement,
)

log = logging.getLogger(__name__)


# --- data ----------------------------------------------------------------------------------------


def comparisons(cfg: DictConfig, labels: list[dict]) -> list[dict]:
    """{conversation, response_a, response_b, label, source} rows: AI (or human) labels, plus helpfulness."""
    rows = [{**r, "source": f"ai-{r['kind']}" if r["label_type"] != "human" else "human-harmless"} for r in labels]
    if cfg.pm.helpful_data:
        human = read_hh_rlhf(cfg.pm.helpful_data, field="pm.helpful_data")
        n = cfg.pm.n_helpful or sum(r["kind"] == "red_team" for r in rows)
        rows += [{**r, "source": "human-helpful"} for r in human_pairs(human[:n], cfg.seed)]
        rows = [r for r in rows if r["source"] != "ai-helpful"]  # human helpfulness data replaces AI-labelled helpfulness
    return rows


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    return [
        {
            "a": encode_transcript(tokenizer, r["conversation"], r["response_a"], max_length),
            "b": encode_transcript(tokenizer, r["conversation"], r["response_b"], max_length),
            "p": float(r["label"]),
        }
        for r in rows
    ]


def collate_pairs(batch: list[dict], pad_id: int, share_prompt: bool) -> dict[str, torch.Tensor]:
    """share_prompt: one row per comparison, the prompt once and then each answer (`pack_shared_prefix`),
    (B, T); otherwise both answers of every comparison in one (2B, T) right-padded batch, a rows first.

    The two answers share the conversation's tokens (about half of a transcript in the quickstart),
    so one row costs that much less compute, for the same rewards up to rounding.
    """
    p = torch.tensor([b["p"] for b in batch])
    if share_prompt:
        return {**pack_shared_prefix([(b["a"], b["b"]) for b in batch], pad_id, pool_skip=pad_id), "p": p}
    ids, mask = pad([b["a"] for b in batch] + [b["b"] for b in batch], pad_id)  # (2B, T)
    return {"input_ids": ids, "attention_mask": mask, "p": p}


# --- model ---------------------------------------------------------------------------------------


TRAINABLE = ("all", "last_block", "head")


def freeze(pm: PreferenceModel, trainable: str) -> None:
    """pm.trainable: train everything, or only the last transformer block (and final norm) and the head, or the head.

    A frozen backbone needs no backward pass through it: `head` costs about one forward pass per
    step, a cheap PM on a CPU at some cost in accuracy (README, results).
    """
    if trainable == "all":
        return
    pm.backbone.requires_grad_(False)
    if trainable == "last_block":
        pm.backbone.layers[-1].requires_grad_(True)
        pm.backbone.norm.requires_grad_(True)


def validation_metrics(probs: list[float], targets: list[float]) -> dict[str, float]:
    """The PM against the labels it was trained to reproduce.

    probs: the PM's P(a preferred) = sigmoid(r_a - r_b); targets: the labels' P(a preferred), soft.
    ECE is measured against the soft targets themselves: a PM that reproduces clamped CoT labels
    exactly is calibrated (ECE 0), not 0.45 off as it would be against the labels rounded to 0/1.
    Agreement counts the comparisons the labeller decided (target != 0.5).
    """
    out = {"pm/val/ece": expected_calibration_error(probs, targets)} if probs else {}
    decided = [(q - 0.5) * (1 if t > 0.5 else -1) for q, t in zip(probs, targets) if t != 0.5]
    if decided:
        out["pm/val/labeller_agreement"] = pairwise_accuracy(decided)
    return out


class PMModule(L.LightningModule):
    """Bradley-Terry training of a PreferenceModel; validation collects calibration statistics."""

    def __init__(
        self, model_spec, lr: float, warmup_ratio: float, trainable: str = "all", pad_token_id: int | None = None, peft=None, seed: int = 0
    ) -> None:
        super().__init__()
        self.pad_token_id = pad_token_id  # the tokenizer's: transformers pools on the last token that is not it
        self.lr = lr
        self.warmup_ratio = warmup_ratio
        self.trainable = trainable
        # Loaded whole in __init__, not in configure_model: see SFTModule.
        self.pm = PreferenceModel.from_causal_lm(model_spec.load_model(train=True), pad_token_id)  # float32 masters
        self.pm.train()
        freeze(self.pm, trainable)
        # peft=lora: adapters on the backbone, the score head trained in full; PEFT's wrapper kept outside the module tree.
        self.lora = [add_adapters(self.pm.model, peft, "seq_cls", seed)] if peft is not None and peft.kind != "none" else []
        self.val_probs: list[float] = []
        self.val_targets: list[float] = []

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ends" in batch:  # packed: one row per comparison, its answers a then b
            r = self.pm.packed(batch).float().view(-1, 2)  # (B, 2)
            return r[:, 0], r[:, 1]
        r = self.pm(batch["input_ids"], batch["attention_mask"]).float()  # (2B,)
        n = batch["p"].shape[0]
        return r[:n], r[n:]  # (B,), (B,)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r_a, r_b = self.rewards(batch)
        loss = bradley_terry_loss(r_a, r_b, batch["p"])
        decided = batch["p"] != 0.5
        acc = ((r_a > r_b) == (batch["p"] > 0.5))[decided].float().mean() if decided.any() else torch.tensor(0.5)
        self.log("pm/train/loss", loss, prog_bar=True, batch_size=len(r_a))
        self.log("pm/train/accuracy", acc, prog_bar=True, batch_size=len(r_a))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_probs, self.val_targets = [], []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r_a, r_b = self.rewards(batch)
        self.log("pm/val/loss", bradley_terry_loss(r_a, r_b, batch["p"]), batch_size=len(r_a))
        self.val_probs += torch.sigmoid(r_a - r_b).tolist()
        self.val_targets += batch["p"].tolist()

    def on_validation_epoch_end(self) -> None:
        for name, value in validation_metrics(self.val_probs, self.val_targets).items():
            self.log(name, value)

    def configure_optimizers(self):
        return adamw_with_cosine(
            [p for p in self.pm.parameters() if p.requires_grad],
            self.lr,
            self.warmup_ratio,
            self.trainer,
            "pm",
        )


# --- the stage -----------------------------------------------------------------------------------


def loaders(cfg: DictConfig, tokenizer, rows: list[dict], share: bool) -> tuple[DataLoader, DataLoader | None, int, int]:
    """Length-bucketed train batches and plain validation batches of encoded comparisons (packed if `share`)."""
    data = encode(tokenizer, rows, cfg.pm.max_length)
    if len(data) < 2:
        raise CaiError(f"pm: only {len(data)} comparisons; label more pairs (data.n_red_team)")
    random.Random(cfg.seed).shuffle(data)
    n_val = max(1, round(cfg.pm.val_fraction * len(data))) if cfg.pm.val_fraction > 0 else 0
    val, train = data[:n_val], data[n_val:]
    pad_id = tokenizer.pad_token_id
    row = (lambda d: packed_length([d["a"], d["b"]])) if share else (lambda d: max(len(d["a"]), len(d["b"])))
    sampler = LengthBucketSampler([row(d) for d in train], cfg.pm.batch_size, cfg.seed)
    train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=lambda b: collate_pairs(b, pad_id, share))
    val_loader = DataLoader(val, batch_size=cfg.pm.batch_size, collate_fn=lambda b: collate_pairs(b, pad_id, share)) if val else None
    return train_loader, val_loader, len(train), len(val)


def report(ctx: Context, module: PMModule, tokenizer, metrics: dict) -> None:
    """The calibration plot on validation, and accuracy on human comparisons when pm.eval_data is set."""
    cfg, out = ctx.cfg, ctx.out
    if module.val_probs:  # against the soft targets, as pm/val/ece
        calibration_plot(module.val_probs, module.val_targets, out.path / "calibration.png")
        ctx.tracker.image("pm/val/calibration", out.path / "calibration.png")
    if cfg.pm.eval_data:
        module.pm.cpu().eval()
        hh = hh_accuracy(
            module.pm, tokenizer, cfg.pm.eval_data, cfg.pm.max_length, cfg.pm.n_eval, cfg.pm.batch_size, share_prompt=cfg.pm.share_prompt
        )
        metrics["pm/hh/accuracy"], metrics["pm/hh/ece"] = hh["accuracy"], hh["ece"]
        metrics["pm/hh/accuracy_low"], metrics["pm/hh/accuracy_high"] = hh["interval_95"]
        ctx.tracker.log({k: metrics[k] for k in ("pm/hh/accuracy", "pm/hh/accuracy_low", "pm/hh/accuracy_high", "pm/hh/ece")})
        calibration_plot(*hh["calibration"], out.path / "calibration_hh.png")  # against the human choice
        ctx.tracker.image("pm/hh/calibration", out.path / "calibration_hh.png")
        log.info("pm/hh/accuracy %.3f (95%% interval %.3f-%.3f) on %d comparisons", hh["accuracy"], *hh["interval_95"], hh["comparisons"])


def build(ctx: Context) -> dict | None:
    cfg, out = ctx.cfg, ctx.out
    spec = instantiate(cfg.pm_model)
    tokenizer = spec.load_tokenizer()
    rows = comparisons(cfg, ctx.upstream["label"].rows())
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PMModule(spec, cfg.pm.lr, cfg.pm.warmup_ratio, cfg.pm.trainable, tokenizer.pad_token_id, cfg.peft, cfg.seed)
    problem = module.pm.packing_problem() if cfg.pm.share_prompt else None
    if problem is not None:
        log.warning("pm.share_prompt: %s; each answer's transcript runs whole", problem)
    train_loader, val_loader, n_train, n_val = loaders(cfg, tokenizer, rows, cfg.pm.share_prompt and problem is None)
    trainer, seconds = fit(
        module,
        train_loader,
        val_loader,
        cfg,
        out.path,
        stage="pm",
        epochs=cfg.pm.epochs,
        grad_accum=cfg.pm.grad_accum,
        checkpoint_every=cfg.pm.checkpoint_every,
        strategy=instantiate(cfg.strategy),
        logger=ctx.tracker.lightning_logger(),
    )
    lora = module.lora[0] if module.lora else None
    # The adapters merged in (a PM plain transformers loads), or the full weights gathered: every rank calls it.
    state = {f"model.{k}": v for k, v in trained_state(module.pm.model, lora, trainer.strategy, spec.torch_dtype).items()}
    if not trainer.is_global_zero:
        return None
    ctx.extra["models"] = {"pm": trained_placement(trainer, module.pm)}
    module.pm.save(out.path / "model", tokenizer, state)
    if lora is not None:
        lora.save_pretrained(out.path / "adapter")  # the adapter and the score head, as peft loads them
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pm/")}
    report(ctx, module, tokenizer, metrics)
    write_json(out.path / "metrics.json", {**metrics, "train_comparisons": n_train, "val_comparisons": n_val, "seconds": round(seconds, 1)})
    return {
        "train_comparisons": n_train,
        "val_comparisons": n_val,
        "sources": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})},
        "val_labeller_agreement": round(metrics.get("pm/val/labeller_agreement", float("nan")), 4),
        "val_ece": round(metrics.get("pm/val/ece", float("nan")), 4),
        "hh_accuracy": round(metrics["pm/hh/accuracy"], 4) if "pm/hh/accuracy" in metrics else None,
        "hh_ece": round(metrics["pm/hh/ece"], 4) if "pm/hh/ece" in metrics else None,
        "optimizer_steps": trainer.global_step,
        "seconds": round(seconds, 1),
    }


def metric(counts: dict) -> str:
    hh = f", human accuracy {counts['hh_accuracy']:.3f}, ECE {counts['hh_ece']}" if counts.get("hh_accuracy") is not None else ""
    return f"agrees with labeller {counts['val_labeller_agreement']}, ECE vs labels {counts['val_ece']}{hh}"


def check(cfg: DictConfig) -> None:
    if cfg.pm.trainable not in TRAINABLE:
        raise CaiError(f"pm.trainable: choose {', '.join(TRAINABLE)}, got '{cfg.pm.trainable}'")
    if cfg.peft.kind != "none" and cfg.pm.trainable != "all":
        raise CaiError(f"pm.trainable={cfg.pm.trainable} with peft={cfg.peft.kind}: LoRA chooses what trains; use pm.trainable=all")


STAGE = Stage(
    name="pm",
    writes="`model/`: the preference model (`AutoModelForSequenceClassification`, one label; RewardBench's format), `adapter/` under `peft=lora`, `calibration.png`, `calibration_hh.png` with `pm.eval_data`",
    description="the preference model",
    build=build,
    after="label",
    lineage=("pm_model", "pm", *TRAINING_LINEAGE),
    logging_only=("pm.checkpoint_every", "pm.eval_data", "pm.n_eval", "pm.checkpoint", *TRAINING_LOGGING_ONLY),
    reads=("label",),
    inputs=lambda cfg: {"helpful_data": source_hash(cfg.pm.helpful_data, "pm.helpful_data")} if cfg.pm.helpful_data else {},
    check=check,
    metric=metric,
    output="model",
    artifact=("preference_model", "model", "model"),
)
