"""Faults, through the front door (`python train.py ...`): nothing damaged is used, no interruption
exits 0, and every fault is one line that names the file and the fix, with nothing already written lost.

Most cases run train.py in this process (conftest.train_in_process); signals need a real process.
Repro notation of each case: the tiny model, several sl_data shards, small counts (SMALL below).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_in_process

import cai
from cai.artifacts import read_manifest

SMALL = (
    "model=tiny",
    "logger=none",
    "data.n_red_team=8",
    "data.n_helpful=2",
    "sl.max_new_tokens=8",
    "pairs.max_new_tokens=8",
    "sl.shard_size=2",  # 10 rows in 5 shards
    "pairs.shard_size=2",
    "generation.batch_size=8",
    "sft.batch_size=2",
    "pm.batch_size=2",
    "ppo.rollouts=4",
    "ppo.minibatch_size=2",
    "ppo.max_new_tokens=6",
)


def train(root: Path, *overrides: str) -> object:
    """`python train.py SMALL... paths.root=root OVERRIDES`: what it exited with (None: it finished)."""
    return train_in_process(*SMALL, f"paths.root={root}", f"paths.output={root}/out", *overrides)


def one_line(code: object, needle: str) -> str:
    """The run exited with one `error: ...` line containing needle."""
    assert isinstance(code, str) and code.startswith("error: "), code
    assert len(code.splitlines()) == 1 and needle in code, code
    return code


def stage_dir(root: Path, stage: str) -> Path:
    [path] = [p for p in (root / "artifacts" / stage).iterdir() if p.is_dir() and not p.is_symlink() and "." not in p.name]
    return path


def shards(root: Path, stage: str) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(stage_dir(root, stage).glob("shard-*.jsonl"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """An artifacts root where every stage up to the PM has run (sl_data in 5 shards)."""
    root = tmp_path_factory.mktemp("world")
    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        assert train(root, f"stage={stage}") is None
    return root


def copy_of(world: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(world / "artifacts", root / "artifacts", symlinks=True)
    return root


# --- a damaged finished stage is never used ---------------------------------------------------------

DAMAGE = {
    "deleted": lambda f: f.unlink(),
    "last line dropped": lambda f: f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1])),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "garbage": lambda f: f.write_bytes(b"\xff\xfe" + os.urandom(64)),
    "a field removed": lambda f: f.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k not in ("revision", "response_b")}) + "\n"
            for line in f.read_text().splitlines()
        )
    ),
}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("stage, reader", [("sl_data", "sft"), ("pairs", "label"), ("label", "pm")])
def test_a_damaged_shard_is_refused_downstream_then_redone(world, tmp_path, stage, reader, how):
    root = copy_of(world, tmp_path)
    before = shards(root, stage)
    victim = stage_dir(root, stage) / "shard-00001.jsonl"
    DAMAGE[how](victim)
    # The later stage refuses it (it would have trained on what is left), naming the file and the fix.
    code = one_line(train(root, f"stage={reader}"), "shard-00001.jsonl")
    assert f"stage '{stage}' is damaged" in code and f"stage={stage}" in code
    # Running the damaged stage again moves it aside (nothing deleted) and redoes it: the same rows.
    assert train(root, f"stage={stage}") is None
    [aside] = (root / "artifacts" / stage).glob("*.damaged-*")
    assert sorted(f.name for f in aside.glob("shard-*.jsonl")) == sorted(n for n in before if n != "shard-00001.jsonl" or how != "deleted")
    assert shards(root, stage) == before


def test_a_damaged_weight_file_is_refused_downstream_then_redone(world, tmp_path):
    root = copy_of(world, tmp_path)
    weights = stage_dir(root, "sft") / "model" / "model.safetensors"
    original = weights.read_bytes()
    blob = bytearray(original)
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: the file still loads, with other weights
    weights.write_bytes(bytes(blob))
    shutil.rmtree(root / "artifacts" / "pairs")
    code = one_line(train(root, "stage=pairs"), "model/model.safetensors has changed since the stage completed")
    assert "stage 'sft' is damaged" in code
    assert train(root, "stage=sft") is None  # redone: the same weights as the first time
    assert weights.read_bytes() == original
    assert len(list((root / "artifacts" / "sft").glob("*.damaged-*"))) == 1


def test_a_cached_stage_with_a_missing_shard_is_not_reported_cached(world, tmp_path, capsys):
    root = copy_of(world, tmp_path)
    before = shards(root, "sl_data")
    (stage_dir(root, "sl_data") / "shard-00002.jsonl").unlink()
    assert train(root, "stage=sl_data") is None
    assert "(cached)" not in capsys.readouterr().out
    assert shards(root, "sl_data") == before


@pytest.mark.parametrize("content", ["[]", '"complete"', "{torn", ""])
def test_a_manifest_of_any_shape_is_one_line_downstream_and_redone(world, tmp_path, content):
    root = copy_of(world, tmp_path)
    before = shards(root, "sl_data")
    (stage_dir(root, "sl_data") / "manifest.json").write_text(content)
    code = one_line(train(root, "stage=sft"), "manifest.json: the manifest is torn or not a JSON object")
    assert "stage=sl_data" in code
    assert train(root, "stage=sl_data") is None
    assert len(list((root / "artifacts" / "sl_data").glob("*.stale-unknown-*"))) == 1
    assert shards(root, "sl_data") == before


# --- checkpoints and a full disk ---------------------------------------------------------------------


class Killed(Exception):
    """Stands in for kill -9 part-way through a stage."""


def test_a_truncated_last_checkpoint_falls_back_and_the_stage_completes(world, tmp_path, monkeypatch):
    from cai.training import FileCheckpointIO

    root = copy_of(world, tmp_path)
    shutil.rmtree(root / "artifacts" / "sft")
    args = ("stage=sft", "sft.epochs=2", "sft.checkpoint_every=1")
    assert train(tmp_path / "clean", "stage=sl_data") is None and train(tmp_path / "clean", *args) is None
    expected = (stage_dir(tmp_path / "clean", "sft") / "model" / "model.safetensors").read_bytes()
    original, saves = FileCheckpointIO.save_checkpoint, []

    def die_on_third(self, checkpoint, path, storage_options=None):
        saves.append(path)
        if len(saves) == 3:
            raise Killed
        original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(FileCheckpointIO, "save_checkpoint", die_on_third)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra re-raises what the job raised, instead of exiting 1
    with pytest.raises(Killed):
        train(root, *args)
    monkeypatch.setattr(FileCheckpointIO, "save_checkpoint", original)
    last = stage_dir(root, "sft") / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # as a kill mid-copy leaves it
    assert train(root, *args) is None  # falls back to the previous checkpoint (or restarts), with a warning
    assert (stage_dir(root, "sft") / "model" / "model.safetensors").read_bytes() == expected
    assert read_manifest(stage_dir(root, "sft") / "manifest.json")["status"] == "complete"


def fail_fsync_for(monkeypatch, name_part: str) -> None:
    """A write that fails with ENOSPC (a full disk): fsync of any file whose name contains name_part."""
    real = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_in_a_generation_stage_is_one_line_and_resumes(tmp_path, monkeypatch):
    assert train(tmp_path / "clean", "stage=sl_data") is None
    expected = shards(tmp_path / "clean", "sl_data")
    fail_fsync_for(monkeypatch, "shard-00003.jsonl")
    code = one_line(train(tmp_path, "stage=all"), "sl_data: the disk is full while writing")
    assert "shard-00003.jsonl" in code and "run the same command again to resume" in code
    assert "(not run: sft, pairs, label, pm, ppo, eval)" in code
    assert not list(stage_dir(tmp_path, "sl_data").rglob("*.tmp*"))  # no half-written file is left
    assert sorted(shards(tmp_path, "sl_data")) == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    monkeypatch.undo()
    assert train(tmp_path, "stage=sl_data") is None  # resumes at the missing shard
    assert shards(tmp_path, "sl_data") == expected
    clean = read_manifest(stage_dir(tmp_path / "clean", "sl_data") / "manifest.json")
    resumed = read_manifest(stage_dir(tmp_path, "sl_data") / "manifest.json")
    # Usage covers the whole job, not only the run that finished it.
    assert resumed["counts"]["shards_resumed"] == 3
    assert resumed["counts"]["generated_tokens"] == clean["counts"]["generated_tokens"]
    assert resumed["usage"]["generated_tokens"] == clean["usage"]["generated_tokens"]


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary(world, tmp_path, monkeypatch):
    root = copy_of(world, tmp_path)
    shutil.rmtree(root / "artifacts" / "sft")
    fail_fsync_for(monkeypatch, ".ckpt.tmp")
    code = one_line(train(root, "stage=sft", "sft.checkpoint_every=1"), "sft: the disk is full while writing")
    assert ".ckpt" in code and "(not run" not in code
    assert not list(stage_dir(root, "sft").rglob("*.tmp*"))
    monkeypatch.undo()
    assert train(root, "stage=sft", "sft.checkpoint_every=1") is None


# --- what the config asks for is checked before any model loads ------------------------------------


def test_a_prompt_longer_than_the_context_is_refused_or_cut(tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me about cats. " * 3000}) + "\n" + json.dumps({"prompt": "Say hello."}) + "\n")
    args = (f"data.red_team={prompts}", "data.n_red_team=0", "stage=sl_data")
    code = one_line(train(tmp_path, *args), "do not fit the model's context of 2048 tokens")
    assert "data.truncate=true" in code
    assert read_manifest(stage_dir(tmp_path, "sl_data") / "manifest.json")["status"] != "complete"
    assert train(tmp_path, *args, "data.truncate=true") is None


def test_a_damaged_weight_file_of_your_own_model_is_one_line_before_any_stage(tmp_path, cache_dir):
    from cai.models import ModelSpec

    mine = tmp_path / "mine"
    shutil.copytree(ModelSpec(name="tiny", source="tiny", cache=cache_dir).local_dir(), mine)
    weights = mine / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = one_line(
        train(tmp_path, "model=hf", f"model.name_or_path={mine}", "stage=sl_data"), "model.safetensors: the weights cannot be read"
    )
    assert "damaged or incomplete" in code
    assert not (tmp_path / "artifacts" / "sl_data").exists()


# --- no interruption exits 0 ------------------------------------------------------------------------


def run_until(root: Path, stage: str, args: tuple[str, ...], sig: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start `python train.py`, send sig once `stage`'s directory is being written (training underway), wait for it to end."""
    cmd = [sys.executable, str(cai.ROOT / "train.py"), *SMALL, f"paths.root={root}", f"paths.output={root}/out", *args]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        manifests = list((root / "artifacts" / stage).glob("*/manifest.json"))
        if manifests and (read_manifest(manifests[0]) or {}).get("status") == "running":
            time.sleep(4)  # into the stage's work: the model loaded, the Trainer running
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"{stage} ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize(
    "stage, args",
    [
        ("sft", ("stage=sft", "sft.epochs=200")),
        ("pm", ("stage=pm", "pm.epochs=200")),
        ("ppo", ("stage=all", "ppo.iterations=200")),
    ],
)
def test_sigterm_in_a_training_stage_exits_non_zero_with_one_line(world, tmp_path, stage, args):
    root = copy_of(world, tmp_path)
    shutil.rmtree(root / "artifacts" / stage, ignore_errors=True)
    done = run_until(root, stage, args)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert last.startswith(f"error: {stage}: interrupted by SIGTERM; run the same command again to resume"), last
    if args[0] == "stage=all":
        assert last.endswith("(not run: eval)"), last
    assert read_manifest(stage_dir(root, stage) / "manifest.json")["status"] == "running"  # kept, to resume


def test_sigint_in_a_generation_stage_exits_non_zero_with_one_line(tmp_path):
    done = run_until(tmp_path, "sl_data", ("stage=sl_data", "data.n_red_team=64", "sl.max_new_tokens=64"), signal.SIGINT)
    assert done.returncode == 128 + signal.SIGINT, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: sl_data: interrupted by SIGINT")


def test_sigterm_during_a_checkpoint_write_stops_once_the_checkpoint_is_whole(world, tmp_path, monkeypatch):
    """A signal that lands inside torch.save would surface as torch's 'unexpected pos' RuntimeError and tear
    the file; it is held until the checkpoint is written and renamed, then stops the run with its line."""
    import zipfile

    from cai.training import FileCheckpointIO

    root = copy_of(world, tmp_path)
    shutil.rmtree(root / "artifacts" / "sft")
    write = FileCheckpointIO._write

    def signalled_mid_write(checkpoint, path):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        write(checkpoint, path)

    monkeypatch.setattr(FileCheckpointIO, "_write", staticmethod(signalled_mid_write))
    code = train(root, "stage=sft", "sft.checkpoint_every=1")
    assert code == 128 + signal.SIGTERM
    [ckpt] = stage_dir(root, "sft").glob("checkpoints/*.ckpt")
    with zipfile.ZipFile(ckpt) as z:
        assert z.testzip() is None  # whole
    assert not list(stage_dir(root, "sft").rglob("*.tmp*"))
    monkeypatch.undo()
    assert train(root, "stage=sft", "sft.checkpoint_every=1") is None  # and it resumes from it
