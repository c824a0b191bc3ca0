"""Stage `pm`: train the preference model on AI harmlessness labels mixed with helpfulness comparisons.

The PM is the `pm_model` backbone with a scalar head on the last token, trained with the
Bradley-Terry loss against the (soft) labels. Helpfulness comparisons come from a human
hh-rlhf-format file when `pm.helpful_data` is given, else from AI labels under a helpfulness
question (the `label` stage makes them). Reports `pm/val/accuracy`, `pm/val/ece` with a calibration
plot, and `pm/hh/accuracy` on `pm.eval_data` (human harmlessness comparisons) when given.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cai.artifacts import StageDir, file_hash, require_complete, stage_path, stage_rows, write_json
from cai.data import read_hh_rlhf
from cai.errors import CaiError
from cai.losses import bradley_terry_loss
from cai.metrics import calibration_bins, expected_calibration_error, pairwise_accuracy, wilson_interval
from cai.pipeline import instantiate
from cai.reward import PreferenceModel, encode_transcript, right_pad, score
from cai.stages.sft import LengthBucketSampler
from cai.tracking import Tracker
from cai.training import adamw_with_cosine, drop_checkpoints, fit, gathered_state_dict

log = logging.getLogger(__name__)
STAGE = "pm"


# --- data ----------------------------------------------------------------------------------------


def comparisons(cfg: DictConfig) -> list[dict]:
    """{conversation, response_a, response_b, p_a, source} rows: AI (or human) labels, plus helpfulness."""
    rows = [
        {**r, "source": f"ai-{r['kind']}" if r["label_type"] != "human" else "human-harmless"} for r in stage_rows(stage_path(cfg, "label"))
    ]
    if cfg.pm.helpful_data:
        human = read_hh_rlhf(cfg.pm.helpful_data, field="pm.helpful_data")
        n = cfg.pm.n_helpful or sum(r["kind"] == "red_team" for r in rows)
        rng = random.Random(cfg.seed)
        for c in human[:n]:
            flip = rng.random() < 0.5
            a, b = (c.rejected, c.chosen) if flip else (c.chosen, c.rejected)
            rows.append(
                {"conversation": c.conversation, "response_a": a, "response_b": b, "label": 0.0 if flip else 1.0, "source": "human-helpful"}
            )
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


def collate_pairs(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Both answers of every comparison in one (2B, T) right-padded batch: a rows first, then b rows."""
    ids, mask = right_pad([b["a"] for b in batch] + [b["b"] for b in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "p": torch.tensor([b["p"] for b in batch])}


# --- model ---------------------------------------------------------------------------------------


class PMModule(L.LightningModule):
    """Bradley-Terry training of a PreferenceModel; validation collects calibration statistics."""

    def __init__(self, model_spec, lr: float, warmup_ratio: float) -> None:
        super().__init__()
        self.model_spec = model_spec
        self.lr = lr
        self.warmup_ratio = warmup_ratio
        self.pm: PreferenceModel | None = None
        self.val_probs: list[float] = []
        self.val_targets: list[float] = []

    def configure_model(self) -> None:
        if self.pm is None:
            self.pm = PreferenceModel.from_causal_lm(self.model_spec.load_model())
            self.pm.train()

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
        decided = [(q, float(t > 0.5)) for q, t in zip(self.val_probs, self.val_targets) if t != 0.5]
        if not decided:
            return
        probs, outcomes = zip(*decided)
        self.log("pm/val/accuracy", pairwise_accuracy([(q - 0.5) * (1 if o else -1) for q, o in decided]))
        self.log("pm/val/ece", expected_calibration_error(probs, outcomes))

    def configure_optimizers(self):
        return adamw_with_cosine(self.pm.parameters(), self.lr, self.warmup_ratio, int(self.trainer.estimated_stepping_batches))


def calibration_plot(probs: list[float], outcomes: list[float], path: Path) -> None:
    """A reliability diagram: observed frequency against predicted probability, 10 bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in calibration_bins(probs, outcomes) if b[2]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", label="preference model")
    for conf, freq, count in bins:
        ax.annotate(str(count), (conf, freq), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="predicted P(a preferred)", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title="PM calibration (validation)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_hh(
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


# --- the stage -----------------------------------------------------------------------------------


def run(cfg: DictConfig, tracker: Tracker) -> dict:
    upstream = require_complete(cfg, "label", STAGE)
    spec = instantiate(cfg.pm_model)
    inputs = {"label": upstream["fingerprint"]}
    if cfg.pm.helpful_data:
        inputs["helpful_data"] = file_hash(cfg.pm.helpful_data)
    if cfg.pm.eval_data:
        inputs["eval_data"] = file_hash(cfg.pm.eval_data)
    config = {
        "pm": {k: v for k, v in OmegaConf.to_container(cfg.pm).items() if k != "checkpoint"},
        "pm_model": spec.identity(),
        "seed": cfg.seed,
    }
    out = StageDir(cfg, STAGE, config, inputs)
    if out.is_complete():
        log.info("pm: up to date at %s, skipping", out.path)
        return {"metric": f"val accuracy {out.manifest()['counts'].get('val_accuracy')} (cached)", "path": str(out.path / "model")}
    out.open()

    tokenizer = spec.load_tokenizer()
    rows = comparisons(cfg)
    data = encode(tokenizer, rows, cfg.pm.max_length)
    if len(data) < 2:
        raise CaiError(f"pm: only {len(data)} comparisons; label more pairs (data.n_red_team)")
    random.Random(cfg.seed).shuffle(data)
    n_val = max(1, round(cfg.pm.val_fraction * len(data))) if cfg.pm.val_fraction > 0 else 0
    val, train = data[:n_val], data[n_val:]
    pad = tokenizer.pad_token_id
    lengths = [max(len(d["a"]), len(d["b"])) for d in train]
    train_loader = DataLoader(
        train, batch_sampler=LengthBucketSampler(lengths, cfg.pm.batch_size, cfg.seed), collate_fn=lambda b: collate_pairs(b, pad)
    )
    val_loader = DataLoader(val, batch_size=cfg.pm.batch_size, collate_fn=lambda b: collate_pairs(b, pad)) if val else None

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PMModule(spec, cfg.pm.lr, cfg.pm.warmup_ratio)
    trainer, seconds = fit(
        module,
        train_loader,
        val_loader,
        cfg,
        out.path,
        epochs=cfg.pm.epochs,
        grad_accum=cfg.pm.grad_accum,
        checkpoint_every=cfg.pm.checkpoint_every,
        strategy=instantiate(cfg.strategy),
        logger=tracker.lightning_logger(),
    )
    state = gathered_state_dict(module.pm, trainer.strategy)
    if not trainer.is_global_zero:
        return {"metric": "", "path": str(out.path / "model")}
    model_dir = out.path / "model"
    module.pm.save(model_dir, tokenizer, state)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pm/")}
    if module.val_probs:
        decided = [(q, float(t > 0.5)) for q, t in zip(module.val_probs, module.val_targets) if t != 0.5]
        if decided:
            calibration_plot([q for q, _ in decided], [o for _, o in decided], out.path / "calibration.png")
            tracker.image("pm/val/calibration", out.path / "calibration.png")
    if cfg.pm.eval_data:
        module.pm.cpu().eval()
        hh = evaluate_hh(module.pm, tokenizer, cfg.pm.eval_data, cfg.pm.max_length, cfg.pm.n_eval, cfg.pm.batch_size)
        metrics["pm/hh/accuracy"] = hh["accuracy"]
        metrics["pm/hh/accuracy_low"], metrics["pm/hh/accuracy_high"] = hh["interval_95"]
        tracker.log({k: metrics[k] for k in ("pm/hh/accuracy", "pm/hh/accuracy_low", "pm/hh/accuracy_high")})
        log.info("pm/hh/accuracy %.3f (95%% interval %.3f-%.3f) on %d comparisons", hh["accuracy"], *hh["interval_95"], hh["comparisons"])
    write_json(
        out.path / "metrics.json", {**metrics, "train_comparisons": len(train), "val_comparisons": len(val), "seconds": round(seconds, 1)}
    )
    counts = {
        "train_comparisons": len(train),
        "val_comparisons": len(val),
        "sources": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})},
        "val_accuracy": round(metrics.get("pm/val/accuracy", float("nan")), 4),
        "val_ece": round(metrics.get("pm/val/ece", float("nan")), 4),
        "hh_accuracy": round(metrics["pm/hh/accuracy"], 4) if "pm/hh/accuracy" in metrics else None,
        "optimizer_steps": trainer.global_step,
        "seconds": round(seconds, 1),
    }
    out.complete(counts)
    drop_checkpoints(out.path)
    tracker.artifact(model_dir, name="preference_model", type="model")
    hh_text = f", hh accuracy {counts['hh_accuracy']:.3f}" if counts["hh_accuracy"] is not None else ""
    return {"metric": f"val accuracy {counts['val_accuracy']}, ECE {counts['val_ece']}{hh_text}", "path": str(model_dir)}
