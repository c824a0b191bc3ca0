"""Generate the documentation's reference and results pages from the code and the benchmark results.

    python docs/generate.py           # write docs/reference/*.md and docs/results/*.md
    python docs/generate.py --check   # exit 1, naming the page, if a committed page is not what the code makes

Nothing here is written by hand, so nothing here goes stale:
- reference/config.md: every config field, by section: type, default, range and its comment (the
  YAML comment of the option that sets it, else the comment beside the field in cai/config.py);
- reference/metrics.md: every metric key cai logs, with its meaning (cai/tracking.py METRICS);
- reference/stages.md: every stage: what it reads, what decides its output, what it writes;
- results/*.md: one page per benchmarks/results/*.json, with the command that made it and the date;
- recipes.md: every script in recipes/, its header comment and its commands (tests/test_recipes.py runs each);
- changelog.md: CHANGELOG.md, so the site carries the history too.
tests/test_docs.py runs `--check`, and fails when a config field has no description or a result no command and date.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import cai  # noqa: E402
from cai import config as schema  # noqa: E402

GROUPS = {  # config section -> (its group in conf/, its schema)
    "model": ("model", schema.ModelConfig),
    "constitution": ("constitution", schema.ConstitutionConfig),
    "label": ("label", schema.LabelConfig),
    "strategy": ("strategy", schema.StrategyConfig),
    "peft": ("peft", schema.PeftConfig),
    "generation": ("generation", schema.HFGenerationConfig),
    "logger": ("logger", schema.LoggerConfig),
    "stage": ("stage", schema.StageConfig),
}
SECTIONS = {  # plain sections (no group): their schema
    "paths": schema.PathsConfig,
    "data": schema.DataConfig,
    "sl": schema.SLConfig,
    "sft": schema.SFTConfig,
    "pairs": schema.PairsConfig,
    "pm": schema.PMConfig,
    "ppo": schema.PPOConfig,
    "eval": schema.EvalConfig,
    "memory": schema.MemoryConfig,
    "trainer": schema.TrainerConfig,
}
HIDDEN_OPTIONS = {("model", "policy")}  # only for model@feedback_model= / model@pm_model=


# --- comments: from the YAML files and from cai/config.py ------------------------------------------


def yaml_comments(path: Path) -> dict[str, str]:
    """`dotted.key -> comment` for every `key: value  # comment` line of a YAML file (block style)."""
    out, stack = {}, []  # stack of (indent, key)
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w@]*):(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        if comment:
            out[".".join(k for _, k in stack)] = comment
    return out


def source_comments() -> dict[str, dict[str, str]]:
    """`class name -> field -> comment` from the comments beside the fields in cai/config.py."""
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in Path(schema.__file__).read_text().splitlines():
        if m := re.match(r"^class (\w+)", line):
            current = m.group(1)
            out[current] = {}
        elif current and (m := re.match(r"^    (\w+): [^=]+=.*?  # (.*)$", line)):
            out[current][m.group(1)] = m.group(2).strip()
    return out


def first_comment(path: Path) -> str:
    """An option file's opening comment (its description)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (cai.CONF / group).glob("*.yaml") if (group, p.stem) not in HIDDEN_OPTIONS)


# --- values ----------------------------------------------------------------------------------------


def composed(*overrides: str) -> dict:
    """The default config (`python train.py` with these overrides), unresolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(cai.CONF), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


def show(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, str) and value == "":
        return "`''`"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    text = text.replace(str(cai.ROOT), "<cai>")
    return f"`{text}`"


def show_range(f: dataclasses.Field) -> str:
    bounds = f.metadata.get("range")
    if not bounds:
        return ""
    ops = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return ", ".join(f"{ops[k]} {v:g}" for k, v in bounds.items() if v is not None)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def field_rows(prefix: str, cls, values: dict, comments: list[dict[str, str]], own: dict[str, str], missing: list[str]) -> list[str]:
    rows = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        # The default option's YAML comment, else the one beside the field in cai/config.py, else another option's.
        comment = (
            (comments[0].get(key) if comments else "") or own.get(f.name, "") or next((c[key] for c in comments[1:] if c.get(key)), "")
        )
        if not comment and prefix == "trainer":
            comment = f"`lightning.Trainer({f.name}=...)`; unset: cai's choice or Lightning's default"
        if not comment:
            missing.append(key)
        rows.append(f"| `{key}` | {cell(f'`{f.type}`')} | {cell(show(values.get(f.name)))} | {show_range(f)} | {cell(comment)} |")
    return rows


def config_reference() -> tuple[str, list[str]]:
    """docs/reference/config.md, and the fields that have no description anywhere."""
    base = composed()
    src = source_comments()
    train_comments = yaml_comments(cai.CONF / "train.yaml")
    quick = yaml_comments(cai.CONF / "experiment" / "quickstart.yaml")
    missing: list[str] = []
    out = [
        "# Configuration reference",
        "",
        "Generated from `cai/config.py` and `conf/` by `python docs/generate.py`; do not edit by hand.",
        "",
        "Every field is typed: a misspelled key or a wrong type fails when the config is composed. A range is",
        "checked before any model loads. Defaults are those of `python train.py` (`experiment=quickstart`).",
        "Set any field on the command line: `python train.py sft.lr=1e-5 ppo.iterations=20`.",
        "",
        "## Axes (config groups)",
        "",
        "One override picks an option: `python train.py label=cot`. `model@feedback_model=` and `model@pm_model=`",
        "pick the labeller's and the PM backbone's model from the same options (their default, `policy`, follows `model=`).",
        "",
        "| group | option | what it is |",
        "|---|---|---|",
    ]
    groups = ["constitution", "label", "model", "strategy", "peft", "generation", "logger", "callbacks", "stage", "experiment"]
    for group in groups:
        for opt in options(group):
            default = " (default)" if opt == default_option(group) else ""
            out.append(f"| `{group}` | `{opt}`{default} | {cell(first_comment(cai.CONF / group / f'{opt}.yaml'))} |")
    out += ["", "## Fields", ""]
    header = ["| field | type | default | range | what it does |", "|---|---|---|---|---|"]
    for section, (group, cls) in GROUPS.items():
        default = default_option(group)
        comments = [yaml_comments(cai.CONF / group / f"{default}.yaml")] + [
            yaml_comments(cai.CONF / group / f"{o}.yaml") for o in options(group) if o != default
        ]
        comments = [{f"{section}.{k}": v for k, v in c.items()} for c in comments]
        out += [f"### `{section}` (group `{group}`, default `{default}`)", ""]
        if section == "model":
            out += ["`feedback_model.*` and `pm_model.*` take the same fields.", ""]
        out += header + field_rows(section, cls, base[section], comments, src.get(cls.__name__, {}), missing) + [""]
        if section == "generation":  # the vLLM option's own fields
            vllm = composed("generation=vllm")["generation"]
            extra = [f for f in dataclasses.fields(schema.VLLMGenerationConfig) if f.name not in {g.name for g in dataclasses.fields(cls)}]
            out += ["With `generation=vllm`, also:", "", *header]
            sub = type("V", (), {"__dataclass_fields__": {f.name: f for f in extra}})
            out += field_rows(section, sub, vllm, comments, src.get("VLLMGenerationConfig", {}), missing) + [""]
    for section, cls in SECTIONS.items():
        out += [f"### `{section}`", ""]
        comments = [{k: v for k, v in c.items() if k.startswith(section + ".")} for c in (quick, train_comments)]
        out += header + field_rows(section, cls, base.get(section, {}), comments, src.get(cls.__name__, {}), missing) + [""]
    out += ["### Top level", "", *header]
    # Fields that are values, not sections (those are MISSING, filled by a group, or built by a factory).
    top = [f for f in dataclasses.fields(schema.TrainConfig) if f.default_factory is dataclasses.MISSING and f.default != "???"]
    sub = type("T", (), {"__dataclass_fields__": {f.name: f for f in top}})
    out += field_rows("", sub, base, [train_comments], src.get("TrainConfig", {}), missing) + [""]
    out += [
        "### `callbacks`",
        "",
        "Lightning callbacks for every Trainer cai builds (SFT, the PM, PPO), one named entry each, built from its",
        "`_target_` (`conf/callbacks/default.yaml`): `+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping`",
        "adds one, `callbacks.lr_monitor=null` removes one, `callbacks=none` removes all.",
        "",
    ]
    return "\n".join(out), missing


def default_option(group: str) -> str:
    text = (cai.CONF / "train.yaml").read_text()
    m = re.search(rf"^\s*- {group}: (\w+)", text, re.M)
    return m.group(1) if m else ""


# --- metrics and stages ----------------------------------------------------------------------------


def metrics_reference() -> str:
    from cai.tracking import METRICS

    out = [
        "# Metrics reference",
        "",
        "Generated from `cai/tracking.py` (`METRICS`) by `python docs/generate.py`. Every key cai logs to W&B (or to",
        "`metrics.csv` with `logger=csv`) is named `stage/split/name`. `{snapshot}` is an evaluated policy (`initial`,",
        "`sft`, `ppo@4`, ...), `{axis}` is `harmless` or `helpful`. **Human** marks the numbers measured against human",
        "choices; every other number is measured against a model (see the frontier guide).",
        "",
    ]
    stages: dict[str, list[str]] = {}
    for key, meaning in METRICS.items():
        stages.setdefault(key.split("/")[0], []).append(f"| `{key}` | {cell(meaning)} |")
    for stage, rows in stages.items():
        out += [f"## {stage}", "", "| key | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


def stages_reference() -> str:
    from omegaconf import OmegaConf

    from cai.pipeline import COMMANDS, PIPELINE

    cfg = OmegaConf.create(composed())
    out = [
        "# Stages reference",
        "",
        "Generated from `cai/stages/*.py` by `python docs/generate.py`. `python train.py` runs the method's stages in",
        "this order (`stage=all`); `stage=NAME` runs one. Each writes `${paths.artifacts}/<stage>/<lineage key>/`",
        "(`./artifacts` by default) with a `manifest.json`, and `<stage>/latest` points at the last one finished.",
        "The lineage key hashes the fields below for this stage and every stage before it.",
        "",
    ]
    for kind, stages in (("The method", PIPELINE), ("Commands over finished work", COMMANDS)):
        out += [f"## {kind}", ""]
        for s in stages:
            reads = s.upstream_of(cfg)
            note = (
                " (with the default config; it follows `ppo.policy`, `ppo.reward_model`, `label=human`, ...)" if callable(s.reads) else ""
            )
            out += [f"### `{s.name}`: {s.description}", ""]
            out.append(f"- **reads**: {', '.join(f'`{r}`' for r in reads) or 'no earlier stage'}{note}")
            if s.keyed:
                fields = [f"`{f}`" for f in s.lineage if f not in s.logging_only]
                out.append(f"- **its output depends on**: {', '.join(fields) or 'nothing beyond its upstream'}")
                if s.logging_only:
                    out.append(
                        f"- **logging only** (changing them reuses the finished stage): {', '.join(f'`{f}`' for f in s.logging_only)}"
                    )
            out.append(f"- **writes**: {s.writes}")
            if s.artifact:
                out.append(f"- **W&B artifact**: `{s.artifact[0]}-<key>` (type `{s.artifact[1]}`)")
            out.append("")
    return "\n".join(out)


# --- results ---------------------------------------------------------------------------------------


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}[{v.get('name', i)}]")]
    if isinstance(value, float):
        return [(prefix, f"{value:.4g}")]
    if isinstance(value, list):
        return [(prefix, "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else json.dumps(v) for v in value) + "]")]
    return [(prefix, str(value))]


def results_pages() -> tuple[dict[str, str], list[str]]:
    """One page per results file, an index, and the files that lack a command or a date."""
    pages, index, incomplete = {}, [], []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        if not data.get("command") or not data.get("date"):
            incomplete.append(path.name)
        head = [f"# {path.stem}", "", f"- **command**: `{data.get('command', '?')}`", f"- **date**: {data.get('date', '?')}"]
        head += [f"- **{k}**: {data[k]}" for k in ("machine", "note") if data.get(k)]
        rows = [(k, v) for k, v in flatten({k: v for k, v in data.items() if k not in ("command", "date", "machine", "note")})]
        body = ["", f"Generated from `benchmarks/results/{path.name}`.", "", "| measure | value |", "|---|---|"]
        body += [f"| `{cell(k)}` | {cell(v)} |" for k, v in rows]
        pages[f"{path.stem}.md"] = "\n".join(head + body) + "\n"
        index.append(f"| [{path.stem}]({path.stem}.md) | {data.get('date', '?')} | `{data.get('command', '?')}` |")
    pages["index.md"] = (
        "\n".join(
            [
                "# Results",
                "",
                "Every number cai reports was printed by a benchmark under `benchmarks/`, which also wrote it to",
                "`benchmarks/results/*.json`; these pages are generated from those files. Rerun a command to measure your machine.",
                "",
                "| results | date | command |",
                "|---|---|---|",
                *index,
            ]
        )
        + "\n"
    )
    return pages, incomplete


RECIPE_ORDER = ["ablation_grid", "your_own_model", "paper_scale", "independent_judge", "wandb_sweep", "optuna", "multi_gpu", "slurm"]


def recipes_page() -> str:
    """docs/recipes.md: each recipe's header (what it does, how to call it) and its commands."""
    out = [
        "# Recipes",
        "",
        "Runnable scripts in `recipes/` for the common jobs. Each passes any further `key=value` overrides on to every",
        "`python train.py` it runs, and CI runs each with tiny counts (`model=tiny`), so none goes stale.",
        "",
    ]
    scripts = sorted((ROOT / "recipes").glob("*.sh"), key=lambda p: (RECIPE_ORDER + [p.stem]).index(p.stem))
    for path in scripts:
        lines = path.read_text().splitlines()
        header = [line[2:] if line.startswith("# ") else "" for line in lines[1:] if line.startswith("#")]
        title = header[0].removeprefix("Recipe: ").rstrip(".")
        body = [line for line in lines if line.strip() and not line.startswith("#") and not line.startswith("set -")]
        usage = [h.strip() for h in header[1:] if h.startswith("  ")]
        prose = " ".join(h for h in header[1:] if h and not h.startswith("  "))
        out += [f"## {title[0].upper() + title[1:]}", "", f"`recipes/{path.name}`", "", "```bash", *usage, "```", "", prose, ""]
        out += ["What it runs:", "", "```bash", *body, "```", ""]
    return "\n".join(out)


def pages() -> tuple[dict[str, str], list[str]]:
    """Every generated page (path under docs/ -> text), and what is missing from the sources."""
    config, missing = config_reference()
    results, incomplete = results_pages()
    out = {
        "reference/config.md": config + "\n",
        "reference/metrics.md": metrics_reference() + "\n",
        "reference/stages.md": stages_reference() + "\n",
    }
    out.update({f"results/{name}": text for name, text in results.items()})
    out["recipes.md"] = recipes_page() + "\n"
    changelog = ROOT / "CHANGELOG.md"
    if changelog.exists():
        out["changelog.md"] = "<!-- generated from CHANGELOG.md by python docs/generate.py -->\n" + changelog.read_text()
    problems = [f"config field {k} has no comment (add one in conf/ or cai/config.py)" for k in missing]
    problems += [f"benchmarks/results/{f} has no command or date" for f in incomplete]
    return out, problems


def main() -> int:
    check = "--check" in sys.argv[1:]
    generated, problems = pages()
    stale = []
    for name, text in generated.items():
        path = DOCS / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check:
        on_disk = {str(p.relative_to(DOCS)) for d in ("reference", "results") for p in (DOCS / d).glob("*.md")}
        on_disk |= {name for name in ("recipes.md", "changelog.md") if (DOCS / name).exists()}
        stale += sorted(on_disk - set(generated))  # a page whose source is gone
    for p in problems:
        print(f"docs: {p}", file=sys.stderr)
    for name in stale:
        print(f"docs: docs/{name} is not what the code makes; run `python docs/generate.py`", file=sys.stderr)
    return 1 if problems or stale else 0


if __name__ == "__main__":
    sys.exit(main())
