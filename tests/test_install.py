"""The three ways of running cai compose the same config and do the same work.

A checkout (`python train.py` in the repository), an editable install (`cai-train` anywhere, running
the checkout's code) and a wheel (`pip wheel .`, installed elsewhere) must find the same conf/ and
constitutions/, give the same lineage keys and write the same rows. .ci/run also installs the wheel
into a fresh virtualenv with its dependencies and runs the wheel test there (CAI_WHEEL_VENV).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import cai

# A stage small enough to run three times: the tiny model, two red-team prompts, a few tokens.
TINY_STAGE = (
    "stage=sl_data",
    "model=tiny",
    "logger=none",
    "data.n_red_team=2",
    "data.n_helpful=1",
    "sl.n_revisions=1",
    "sl.max_new_tokens=4",
)


def run(cmd: list[str], cwd: Path, root: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CAI_ROOT": str(root), "WANDB_MODE": "disabled", **env}
    done = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def compose_and_run(cmd: list[str], cwd: Path, root: Path, **env: str) -> tuple[dict, dict]:
    """`cmd --cfg job --resolve constitution=ensemble`, then the tiny stage: (config, {lineage key: rows})."""
    config = yaml.safe_load(run([*cmd, "--cfg", "job", "--resolve", "constitution=ensemble"], cwd, root, **env).stdout)
    run([*cmd, *TINY_STAGE], cwd, root, **env)
    written = {}
    for manifest in (root / "artifacts" / "sl_data").glob("*/manifest.json"):
        if manifest.parent.is_symlink():  # `latest`
            continue
        assert json.loads(manifest.read_text())["status"] == "complete"
        written[manifest.parent.name] = [json.loads(line) for s in sorted(manifest.parent.glob("shard-*.jsonl")) for line in s.open()]
    assert len(written) == 1 and next(iter(written.values())), written
    return config, written


def without_location(config: dict, constitutions: Path) -> dict:
    """The config without the fields that name where cai is installed and where this run writes."""
    path = Path(config["constitution"]["path"])
    assert path.is_file() and path.parent == constitutions, (path, constitutions)
    config = {k: v for k, v in config.items() if k != "paths"}  # each way writes under its own CAI_ROOT
    return {**config, "constitution": {**config["constitution"], "path": "<constitutions>/" + path.name}}


@pytest.fixture(scope="module")
def from_checkout(tmp_path_factory) -> tuple[dict, dict]:
    """`python train.py` in the repository: the README's main command."""
    config, written = compose_and_run([sys.executable, "train.py"], cai.ROOT, tmp_path_factory.mktemp("checkout"))
    return without_location(config, cai.ROOT / "constitutions"), written


def test_a_checkout_reads_the_top_level_conf_and_constitutions(from_checkout):
    config, _ = from_checkout
    assert cai.CONF == cai.ROOT / "conf" and cai.CONSTITUTIONS == cai.ROOT / "constitutions"
    assert not (cai.PACKAGE / "conf").exists() and not (cai.PACKAGE / "constitutions").exists()  # no second copy
    assert config["constitution"]["variant"] == "ensemble" and config["constitution"]["ensemble_size"] == 0


def test_an_editable_install_runs_the_checkout_from_anywhere(from_checkout, tmp_path):
    direct_url = json.loads(metadata.distribution("cai").read_text("direct_url.json") or "{}")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("cai is not installed editable in this environment (pip install -e .)")
    script = Path(sys.executable).parent / "cai-train"
    config, written = compose_and_run([str(script)], tmp_path, tmp_path / "root")  # cwd outside the checkout
    assert (without_location(config, cai.ROOT / "constitutions"), written) == from_checkout


def test_a_wheel_carries_conf_and_constitutions_inside_the_package(from_checkout, tmp_path):
    """`pip wheel .`, installed apart from the checkout: same config, same lineage key, same rows.

    In .ci/run, CAI_WHEEL_VENV names a fresh virtualenv with the wheel and its dependencies installed;
    elsewhere the wheel is built here and installed into a folder on PYTHONPATH, beside this
    environment's dependencies.
    """
    venv = os.environ.get("CAI_WHEEL_VENV")
    env = {}
    if venv:
        python, script = Path(venv) / "bin" / "python", Path(venv) / "bin" / "cai-train"
    else:
        pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
        pip, whl, site, src = [sys.executable, "-m", "pip"], tmp_path / "whl", tmp_path / "site", tmp_path / "src"
        # Built from a copy of the sources, so no build/ folder is left in the checkout for later builds to pick up.
        for folder in ("cai", "conf", "constitutions"):
            shutil.copytree(cai.ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
        for file in ("pyproject.toml", "README.md"):
            shutil.copy(cai.ROOT / file, src / file)
        run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(whl), str(src)], tmp_path, tmp_path)
        run([*pip, "install", "-q", "--no-deps", "--target", str(site), *map(str, whl.glob("*.whl"))], tmp_path, tmp_path)
        python, script, env = Path(sys.executable), site / "bin" / "cai-train", {"PYTHONPATH": str(site)}
    where = run([str(python), "-c", "import cai; print(cai.PACKAGE)"], tmp_path, tmp_path, **env).stdout.strip()
    package = Path(where)
    assert package != cai.PACKAGE and package.parent != cai.ROOT  # the installed copy, not this checkout
    assert (package / "conf" / "train.yaml").is_file() and (package / "constitutions" / "README.md").is_file()
    config, written = compose_and_run([str(script)], tmp_path, tmp_path / "root", **env)
    assert (without_location(config, package / "constitutions"), written) == from_checkout


def test_your_own_config_folder_adds_options_without_editing_the_package(tmp_path):
    """--config-dir and hydra.searchpath add a model and a constitution option beside the shipped ones."""
    mine = tmp_path / "my_conf"
    (mine / "model").mkdir(parents=True)
    (mine / "constitution").mkdir()
    (mine / "model" / "my_tiny.yaml").write_text(
        "defaults:\n  - tiny\n  - _self_\nname: my_tiny\ntiny_layers: 3\n"  # builds on a shipped option
    )
    principles = yaml.safe_load((cai.CONSTITUTIONS / "default.yaml").read_text())
    principles["name"] = "mine"
    principles["rl"]["principles"] = principles["rl"]["principles"][:2]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(principles))
    (mine / "constitution" / "mine.yaml").write_text(
        f"defaults:\n  - default\n  - _self_\nvariant: mine\npath: {tmp_path / 'mine.yaml'}\nensemble_size: 0\n"
    )
    train, mine_options = [sys.executable, "train.py"], ["model=my_tiny", "constitution=mine"]
    for extra in (["--config-dir", str(mine)], [f"hydra.searchpath=[file://{mine}]"]):
        config = yaml.safe_load(run([*train, *extra, *mine_options, "--cfg", "job", "--resolve"], cai.ROOT, tmp_path).stdout)
        assert config["model"]["name"] == "my_tiny" and config["model"]["tiny_layers"] == 3 and config["model"]["tiny_hidden"] == 64
        assert config["constitution"]["variant"] == "mine" and config["constitution"]["path"] == str(tmp_path / "mine.yaml")
    # ...and a run uses them.
    stage = [o for o in TINY_STAGE if not o.startswith("model=")]
    run([*train, "--config-dir", str(mine), *mine_options, *stage], cai.ROOT, tmp_path)
    manifest = json.loads((tmp_path / "artifacts" / "sl_data" / "latest" / "manifest.json").read_text())
    assert manifest["status"] == "complete", manifest
    assert str(tmp_path / "mine.yaml") in json.dumps(manifest) and '"tiny_layers": 3' in json.dumps(manifest)
