"""The documentation: generated pages current and complete, the README short and for users, `--help`
answered before torch is imported, and the README's test command the one CI runs."""

from __future__ import annotations

import re
import subprocess
import sys

import cai

README = cai.ROOT / "README.md"


def test_generated_reference_and_results_pages_are_current_and_complete():
    """`python docs/generate.py --check`: every config field has a description, every results file a command and
    a date, and the committed reference/results pages are what the code makes now."""
    done = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=cai.ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_every_config_field_is_in_the_reference():
    import dataclasses

    from cai import config

    text = (cai.ROOT / "docs" / "reference" / "config.md").read_text()
    for f in dataclasses.fields(config.TrainConfig):
        section = f.type if isinstance(f.type, str) else ""
        cls = getattr(config, section.split(" ")[0], None)
        if dataclasses.is_dataclass(cls):
            for sub in dataclasses.fields(cls):
                if not sub.name.startswith("_"):
                    assert f"`{f.name}.{sub.name}`" in text or f.name in ("feedback_model", "pm_model"), f"{f.name}.{sub.name}"


def test_readme_is_short_and_speaks_to_users():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for path in [README, *sorted((cai.ROOT / "docs").rglob("*.md"))]:
        body = path.read_text()
        assert not re.search(r"\b[Ii]ssues? #?\d+", body), f"{path.name} speaks of issue numbers"
        assert "/work/" not in body and "/tmp/" not in body, f"{path.name} names a path of a machine"


def test_the_readme_test_command_is_what_ci_runs():
    """The README's second command installs what the tests need and runs them; .ci/run runs that line."""
    text = README.read_text()
    commands = re.findall(r"^(pip install .*&& (?:python train.py|pytest))$", text, re.M)
    assert len(commands) >= 2, commands
    main, tests = commands[0], commands[1]
    assert main.endswith("python train.py") and '-e ".[dev]"' not in main  # a user installs what a user needs
    assert tests.endswith("pytest") and '".[dev]"' in tests
    assert tests in (cai.ROOT / ".ci" / "run").read_text().splitlines()


def test_help_lists_the_axes_and_stages_without_importing_torch():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--help"], cwd=cai.ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "lightning", "transformers"} & imported  # --help answers before the heavy imports
    help_text = done.stdout
    for group in ("constitution", "label", "model", "peft", "strategy", "generation", "logger", "callbacks", "experiment"):
        for option in sorted(p.stem for p in (cai.CONF / group).glob("*.yaml")):
            if (group, option) != ("model", "policy"):
                assert re.search(rf"\b{option}\b", help_text), (group, option)
    assert "schema" not in help_text and "policy" not in help_text.split("Axes")[1].split("Stages")[0]
    for stage in ("all", "check", "sl_data", "sft", "pairs", "label", "pm", "ppo", "eval", "pm_eval", "frontier", "label_report"):
        assert stage in help_text
    assert help_text.count("python train.py") >= 4  # usage and three examples
