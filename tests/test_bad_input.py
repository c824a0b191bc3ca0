"""Bad input, through the front door (`python train.py ...`): one line naming the key or the file, a
non-zero exit, and no artifact touched.

train.py runs in this process (runpy, as `__main__`), so the table costs a fraction of a second a
case; test_cli.py runs the command line itself in subprocesses.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import HH_SMALL, train_in_process

TINY = ("model=tiny", "logger=none", "data.n_red_team=4", "data.n_helpful=2", "sl.max_new_tokens=8", "generation.batch_size=8")


def train(root: Path, *overrides: str) -> object:
    """Run `python train.py` with these overrides; return what it exited with (None if it did not exit)."""
    return train_in_process(*TINY, f"paths.root={root}", f"paths.output={root}/out", *overrides)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the artifacts root, with its size and modification time."""
    art = root / "artifacts"
    return {str(p.relative_to(art)): (p.stat().st_size, p.stat().st_mtime_ns) for p in art.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """An artifacts root where sl_data has run, and a folder of broken input files."""
    root = tmp_path_factory.mktemp("root")
    assert train(root, "stage=sl_data") is None
    bad = tmp_path_factory.mktemp("bad")
    raw = HH_SMALL.read_bytes()
    (bad / "torn.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    (bad / "fake.jsonl.gz").write_text(gzip.decompress(raw).decode())
    (bad / "latin1.jsonl").write_bytes('{"chosen": "\\n\\nHuman: caf\xe9\\n\\nAssistant: ok", "rejected": "x"}\n'.encode("latin-1"))
    (bad / "badjson.jsonl").write_text('{"chosen": "a", "rejected": \n')
    (bad / "norejected.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}) + "\n")
    (bad / "empty.txt").write_text("\n")
    (bad / "broken.yaml").write_text("sl: [unclosed\n")
    (bad / "not_a_pm").mkdir()
    (bad / "half_pm").mkdir()
    (bad / "half_pm" / "pm.json").write_text("{}")
    (bad / "half_pm" / "head.safetensors").write_bytes(b"")
    (bad / "a_file").write_text("not a directory")
    (bad / "lm_not_pm").mkdir()
    (bad / "lm_not_pm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return {"root": root, "bad": bad}


CASES = [
    # (overrides, what the one line must name)
    (("sft.lr=-1",), "sft.lr: must be > 0"),
    (("objective=eval/summary/harmless",), "objective: unknown 'eval/summary/harmless'; choose eval/summary/<harmless_elo|"),
    (("experiment=paper",), "data.red_team: experiment=paper needs your own red-team prompts: set data.red_team=FILE"),
    (("experiment=paper", "data.red_team=builtin"), "data.helpful: experiment=paper needs your own helpful prompts"),
    (("ppo.max_grad_norm=0",), "ppo.max_grad_norm: must be > 0"),
    (("strategy=deepspeed_zero3", "trainer.accelerator=cpu"), "strategy: DeepSpeed runs only on CUDA GPUs"),
    (("sft.lr=0",), "sft.lr"),
    (("sft.batch_size=0",), "sft.batch_size: must be >= 1"),
    (("sft.epochs=0",), "sft.epochs"),
    (("sft.val_fraction=1",), "sft.val_fraction"),
    (("pm.warmup_ratio=2",), "pm.warmup_ratio"),
    (("pm.grad_accum=0",), "pm.grad_accum"),
    (("pm.trainable=body",), "pm.trainable"),
    (("ppo.minibatch_size=0",), "ppo.minibatch_size"),
    (("ppo.iterations=0",), "ppo.iterations"),
    (("ppo.gamma=1.5",), "ppo.gamma"),
    (("sl.n_revisions=0",), "sl.n_revisions"),
    (("sl.shard_size=0",), "sl.shard_size"),
    (("pairs.temperature=0",), "pairs.temperature"),
    (("data.n_red_team=-1",), "data.n_red_team"),
    (("generation.top_p=0",), "generation.top_p"),
    (("generation.temperature=-1",), "generation.temperature"),
    (("eval.n_helpful=0",), "eval.n_helpful"),
    (("label.clamp_low=0.7", "label.clamp_high=0.6"), "label.clamp_low/clamp_high"),
    (("label.kind=bogus",), "label.kind"),
    (("label=human",), "label.data"),
    (("label=human", "label.data={bad}/missing.jsonl"), "label.data"),
    (("pm.eval_data={bad}/torn.jsonl.gz",), "torn.jsonl.gz: not a complete gzip file"),
    (("pm.eval_data={bad}/fake.jsonl.gz",), "fake.jsonl.gz: not a complete gzip file"),
    (("label.report_data={bad}/latin1.jsonl",), "latin1.jsonl: not UTF-8 text"),
    (("pm.helpful_data={bad}/badjson.jsonl",), "badjson.jsonl: line 1: not valid JSON"),
    (("pm.helpful_data={bad}/norejected.jsonl",), "norejected.jsonl: line 1: not a preference row (fields: chosen); accepted: hh-rlhf"),
    (("data.red_team={bad}/nothing.jsonl",), "data.red_team"),
    (("data.helpful={bad}/empty.txt",), "data.helpful"),
    (("constitution.path={bad}/nothing.yaml",), "constitution.path"),
    (("constitution.path={bad}/broken.yaml",), "broken.yaml"),
    (("pm.checkpoint={bad}/not_a_pm",), "pm.checkpoint: "),
    (("pm.checkpoint={bad}/half_pm",), "backbone/config.json is missing"),
    (("pm.checkpoint={bad}/lm_not_pm",), "is not a *ForSequenceClassification with num_labels=1"),
    (("paths.artifacts={bad}/a_file/artifacts",), "paths.artifacts: cannot write"),
    (("model.dtype=fp8",), "model.dtype"),
    (("trainer.max_steps=-5",), "trainer.max_steps: Lightning refuses -5"),
    (("trainer.precision=bogus",), "trainer.precision: Lightning refuses 'bogus'"),
    (
        ("trainer.precision=bogus", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"),
        "trainer.precision: Lightning refuses",
    ),
    (("model.tiny_heads=3",), "model.tiny_hidden: 64 must split into model.tiny_heads=3 heads"),
    (("model.tiny_kv_heads=3",), "model.tiny_kv_heads: 3 must divide model.tiny_heads=4"),
    (("model.tiny_layers=0",), "model.tiny_layers: must be >= 1"),
    (("ppo.kl_coef=inf",), "ppo.kl_coef: must be a finite number, got inf"),
    (("sft.lr=inf",), "sft.lr: must be a finite number, got inf"),
    (("pm.lr=nan",), "pm.lr: must be a finite number, got nan"),
    (("paths.artifacts=",), "paths.artifacts: is empty"),
    (("paths.cache=",), "paths.cache: is empty"),
    (("ppo.value_model=bogus",), "ppo.value_model"),
    (("ppo.advantage=ppo2",), "ppo.advantage: choose gae, grpo, rloo"),
    (("ppo.reward_model={bad}/lm_not_pm",), "ppo.reward_model: "),
    (("ppo.policy={bad}/nothing",), "ppo.policy: '"),
    (("ppo.reward_model={bad}/lm_not_pm", "ppo.value_model=critic"), "ppo.reward_model: "),
    (("ppo.advantage=grpo",), "ppo.samples_per_prompt: ppo.advantage=grpo compares answers to one prompt, so it needs >= 2"),
    (("ppo.advantage=rloo", "ppo.samples_per_prompt=3", "ppo.rollouts=16"), "ppo.rollouts: 16 answers must split into groups"),
    (("ppo.frozen_dtype=float16",), "ppo.frozen_dtype"),
    (("eval.judge=bogus",), "eval.judge"),
    (("stage=label",), "stage 'label' needs the output of stage 'pairs'"),
    (("stage=pm_eval",), "pm.eval_data"),
]


@pytest.mark.parametrize("overrides, needle", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, overrides, needle):
    root, bad = world["root"], world["bad"]
    before = snapshot(root)
    code = train(root, *(o.format(bad=bad) for o in overrides))
    assert isinstance(code, str) and code.startswith("error: "), code  # sys.exit("error: ..."): exit status 1
    assert len(code.splitlines()) == 1 and needle in code, code
    assert snapshot(root) == before


def test_a_torn_upstream_manifest_is_named_and_left_alone(world, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(world["root"] / "artifacts", root / "artifacts", symlinks=True)
    manifest = next((root / "artifacts" / "sl_data").glob("*/manifest.json"))
    manifest.write_text(manifest.read_text()[:40])
    before = snapshot(root)
    code = train(root, "stage=sft")
    assert isinstance(code, str) and "manifest.json: the manifest is torn" in code and "stage=sl_data" in code
    assert snapshot(root) == before
    # Re-running the stage it names moves the torn directory aside and redoes it.
    assert train(root, "stage=sl_data") is None
    assert len(list((root / "artifacts" / "sl_data").glob("*.stale-unknown-*"))) == 1


def test_divergence_stops_the_stage_and_publishes_nothing(world, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(world["root"] / "artifacts", root / "artifacts", symlinks=True)
    code = train(root, "stage=sft", "sft.lr=1e30", "sft.batch_size=2")
    assert isinstance(code, str) and code.startswith("error: sft: the ") and "became nan" in code and "Lower sft.lr" in code
    [sft] = [d for d in (root / "artifacts" / "sft").iterdir() if d.is_dir()]
    assert json.loads((sft / "manifest.json").read_text())["status"] == "running"  # not complete
    assert not (root / "artifacts" / "sft" / "latest").exists() and not (sft / "model").exists()
