"""Model cards: a README.md in every model directory cai writes, so a model copied elsewhere says what it is.

Hugging Face's card layout (YAML metadata, then markdown): what the model is, the stage and lineage
that made it (base model, upstream stages by fingerprint, the config fields that decided it), what
was measured when it was made, and how to load it. Written by the pipeline before a stage completes,
so the card is part of the stage's recorded outputs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import cai

WHAT = {
    "sft": ("SL-CAI policy", "supervised fine-tuning on the model's own revisions of its answers (critique -> revision)", "AutoModelForCausalLM"),
    "pm": ("preference model", "a one-label sequence classifier trained on AI-feedback comparisons (RewardBench's format)", "AutoModelForSequenceClassification"),
    "ppo": ("RL-CAI policy", "PPO against the preference model, from the SL-CAI policy", "AutoModelForCausalLM"),
}  # fmt: skip


def model_dirs(stage_dir: Path) -> list[Path]:
    """The directories under a stage's output that hold a transformers model (a config.json beside weights)."""
    return sorted(p.parent for p in stage_dir.rglob("config.json") if p.parent.name != "adapter" and not p.parent.name.startswith("."))


def card(stage: str, model_dir: Path, stage_dir: Path, config: dict, inputs: dict, counts: dict, base: str) -> str:
    """The README.md of one model directory of a finished stage."""
    title, how, auto = WHAT.get(stage, (stage, f"stage {stage}", "AutoModel"))
    where = model_dir.relative_to(stage_dir)
    if where.parts[:1] == ("snapshots",):
        title += f", snapshot at PPO {where.name.replace('iter-', 'iteration ')}"
    task = "text-classification" if stage == "pm" else "text-generation"
    meta = {"library_name": "transformers", "pipeline_tag": task, "tags": ["cai", "constitutional-ai", stage]}
    upstream = {name: v["fingerprint"] for name, v in inputs.items() if isinstance(v, dict) and "fingerprint" in v}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        f"# {title}",
        "",
        f"Made by cai {cai.__version__}, which runs Constitutional AI (Bai et al., 2022) end to end: "
        f"{how}. Stage `{stage}`, lineage `{stage_dir.name}`.",
        "",
        "## Lineage",
        "",
        f"- base model: `{base}`",
        *(f"- upstream `{name}`: fingerprint `{fp}`" for name, fp in upstream.items()),
        "- the settings that decided it:",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=True, default_flow_style=False).strip(),
        "```",
        "",
        "## Measured when it was made",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in counts.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)),
        "",
        *(
            ["Its Elo against the run's other snapshots is in the run's `eval/<key>/elo.json`."]
            if stage != "pm"
            else ["Its accuracy on human comparisons: `python train.py stage=pm_eval pm.checkpoint=THIS_DIR pm.eval_data=FILE`."]
        ),
        "On small models the AI feedback that trained it agrees with human choices at about chance (the",
        "paper predicts this): read the numbers as a record of what ran, not as evidence that it is harmless.",
        "",
        "## Load",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("{model_dir}")  # where it was written',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_dir}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_cards(stage: str, stage_dir: Path, config: dict, inputs: dict, counts: dict, base: str) -> int:
    """A card in every model directory of a stage's output; returns how many were written."""
    dirs = model_dirs(stage_dir)
    for d in dirs:
        (d / "README.md").write_text(card(stage, d, stage_dir, config, inputs, counts, base), encoding="utf-8")
    return len(dirs)
