"""Shared fixtures: compose the real configs (as `python train.py` would) with paths in a temp dir."""

from __future__ import annotations

import os
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
