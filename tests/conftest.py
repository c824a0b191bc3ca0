"""Shared fixtures: compose the real configs (as `python train.py` would) with paths in a temp dir."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import cai
import cai.config  # noqa: F401  (registers the schemas)

CONF = cai.CONF
# The shared development data (hh-rlhf dev split, MT-bench, the paper's prompt files) lives beside our
# checkouts, not in the repository; CAI_TEST_DATA may point elsewhere. Tests that need it skip without it.
SHARED = Path(os.environ.get("CAI_TEST_DATA") or cai.ROOT.parent / "shared" / "data")
HH_DEV = SHARED / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
MT_BENCH = SHARED / "mt-bench" / "question.jsonl"
PAPER_PROMPTS = SHARED / "cai-paper" / "prompts"
needs_shared_data = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"needs the shared development data at {SHARED} (set CAI_TEST_DATA to its data/ folder)"
)
# Small files written for the project in the same formats (tests/fixtures/README.md): they run everywhere.
FIXTURES = Path(__file__).parent / "fixtures"
HH_SMALL = FIXTURES / "hh_small.jsonl.gz"
MT_BENCH_SMALL = FIXTURES / "mt_bench_small.jsonl"
PAPER_FORMAT = FIXTURES / "paper_format"
# The tiny model with counts small enough for a test of the stages from SL data to the PM.
TINY_RUN = (
    "model=tiny",
    "data.n_red_team=8",
    "data.n_helpful=4",
    "sl.max_new_tokens=12",
    "pairs.max_new_tokens=12",
    "generation.batch_size=8",
)


def train_in_process(*argv: str) -> object:
    """Run `python train.py ARGV` in this process (runpy, as `__main__`): what it exited with, None if it did not exit.

    The front door at a fraction of a second a run: no interpreter start, no imports.
    """
    import runpy
    import sys

    saved = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        runpy.run_path(str(cai.ROOT / "train.py"), run_name="__main__")
    except SystemExit as done:
        return done.code
    finally:
        sys.argv = saved
    return None


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """Where converted models live: CAI_CACHE if set (CI sets a fresh one), else a temp dir."""
    return os.environ.get("CAI_CACHE") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: str):
    """compose(overrides) -> the composed train config, writing under tmp_path."""

    def _make(*overrides: str) -> DictConfig:
        base = [f"paths.root={tmp_path}", f"paths.output={tmp_path}/out", f"paths.cache={cache_dir}", "logger=none"]
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose(config_name="train", overrides=base + list(overrides))

    return _make


@pytest.fixture(scope="session")
def tiny_spec(cache_dir: str):
    from cai.models import ModelSpec

    return ModelSpec(name="tiny", source="tiny", dtype="float32", cache=cache_dir)


@pytest.fixture(scope="session")
def embedded_spec(cache_dir: str):
    from cai.models import ModelSpec

    return ModelSpec(name="smollm2_135m", source="embedded", dtype="float32", cache=cache_dir)


def wandb_runs(root: Path) -> list[dict]:
    """What the offline W&B runs under root recorded: name, group, job type, config, artifacts logged.

    Read from the runs' .wandb files (the records `wandb sync` would upload), not from our own objects.
    """
    from wandb.proto import wandb_internal_pb2

    runs = []
    for file in sorted(Path(root).rglob("offline-run-*/*.wandb")):
        run: dict = {"config": {}, "artifacts": [], "history_keys": set()}
        for record in finished_records(file, wandb_internal_pb2.Record):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags)
                )
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "artifact" and record.artifact.type != "run_table":  # tables travel as artifacts too
                refs = [e.ref for e in record.artifact.manifest.contents]
                run["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type, "refs": refs})
            elif kind == "history":
                run["history_keys"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        runs.append(run)
    return runs


def finished_records(file: Path, record_type, wait_s: float = 30.0) -> list:
    """A .wandb file's records once it ends with the run's `exit` record.

    W&B's service process writes the file. Once in CI the artifact records were missing after
    `run.finish()` had returned, most likely still being written on a loaded machine: so read again
    until the exit record is there.
    """
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for data in wandb_log_records(file.read_bytes()):
            records.append(record_type())
            records[-1].ParseFromString(data)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_log_records(blob: bytes) -> list[bytes]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks; each chunk has a 7-byte
    header: crc32, length, type 1=full 2=first 3=middle 4=last) after W&B's 7-byte ':W&B' header.
    wandb 0.31 no longer ships a Python reader for it."""
    import struct

    block, records, parts, pos = 32768, [], b"", 7
    while pos + 7 <= len(blob):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", blob[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        parts += blob[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    return records
