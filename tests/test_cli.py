"""`python train.py` on bad input: one clear line naming the file and field, no traceback wall."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

import cai


def train(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAI_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "train.py", *args, "logger=none"], cwd=cai.ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def assert_one_clear_line(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    for n in needles:
        assert n in out.stderr, out.stderr


def test_constitution_with_a_missing_field(tmp_path):
    data = yaml.safe_load((cai.CONSTITUTIONS / "default.yaml").read_text())
    del data["rl"]["principles"][5]["question"]
    bad = tmp_path / "mine.yaml"
    bad.write_text(yaml.safe_dump(data))
    out = train(f"constitution.path={bad}", tmp_path=tmp_path)
    assert_one_clear_line(out, "error: ", "mine.yaml", "rl.principles[5] (id 'no-dangerous-help')", "missing field 'question'")
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_model_name(tmp_path):
    out = train("model=gpt5", tmp_path=tmp_path)
    assert_one_clear_line(out, "Could not find 'model/gpt5'", "qwen2_5_7b", "smollm2_135m")


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    out = train(f"data.red_team={empty}", tmp_path=tmp_path)
    assert_one_clear_line(out, "error: data.red_team:", "prompts.jsonl: the prompt file is empty")


@pytest.mark.parametrize(
    "override,needle", [("label=fuzzy", "Could not find 'label/fuzzy'"), ("sl.n_revison=3", "Key 'n_revison' not in 'SLConfig'")]
)
def test_unknown_config_option_or_field(tmp_path, override, needle):
    assert_one_clear_line(train(override, tmp_path=tmp_path), needle)


def test_label_human_without_data(tmp_path):
    assert_one_clear_line(train("label=human", tmp_path=tmp_path), "error: label.data: label=human needs an hh-rlhf-format file")


def test_help_offers_only_real_options_and_cfg_resolve_works(tmp_path):
    """Schemas live in one `schema` group, not among an axis's options; `--cfg job --resolve` prints the config."""
    help_text = train("--help", tmp_path=tmp_path).stdout
    axes = {
        line.split()[0]: line
        for line in help_text.split("Axes")[1].split("Stages")[0].splitlines()
        if line.startswith("  ") and line.split()
    }
    assert {"label", "model", "strategy"} <= set(axes) and "soft" in axes["label"] and "deepspeed_zero3" in axes["strategy"]
    assert "schema" not in help_text  # the typed schemas are no axis's options
    resolved = train("--cfg", "job", "--resolve", tmp_path=tmp_path)
    assert resolved.returncode == 0, resolved.stderr
    config = yaml.safe_load(resolved.stdout)
    assert config["label"]["kind"] == "soft" and config["paths"]["output"] is None


def test_stage_check_runs_every_check_and_nothing_else(tmp_path):
    """`--cfg job` only prints; `stage=check` runs stage=all's checks (ranges, files, each stage's own) and stops."""
    assert train("--cfg", "job", "ppo.lr=-1", tmp_path=tmp_path).returncode == 0  # printing is not checking
    assert_one_clear_line(train("stage=check", "ppo.lr=-1", tmp_path=tmp_path), "error: ppo.lr: must be > 0, got -1")
    assert_one_clear_line(train("stage=check", "label=cot", "label.options=numbers", tmp_path=tmp_path), "label=cot asks with (A)/(B)")
    assert_one_clear_line(train("stage=check", "label.engine=vllm", tmp_path=tmp_path), "label.engine=vllm: the engine is built with")
    likelihood = train("stage=check", "label=likelihood", "label.engine=vllm", "generation=vllm", tmp_path=tmp_path)
    assert_one_clear_line(likelihood, "label=likelihood scores answers: use label.engine=hf")
    ok = train("stage=check", "model=tiny", tmp_path=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "check: the config, its input files and the checks of sl_data, sft, pairs, label, pm, ppo, eval passed" in ok.stdout
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("manifest.json"))


@pytest.mark.parametrize("override", ["model=policy", "model=tiny,policy"])
def test_model_policy_is_refused_before_composition(tmp_path, override):
    out = train("--cfg", "job", override, tmp_path=tmp_path)
    assert_one_clear_line(out, "error: model=policy: 'policy' is an option for model@feedback_model= and model@pm_model=")
    assert out.stdout == ""
