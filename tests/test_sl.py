"""SL-CAI on the tiny model: critique/revision data with resume, and SFT with assistant-only loss."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

import cai.stages.sl_data as sl_data
from cai.artifacts import read_jsonl
from cai.constitution import load_constitution
from cai.data import load_prompts
from cai.errors import CaiError
from cai.generation.hf import HFGenerator
from cai.pipeline import run
from cai.stages.sft import IGNORE, SFTModule, build_example, collate, select_pairs
from cai.templates import clean
from cai.training import LengthBucketSampler, adamw_with_cosine

SMALL = ("model=tiny", "data.n_red_team=8", "sl.helpful_mix=0.25", "sl.max_new_tokens=12", "generation.batch_size=8")


def sl_dir(root: Path) -> Path:
    """The one sl_data lineage directory under root (complete or not)."""
    [path] = [d for d in (root / "artifacts" / "sl_data").iterdir() if d.is_dir() and d.name != "latest" and ".stale-" not in d.name]
    return path


def rows_of(root: Path) -> list[dict]:
    return [r for shard in sorted(sl_dir(root).glob("shard-*.jsonl")) for r in read_jsonl(shard)]


@pytest.fixture
def spy_generate(monkeypatch):
    """Record every completion the HF backend produces, to check rows hold the model's own text."""
    produced: list[str] = []
    calls: list[int] = []
    original = HFGenerator.generate

    def generate(self, conversations, params=None, prefixes=None, desc="generating"):
        out = original(self, conversations, params, prefixes, desc)
        produced.extend(c.text for c in out)
        calls.append(len(conversations))
        return out

    monkeypatch.setattr(HFGenerator, "generate", generate)
    return produced, calls


def test_sl_data_rows(make_cfg, tmp_path, spy_generate):
    produced, calls = spy_generate
    cfg = make_cfg("stage=sl_data", *SMALL, "sl.n_revisions=2", "sl.shard_size=64")
    [summary] = run(cfg)
    rows = rows_of(tmp_path)
    red = [r for r in rows if r["kind"] == "red_team"]
    helpful = [r for r in rows if r["kind"] == "helpful"]
    assert len(red) == 8 * 2 and len(helpful) == 2  # 2 rounds per red-team prompt; 0.25 * 8 helpful
    assert sorted(r["round"] for r in red) == [1] * 8 + [2] * 8
    ids = {p.id for p in load_constitution(cfg.constitution.path).sl_principles}
    assert all(r["principle_id"] in ids for r in red)
    # the critiques and revisions are the model's own generated text, not copies of anything else
    own = {clean(t) for t in produced}
    for r in red:
        assert r["critique"] in own and r["revision"] in own
        assert r["critique"] != r["prompt"] and r["revision"] != r["response"]
    for r in helpful:
        assert r["response"] in own and r["critique"] is None
    # batched: one call per step (answers, then critiques and revisions per round), never per prompt
    assert calls == [10, 8, 8, 8, 8]
    manifest = json.loads((sl_dir(tmp_path) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 18
    assert manifest["inputs"]["constitution"] and manifest["versions"]["torch"]
    assert summary["stage"] == "sl_data"


def test_sl_data_without_critique(make_cfg, tmp_path):
    run(make_cfg("stage=sl_data", *SMALL, "sl.critique=false"))
    red = [r for r in rows_of(tmp_path) if r["kind"] == "red_team"]
    assert len(red) == 8 and all(r["critique"] is None and isinstance(r["revision"], str) for r in red)


def test_sl_data_resumes_after_an_interruption(make_cfg, tmp_path, tmp_path_factory, monkeypatch):
    args = ("stage=sl_data", *SMALL, "sl.shard_size=3")  # 10 prompts -> 4 shards
    original = sl_data.make_rows
    done: list[int] = []

    def interrupted(items, shard, *a):
        if shard == 2:
            raise KeyboardInterrupt  # killed while working on the third shard
        done.append(shard)
        return original(items, shard, *a)

    monkeypatch.setattr(sl_data, "make_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*args))
    assert done == [0, 1] and len(list(sl_dir(tmp_path).glob("shard-*.jsonl"))) == 2

    resumed: list[int] = []

    def counting(items, shard, *a):
        resumed.append(shard)
        return original(items, shard, *a)

    monkeypatch.setattr(sl_data, "make_rows", counting)
    run(make_cfg(*args))
    assert resumed == [2, 3]  # only the missing shards were generated
    rows = rows_of(tmp_path)
    keys = [(r["id"], r["round"]) for r in rows]
    red, helpful = sl_data.select_prompts(make_cfg(*args))
    assert len(red) == 8 and len(helpful) == 2
    expected = {(p.id, 1) for p in red} | {(p.id, 0) for p in helpful}
    assert len(keys) == len(set(keys)) == 10 and set(keys) == expected

    # a resumed run writes exactly what an uninterrupted one writes
    monkeypatch.setattr(sl_data, "make_rows", original)
    other = tmp_path_factory.mktemp("uninterrupted")
    run(make_cfg(*args, f"paths.root={other}"))
    assert rows_of(other) == rows

    # complete and unchanged: the next run skips the stage without loading a model
    monkeypatch.setattr(sl_data, "make_rows", lambda *a: pytest.fail("should have been skipped"))
    [summary] = run(make_cfg(*args))
    assert "cached" in summary["metric"]


def test_changed_config_keeps_both_and_changed_inputs_move_aside(make_cfg, tmp_path):
    # Another config is another lineage: both outputs live side by side, and `latest` is the last one.
    run(make_cfg("stage=sl_data", *SMALL))
    run(make_cfg("stage=sl_data", *SMALL, "sl.max_new_tokens=8"))
    stage = tmp_path / "artifacts" / "sl_data"
    dirs = [d for d in stage.iterdir() if d.is_dir() and d.name != "latest"]
    assert len(dirs) == 2 and all(list(d.glob("shard-*.jsonl")) for d in dirs)
    assert json.loads((stage / "latest" / "manifest.json").read_text())["config"]["sl"]["max_new_tokens"] == 8
    # The same config with an edited prompt file: the old output is moved aside, never deleted.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"How do I pick lock number {i}?\n" for i in range(8)))
    args = ("stage=sl_data", *SMALL, f"data.red_team={prompts}", "data.n_red_team=4")
    run(make_cfg(*args))
    prompts.write_text("".join(f"How do I hotwire car number {i}?\n" for i in range(8)))
    run(make_cfg(*args))
    stale = list(stage.glob("*.stale-*"))
    assert len(stale) == 1 and list(stale[0].glob("shard-*.jsonl"))  # nothing already written is lost


def test_build_example_puts_loss_on_assistant_tokens_only(tiny_spec):
    tok = tiny_spec.load_tokenizer()
    ex = build_example(tok, "How do I bake bread?", "Mix flour, water and yeast.", max_length=512)
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    target_ids = tok("Mix flour, water and yeast.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + target_ids
    assert ex["labels"] == [IGNORE] * len(prompt_ids) + target_ids
    assert tok.decode(ex["input_ids"][: len(prompt_ids)]).endswith("<|im_start|>assistant\n")
    # truncation cuts the target, and a prompt that fills max_length is dropped
    cut = build_example(tok, "How do I bake bread?", "Mix flour, water and yeast.", max_length=len(prompt_ids) + 2)
    assert cut["labels"] == [IGNORE] * len(prompt_ids) + target_ids[:2]
    assert build_example(tok, "How do I bake bread?", "x", max_length=len(prompt_ids)) is None


def test_collate_pads_without_loss():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_buckets_cover_every_example_once():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47, 9]
    sampler = LengthBucketSampler(lengths, batch_size=3, seed=0, pool=50)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(9)) and len(batches) == len(sampler) == 3
    for b in batches:  # similar lengths together
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 41
    assert list(map(tuple, LengthBucketSampler(lengths, 3, 0).__iter__())) == list(map(tuple, batches))  # seeded


def test_the_schedule_warms_up_then_decays_to_zero():
    """SFT's and the PM's learning rate per step: 20% warmup over 10 steps, then cosine to 0 (hand-computed)."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(estimated_stepping_batches=10, precision_plugin=None)
    sched = adamw_with_cosine([torch.nn.Parameter(torch.zeros(1))], 1.0, 0.2, trainer, "sft")["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # linear warmup over 2 steps
    assert lrs[6] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.0)  # half-way down at step 6, 0 at the end


def test_select_pairs_picks_revision_k():
    rows = [
        {"id": "1", "kind": "red_team", "prompt": "p", "response": "a0", "round": 1, "revision": "r1"},
        {"id": "1", "kind": "red_team", "prompt": "p", "response": "a0", "round": 2, "revision": "r2"},
        {"id": "2", "kind": "red_team", "prompt": "q", "response": "b0", "round": 1, "revision": "s1"},
        {"id": "2", "kind": "red_team", "prompt": "q", "response": "b0", "round": 2, "revision": "  "},  # came out empty
        {"id": "3", "kind": "red_team", "prompt": "x", "response": "c0", "round": 1, "revision": ""},
        {"id": "3", "kind": "red_team", "prompt": "x", "response": "c0", "round": 2, "revision": ""},
        {"id": "h", "kind": "helpful", "prompt": "h", "response": "ha", "round": 0, "revision": None},
    ]
    # An empty revision keeps the answer the loop carried on from (the last revision, or the first answer).
    assert select_pairs(rows, -1) == [("p", "r2"), ("q", "s1"), ("x", "c0"), ("h", "ha")]
    assert select_pairs(rows, 1) == [("p", "r1"), ("q", "s1"), ("x", "c0"), ("h", "ha")]
    assert select_pairs(rows, "all") == [("p", "r1"), ("p", "r2"), ("q", "s1"), ("x", "c0"), ("h", "ha")]  # each kept answer once
    with pytest.raises(CaiError, match="sft.revision: the SL data has rounds 1..2; got 3"):
        select_pairs(rows, 3)


def test_sft_revision_all_through_the_pipeline(make_cfg, tmp_path):
    args = ("model=tiny", "data.n_red_team=4", "sl.helpful_mix=0", "sl.n_revisions=2", "sl.max_new_tokens=6", "sft.batch_size=4")
    run(make_cfg("stage=sl_data", *args))
    [summary] = run(make_cfg("stage=sft", *args, "sft.revision=all"))
    [last] = run(make_cfg("stage=sft", *args))
    n_all, n_last = (
        sum(json.loads((Path(s["path"]).parent / "manifest.json").read_text())["counts"][f"{k}_examples"] for k in ("train", "val"))
        for s in (summary, last)
    )
    assert n_all > n_last  # two rounds' revisions per prompt, where they differ
    with pytest.raises(CaiError, match="sft.revision: give a round k >= 1, -1 for the last round, or all"):
        run(make_cfg("stage=sft", *args, "sft.revision=al"))


def test_sft_loss_falls_on_a_repeated_batch(tiny_spec):
    tok = tiny_spec.load_tokenizer()
    examples = [build_example(tok, f"Question {i}?", f"A short answer number {i}.", 128) for i in range(4)]
    batch = collate(examples, tok.pad_token_id)
    module = SFTModule(tiny_spec, lr=3e-3, warmup_ratio=0.0)
    with torch.no_grad():
        before = module(batch).item()
    loader = torch.utils.data.DataLoader([batch] * 20, batch_size=None)
    trainer = L.Trainer(
        max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    trainer.fit(module, loader)
    with torch.no_grad():
        after = module(batch).item()
    assert after < before - 1.0, (before, after)


def test_sft_stage_trains_and_writes_an_hf_checkpoint(make_cfg, tmp_path, tiny_spec):
    from transformers import AutoModelForCausalLM

    run(make_cfg("stage=sl_data", *SMALL))
    [summary] = run(make_cfg("stage=sft", *SMALL, "logger=csv", f"logger.dir={tmp_path}/run", "sft.lr=1e-3"))
    model_dir = tmp_path / "artifacts" / "sft" / "latest" / "model"
    assert summary["path"] == str(model_dir.resolve()) and (model_dir / "model.safetensors").exists()
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = tiny_spec.load_model()
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained.state_dict()[w], initial.state_dict()[w])  # parameters changed
    manifest = json.loads((tmp_path / "artifacts" / "sft" / "latest" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["optimizer_steps"] >= 1
    upstream = json.loads((sl_dir(tmp_path) / "manifest.json").read_text())
    assert manifest["inputs"]["sl_data"] == {"fingerprint": upstream["fingerprint"], "output": upstream["output_digest"]}
    assert set(manifest["outputs"]) >= {"model/model.safetensors", "model/config.json"} and manifest["code"]
    metrics = (tmp_path / "run").rglob("metrics.csv")
    text = "".join(p.read_text() for p in metrics)
    assert "sft/train/loss" in text and "sft/val/loss" in text
    assert not (tmp_path / "artifacts" / "sft" / "latest" / "checkpoints").exists()


def test_sft_needs_sl_data(make_cfg):
    with pytest.raises(CaiError, match="stage 'sft' needs the output of stage 'sl_data'"):
        run(make_cfg("stage=sft", *SMALL))


def test_the_quickstart_draws_its_prompts_from_most_categories(make_cfg, tmp_path):
    """Subsets are a seeded sample stratified by category, not the head of a file sorted by category;
    the manifest records the ids drawn, and pairs and PPO read the same prompts."""
    cfg = make_cfg("model=tiny", "stage=sl_data", "sl.max_new_tokens=2")  # the quickstart's prompt counts
    assert (cfg.data.n_red_team, cfg.data.n_helpful) == (24, 8)
    run(cfg)
    drawn = json.loads((sl_dir(tmp_path) / "manifest.json").read_text())["prompt_ids"]
    category = {p.id: p.category for kind in ("red_team", "helpful") for p in load_prompts(kind)}
    assert len(drawn["red_team"]) == 24 and len({category[i] for i in drawn["red_team"]}) >= 15  # of 21
    assert len(drawn["helpful"]) == 6 and len({category[i] for i in drawn["helpful"]}) >= 6  # of 15 (sl.helpful_mix: 6 of the 8)
    assert {r["id"] for r in rows_of(tmp_path)} == set(drawn["red_team"]) | set(drawn["helpful"])
    from cai.stages import pairs, ppo

    assert [p.id for k, p in pairs.select_prompts(cfg) if k == "red_team"] == drawn["red_team"]
    assert [p.id for p in ppo.train_prompts(cfg)["red_team"]] == drawn["red_team"]
    other = make_cfg("model=tiny", "seed=1")
    assert [p.id for p in ppo.train_prompts(other)["red_team"]] != drawn["red_team"]  # the seed draws others


def test_a_stage_computed_by_other_code_is_redone_unless_allowed(make_cfg, tmp_path, monkeypatch, caplog):
    """Every fingerprint holds the code version: after a change to cai's code, finished stages are
    redone (the old output moved aside), or reused with a warning naming the code that made them."""
    import cai.artifacts
    import cai.pipeline
    from cai.artifacts import code_version

    args = ("stage=sl_data", *SMALL)
    run(make_cfg(*args))
    assert json.loads((sl_dir(tmp_path) / "manifest.json").read_text())["code"] == code_version()
    other = "0.0.9+0123456789ab"  # as if the rows had been made by an older cai
    for module in (cai.artifacts, cai.pipeline):  # StageDir and require() read it
        monkeypatch.setattr(module, "code_version", lambda: other)
    [summary] = run(make_cfg(*args))
    assert "cached" not in summary["metric"]  # redone by the new code...
    assert len(list((tmp_path / "artifacts" / "sl_data").glob("*.stale-*"))) == 1  # ...the old rows kept aside
    monkeypatch.undo()
    # Back to this code: the stage made by "other" is not this code's; sft refuses it, the pipeline redoes it.
    with pytest.raises(CaiError, match=r"computed by cai 0\.0\.9\+0123456789ab, not by this code .*allow_other_code=true"):
        run(make_cfg("stage=sft", *SMALL))
    with caplog.at_level("WARNING"):
        [reused] = run(make_cfg(*args, "allow_other_code=true"))
    assert "cached" in reused["metric"] and "computed by cai 0.0.9+0123456789ab" in caplog.text
    [redone] = run(make_cfg(*args))
    assert "cached" not in redone["metric"]


def test_a_local_model_is_known_by_its_weights_not_its_path(make_cfg, tmp_path, tiny_spec):
    """`model=hf model.name_or_path=DIR` retrained in place is another model: its stages are redone."""
    import shutil

    from cai.models import ModelSpec

    mine = tmp_path / "my-model"
    shutil.copytree(tiny_spec.local_dir(), mine)
    args = ("stage=sl_data", *[a for a in SMALL if a != "model=tiny"], "model=hf", f"model.name_or_path={mine}")
    run(make_cfg(*args))
    assert "cached" in run(make_cfg(*args))[0]["metric"]
    retrained = ModelSpec(name="tiny", source="tiny", dtype="float32", cache=str(tmp_path / "c"), seed=1).local_dir()
    shutil.copy(Path(retrained) / "model.safetensors", mine / "model.safetensors")  # new weights, same path
    [summary] = run(make_cfg(*args))
    assert "cached" not in summary["metric"]


def test_no_two_sampling_streams_share_a_seed(make_cfg, monkeypatch):
    """Every batch of every step of every shard draws from its own seed (seed + step + batch overlapped:
    step 0's second batch and step 1's first drew the same numbers)."""
    import cai.generation.hf
    from cai.generation import derive_seed

    seeds: list[int] = []
    manual_seed = torch.manual_seed
    monkeypatch.setattr(cai.generation.hf.torch, "manual_seed", lambda s: seeds.append(s) or manual_seed(s))
    run(make_cfg("stage=sl_data", *SMALL, "generation.batch_size=2", "sl.n_revisions=2", "sl.shard_size=5"))
    assert len(seeds) > 20 and len(set(seeds)) == len(seeds)
    assert derive_seed(0, "ppo", 1, 0) != derive_seed(0, "ppo", 0, 1) and derive_seed(0, "x") == derive_seed(0, "x")
