"""Shipped prompt sets and the readers for hh-rlhf and MT-bench files."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HH_DEV, HH_SMALL, MT_BENCH, MT_BENCH_SMALL, TINY_RUN, needs_shared_data

import cai
from cai.data import load_prompts, read_hh_rlhf, read_prompt_file
from cai.errors import CaiError


@pytest.mark.parametrize("kind", ["red_team", "helpful"])
def test_shipped_sets_have_200_prompts_split_train_test(kind):
    train, test = load_prompts(kind, split="train"), load_prompts(kind, split="test")
    assert len(train) + len(test) >= 200
    assert len(test) >= 30
    assert not {p.text for p in train} & {p.text for p in test}
    assert len({p.id for p in train + test}) == len(train) + len(test)
    assert all(p.text.strip() for p in train + test)
    assert len(load_prompts(kind, n=8)) == 8


def test_hh_rlhf_reader_on_a_small_file():
    comps = read_hh_rlhf(HH_SMALL)
    assert len(comps) == 40 and all(c.conversation == [{"role": "user", "content": c.conversation[0]["content"]}] for c in comps)
    assert all(c.chosen != c.rejected for c in comps)


@needs_shared_data
def test_hh_rlhf_reader_on_the_dev_split():
    comps = read_hh_rlhf(HH_DEV)
    assert len(comps) > 1100
    for c in comps[:50]:
        assert c.conversation[-1]["role"] == "user" and c.chosen != c.rejected
        assert all(m["role"] in ("user", "assistant") for m in c.conversation)


def test_hh_rlhf_reader_handles_plain_jsonl_and_bad_rows(tmp_path):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [c] = read_hh_rlhf(path)
    assert (c.conversation, c.chosen, c.rejected) == ([{"role": "user", "content": "hi"}], "hello", "go away")
    path.write_text(json.dumps({"chosen": "x"}) + "\n")
    with pytest.raises(
        CaiError, match=r"x.jsonl: line 1: not a preference row \(fields: chosen\); accepted: hh-rlhf .* TRL conversational"
    ):
        read_hh_rlhf(path)
    gz = tmp_path / "y.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(row) + "\n")
    assert len(read_hh_rlhf(gz)) == 1


def test_mt_bench_reader():
    qs = read_prompt_file(MT_BENCH_SMALL)
    assert [q.id for q in qs] == ["100", "101", "102"] and qs[0].category == "writing"
    assert qs[0].text == "Write a short poem about autumn leaves."  # the first turn stands alone


@needs_shared_data
def test_mt_bench_reader_on_the_real_questions():
    qs = read_prompt_file(MT_BENCH)
    assert len(qs) == 80 and qs[0].id == "81" and qs[0].category == "writing"


def test_prompt_files_txt_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\nthree\nfour\nfive\n")
    assert [p.text for p in read_prompt_file(txt)] == ["one", "two", "three", "four", "five"]
    assert [p.text for p in load_prompts("red_team", str(txt), "test")] == ["five"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CaiError, match=r"data.red_team: .*empty.jsonl: the prompt file is empty"):
        load_prompts("red_team", str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(CaiError, match=r"bad.jsonl: line 1: no prompt text; each row needs one of 'prompt', 'text', 'messages'"):
        read_prompt_file(bad)


def test_prompt_files_in_the_formats_people_have(tmp_path):
    """`prompt`, `text`, a `messages` chat list (its first user turn) and MT-bench `turns` all read as prompts."""
    rows = [
        {"prompt": "from prompt"},
        {"text": "from text"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "from messages"}]},
        {"turns": ["from turns", "a follow-up"]},
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.text for p in read_prompt_file(f)] == ["from prompt", "from text", "from messages", "from turns"]
    f.write_text(json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}) + "\n")
    with pytest.raises(CaiError, match="no prompt text"):
        read_prompt_file(f)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_prompt_files_through_datasets(tmp_path, suffix):
    """A parquet or CSV prompt set (a `messages` column, JSON in a CSV cell) reads as the JSONL one does."""
    datasets = pytest.importorskip("datasets")
    chat = [{"role": "user", "content": "from messages"}]
    rows = [{"messages": json.dumps(chat) if suffix == ".csv" else chat}, {"messages": json.dumps(chat) if suffix == ".csv" else chat}]
    path = tmp_path / f"prompts{suffix}"
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(path)) if suffix == ".parquet" else table.to_csv(str(path))
    assert [p.text for p in read_prompt_file(path)] == ["from messages", "from messages"]
    with pytest.raises(CaiError, match=r"data.red_team: prompt file: .*prompts.tsv' is not .jsonl"):
        (tmp_path / "prompts.tsv").write_text("x")
        load_prompts("red_team", str(tmp_path / "prompts.tsv"))


USER = {"role": "user", "content": "How do I pick a lock?"}
GOOD = {"role": "assistant", "content": "I can't help with breaking into places, but a locksmith can."}
BAD = {"role": "assistant", "content": "Use a tension wrench and rake the pins."}
PREFERENCE_ROWS = {
    "trl_conversational_implicit": {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "trl_conversational_explicit": {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    "trl_standard": {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]},
    "hh_rlhf": {
        "chosen": f"\n\nHuman: {USER['content']}\n\nAssistant: {GOOD['content']}",
        "rejected": f"\n\nHuman: {USER['content']}\n\nAssistant: {BAD['content']}",
    },
}


@pytest.mark.parametrize("kind", sorted(PREFERENCE_ROWS))
def test_preference_files_in_the_formats_people_have(tmp_path, kind):
    """hh-rlhf transcripts and TRL's preference formats give the same comparison."""
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PREFERENCE_ROWS[kind]) + "\n")
    [c] = read_hh_rlhf(path)
    assert (c.conversation, c.chosen, c.rejected) == ([USER], GOOD["content"], BAD["content"])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_preference_files_through_datasets(tmp_path, suffix):
    """.parquet, .csv and .json go through datasets.load_dataset; a CSV cell holds a message list as JSON."""
    datasets = pytest.importorskip("datasets")
    rows = [PREFERENCE_ROWS["trl_standard"], PREFERENCE_ROWS["trl_standard"]]
    if suffix == ".csv":
        rows = [{k: json.dumps(v) for k, v in PREFERENCE_ROWS["trl_conversational_explicit"].items()}] * 2
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"prefs{suffix}"
    {".parquet": table.to_parquet, ".csv": table.to_csv, ".json": table.to_json}[suffix](str(path))
    comparisons = read_hh_rlhf(path, field="label.data")
    assert len(comparisons) == 2 and comparisons[0].chosen == GOOD["content"] and comparisons[0].conversation == [USER]


def test_a_preference_file_of_another_kind_names_the_accepted_formats(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"question": "q", "answer_a": "a", "answer_b": "b", "winner": "a"}) + "\n")
    with pytest.raises(CaiError, match=r"line 1: not a preference row \(fields: answer_a, answer_b, question, winner\); accepted: hh-rlhf"):
        read_hh_rlhf(path)
    with pytest.raises(CaiError, match=r"label.data: .*prefs.xlsx' is not .jsonl, .jsonl.gz, .json, .parquet or .csv"):
        (tmp_path / "prefs.xlsx").write_text("x")
        read_hh_rlhf(tmp_path / "prefs.xlsx", field="label.data")


def test_label_human_runs_on_a_trl_file(make_cfg, tmp_path):
    """Through the pipeline: label=human reads a TRL conversational file as it reads hh-rlhf."""
    from conftest import TINY_RUN

    from cai.pipeline import run, stage_path

    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(PREFERENCE_ROWS["trl_conversational_implicit"]) + "\n" for _ in range(6)))
    cfg = make_cfg("stage=label", *TINY_RUN, "label=human", f"label.data={path}")
    run(cfg)  # human labels read no upstream stage
    labels = [json.loads(line) for f in sorted(stage_path(cfg, "label").glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
    assert labels and {row["conversation"][0]["content"] for row in labels} == {USER["content"]}


def test_a_subset_is_a_stratified_seeded_sample_in_file_order():
    from cai.data import Prompt, sample_prompts

    rows = [Prompt(id=f"{c}-{i}", text="t", category=c) for c in "abcdef" for i in range(10)]  # sorted by category
    picked = sample_prompts(rows, 12, "0:red_team:train")
    assert len(picked) == 12 and {p.category for p in picked} == set("abcdef")
    assert all(sum(p.category == c for p in picked) == 2 for c in "abcdef")  # two per category
    assert picked == sorted(picked, key=rows.index)  # file order kept
    assert picked == sample_prompts(rows, 12, "0:red_team:train") and picked != sample_prompts(rows, 12, "1:red_team:train")
    assert len({p.category for p in sample_prompts(rows, 4, "0")}) == 4
    assert sample_prompts(rows, 0, "0") == rows and sample_prompts(rows, 100, "0") == rows
    plain = [Prompt(id=str(i), text="t") for i in range(50)]  # no categories: a plain seeded sample
    assert sample_prompts(plain, 10, "0") != plain[:10]


def cached_hub_dataset(cache: Path, repo_id: str, data_file: Path, data_dir: str | None = None) -> None:
    """Put `data_file` into a datasets cache at `cache` as `load_dataset(repo_id, data_dir=data_dir)` leaves it
    after an online load, so that an offline load by name finds it (these machines cannot reach the Hub)."""
    import datasets

    staging = cache / "staging" / repo_id.replace("/", "_")
    datasets.load_dataset("json", data_files={"train": str(data_file)}, cache_dir=str(staging))
    [leaf] = [p for p in (staging / "json").glob("*/*/*") if p.is_dir()]
    config = datasets.BuilderConfig("default").create_config_id(config_kwargs={"data_dir": data_dir} if data_dir else {})
    dest = cache / repo_id.replace("/", "___") / config / leaf.parent.name / leaf.name
    shutil.copytree(leaf, dest)
    for f in dest.glob("json-*"):  # the arrow files are named after the dataset
        f.rename(f.with_name(f.name.replace("json-", repo_id.split("/")[-1] + "-", 1)))


def test_hub_datasets_by_name_from_the_offline_cache(tmp_path):
    """`label.data=hf:Anthropic/hh-rlhf:harmless-base:train` and `data.red_team=hf:...` through `python train.py`,
    offline, from the local datasets cache; the label stage is keyed by the dataset's fingerprint; a dataset
    that is neither on the (unreachable) Hub nor in the cache is one line naming the field."""
    cache = tmp_path / "datasets"
    cached_hub_dataset(cache, "Anthropic/hh-rlhf", HH_SMALL, data_dir="harmless-base")
    cached_hub_dataset(cache, "someone/red-team-prompts", MT_BENCH_SMALL)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "CAI_ROOT": str(tmp_path)}
    hub = ["label.data=hf:Anthropic/hh-rlhf:harmless-base:train", "data.red_team=hf:someone/red-team-prompts"]
    args = [sys.executable, str(cai.ROOT / "train.py"), *TINY_RUN, "logger=none", "stage=label", "label=human"]
    done = subprocess.run([*args, *hub], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "artifacts" / "label" / "latest" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["labels"] == len(read_hh_rlhf(HH_SMALL))
    assert len(manifest["inputs"]["data"]) == 16  # the dataset's fingerprint, not a file's hash
    missing = subprocess.run(
        [*args, "label.data=hf:nobody/nothing:train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert missing.returncode == 1
    [line] = missing.stderr.strip().splitlines()
    assert line.startswith("error: label.data: could not load 'hf:nobody/nothing:train'"), line
    with pytest.raises(CaiError, match="pm.eval_data: 'hf:a:b:c:d' is not hf:NAME"):
        read_hh_rlhf("hf:a:b:c:d", field="pm.eval_data")
