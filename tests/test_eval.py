"""Evaluation: `stage=all` end to end on the tiny model, the Elo outputs, the frontier plot, multirun reuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, HH_SMALL, TINY_RUN, wandb_runs

import cai
from cai.artifacts import read_jsonl
from cai.errors import CaiError
from cai.models import run_device
from cai.pipeline import PIPELINE, STAGES, run, stage_path
from cai.tracking import documented

TINY = (
    *TINY_RUN,
    "ppo.iterations=4",
    "ppo.rollouts=8",
    "ppo.max_new_tokens=8",
    "ppo.minibatch_size=8",
    "ppo.snapshot_every=2",
    "eval.n_red_team=6",
    "eval.n_helpful=4",
    "eval.max_new_tokens=12",
    "eval.bootstrap=50",
    "sft.lr=1e-3",  # large steps, so that the snapshots answer differently and the judge has work
    "ppo.lr=1e-4",
)


def assert_real_plot(path: Path) -> None:
    """A rendered figure with axes, points and text, not a blank canvas."""
    import matplotlib.image

    img = matplotlib.image.imread(path)  # (H, W, 4) floats in [0, 1]
    assert img.shape[0] > 300 and img.shape[1] > 400
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not one flat colour
    assert len(np.unique((rgb * 255).astype(int), axis=0)) > 50  # lines, markers and anti-aliased text
    assert (np.abs(rgb[:, 0] - rgb[:, 2]) > 0.3).mean() > 1e-4  # coloured series were drawn, not just black axes


def test_stage_all_end_to_end_on_tiny(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("stage=all", *TINY, "logger=csv", f"logger.dir={tmp_path}/log")
    summaries = run(cfg)
    assert [s["stage"] for s in summaries] == list(STAGES)
    out = stage_path(cfg, "eval")
    elo = json.loads((out / "elo.json").read_text())
    labels = [s["label"] for s in elo["snapshots"]]
    assert labels == ["initial", "sft", "ppo@2", "ppo@4"]
    # round robin: 6 pairs of snapshots on every prompt of each axis
    assert elo["games"] == {"harmless": 6 * 6, "helpful": 6 * 4}
    for s in elo["snapshots"]:
        for axis in ("harmless", "helpful"):
            assert s[f"{axis}_low"] <= s[f"{axis}_elo"] + 1e-9 <= s[f"{axis}_high"] + 2e-9
        assert 0 <= s["refusal_rate"] <= 1 and 0 <= s["boilerplate_rate"] <= 1 and 0 < s["mean_length"] <= 12
        assert np.isfinite(s["pm_score"])
    initial = elo["snapshots"][0]
    assert initial["harmless_elo"] == 0.0 and initial["helpful_elo"] == 0.0  # the anchor
    assert_real_plot(out / "frontier.png")
    answers = read_jsonl(out / "answers.jsonl")
    assert len(answers) == 4 * 10 and {a["snapshot"] for a in answers} == set(labels)
    # every judged comparison was written to the cache, with a probability
    judged = read_jsonl(next((tmp_path / "artifacts" / "eval_cache" / "judgements").glob("feedback-*.jsonl")))
    assert judged and all(0 <= j["p_a"] <= 1 for j in judged)
    table = read_jsonl(tmp_path / "log" / "tables" / "eval_judgements.jsonl")
    assert len(table) == 60 and {t["kind"] for t in table} == {"red_team", "helpful"}
    assert len(read_jsonl(tmp_path / "log" / "tables" / "eval_answers.jsonl")) == 4 * 10
    assert "eval/ppo@4/harmless_elo" in (tmp_path / "log" / "metrics.csv").read_text()
    assert summaries[-1]["path"] == str(out / "frontier.png")
    # Every stage's manifest says where each of its models ran: the run's device (here the CPU), float32.
    expected = {
        "sl_data": {"policy"},
        "sft": {"policy"},
        "pairs": {"sft_policy"},
        "label": {"feedback_model"},
        "pm": {"pm"},
        "ppo": {"actor", "ref", "critic", "reward"},
        "eval": {"answers", "judge", "pm_scores"},
    }
    generates = {"sl_data", "pairs", "ppo", "eval"}
    for stage, roles in expected.items():
        manifest = json.loads((stage_path(cfg, stage) / "manifest.json").read_text())
        models = manifest["models"]
        assert set(models) == roles, stage
        # What the stage used (bench_main prints it): time, tokens through the models, its own peak memory.
        usage = manifest["usage"]
        assert usage["seconds"] > 0 and usage["forward_tokens"] > 0 and 0.1 < usage["peak_rss_gb"] < 64, (stage, usage)
        assert (usage["generated_tokens"] > 0) == (stage in generates), (stage, usage)
        assert all(m["device"] == str(run_device()) == "cpu" for m in models.values()), models
        # PPO's frozen ref and reward keep bf16 weights (ppo.frozen_dtype) and compute in float32; the rest is float32.
        frozen = {"ref", "reward"} if stage == "ppo" else set()
        assert all(m["dtype"] == "float32" and "compute_dtype" not in m for r, m in models.items() if r not in frozen), models
        assert all(models[r]["dtype"] == "bfloat16" and models[r]["compute_dtype"] == "float32" for r in frozen), models
    assert all(s["ran_on"].startswith("cpu float32") for s in summaries)
    assert "cpu bfloat16 weights in float32: ref, reward" in next(s["ran_on"] for s in summaries if s["stage"] == "ppo")
    assert_exports(cfg)

    # A second run is all cached: no stage recomputes, no question is put to the judge again.
    again = run(cfg)
    assert all("cached" in s["metric"] for s in again)
    # Fields that change only logging or checkpoints redo nothing: not the stage, not what follows it.
    manifests = {s: (stage_path(cfg, s) / "manifest.json").read_text() for s in STAGES}
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n")
    logging_only = {
        "sft.checkpoint_every": "7",
        "label.report_data": str(hh),
        "label.report_n": "5",
        "label.report_split": "report",
        "label.batch_size": "3",
        "pm.checkpoint_every": "7",
        "pm.eval_data": str(hh),
        "pm.n_eval": "5",
        "pm.checkpoint": str(stage_path(cfg, "pm") / "model"),
        "ppo.checkpoint_every": "7",
        "ppo.table_every": "1",
        "eval.runs": f"[{tmp_path}]",
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.num_nodes": "1",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "true",
        "trainer.log_every_n_steps": "5",
        "trainer.profiler": "simple",
        "trainer.default_root_dir": str(tmp_path / "lightning"),
        "trainer.enable_autolog_hparams": "false",
        "trainer.model_registry": "mine",
        "callbacks.lr_monitor": "null",
    }
    assert set(logging_only) == {f for s in PIPELINE for f in s.logging_only}  # every declared one is tried
    for field, value in logging_only.items():
        changed = make_cfg("stage=all", *TINY, f"{field}={value}")
        assert all("cached" in s["metric"] for s in run(changed)), field
        assert all(stage_path(changed, s) == stage_path(cfg, s) for s in STAGES), field
    assert manifests == {s: (stage_path(cfg, s) / "manifest.json").read_text() for s in STAGES}
    assert elo["judge"]["kind"] == "feedback" and not elo["judge"]["is_reward"] and elo["judge"]["quality"] == {}
    # The default judge is the model that labelled the PM's data: flagged in elo.json and the summary.
    assert elo["judge"]["shares"] == ["labeller"] and elo["judge"]["independent"] is False
    assert "judge not independent: it is this run's labeller" in summaries[-1]["metric"]
    # The PM that PPO optimised is not an independent judge: an error unless asked for, and then the plot says so.
    with pytest.raises(CaiError, match="eval.judge=pm: this run's PM is the reward PPO optimised"):
        run(make_cfg("stage=eval", *TINY, "eval.judge=pm"))
    own_dir = str(stage_path(cfg, "pm") / "model")
    with pytest.raises(CaiError, match="eval.judge_pm: .* is this run's own PM"):
        run(make_cfg("stage=eval", *TINY, "eval.judge=pm", f"eval.judge_pm={own_dir}"))
    # Asked for: only the eval stage runs again; answers come from the cache; elo.json names the judge.
    [pm_eval] = run(make_cfg("stage=eval", *TINY, "eval.judge=pm", "eval.judge_own_pm=true"))
    pm_elo = json.loads((Path(pm_eval["path"]).parent / "elo.json").read_text())
    assert [s["answers"] for s in pm_elo["snapshots"]] == [s["answers"] for s in elo["snapshots"]]
    assert pm_elo["judge"]["kind"] == "pm" and pm_elo["judge"]["is_reward"] and own_dir in pm_elo["judge"]["identity"]
    assert pm_elo["judge"]["shares"] == ["reward model"] and "it is this run's reward model" in pm_eval["metric"]

    # Interrupted judging resumes: half the verdicts and a torn line are left; only the rest is asked.
    from cai.arena import make_judge
    from cai.labels import Labeller

    cache = next((tmp_path / "artifacts" / "eval_cache" / "judgements").glob("feedback-*.jsonl"))
    lines = cache.read_text().splitlines()
    keep = len(lines) // 2
    cache.write_text("\n".join(lines[:keep]) + "\n" + lines[keep][:20])
    asked: list[int] = []
    label = Labeller.label
    monkeypatch.setattr(Labeller, "label", lambda self, items, desc="": asked.append(len(items)) or label(self, items, desc))
    cfg2 = make_cfg("stage=eval", *TINY, "eval.bootstrap=60")  # another eval config: the same answers and judge
    run(cfg2)
    assert sum(asked) == len(lines) - keep
    assert len(make_judge(cfg2).cached()) == len(lines)

    # Verdicts are keyed by content: shorter answers (eval.max_new_tokens) are all judged again, each
    # distinct pair of texts once, and the Elo equals that of a cold run with no cache at all.
    from cai.arena import verdict_key

    before = set(make_judge(cfg2).cached())
    asked.clear()
    shorter = make_cfg("stage=eval", *TINY, "eval.max_new_tokens=6")
    [warm] = run(shorter)
    rows = read_jsonl(Path(warm["path"]).parent / "answers.jsonl")
    by_snapshot: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_snapshot.setdefault(r["snapshot"], {})[r["id"]] = r
    names = list(by_snapshot)
    new = set()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for pid, ra in by_snapshot[a].items():
                rb = by_snapshot[b][pid]
                forward, backward = verdict_key(ra, rb), verdict_key(rb, ra)
                if ra["response"].strip() != rb["response"].strip() and not ({forward, backward} & before | {backward} & new):
                    new.add(forward)
    assert new and sum(asked) == len(new)  # every changed pair, and nothing else, went to the judge
    warm_elo = json.loads((Path(warm["path"]).parent / "elo.json").read_text())["snapshots"]
    shutil.rmtree(Path(warm["path"]).parent)
    for f in (tmp_path / "artifacts" / "eval_cache" / "judgements").iterdir():
        f.unlink()
    [cold] = run(shorter)
    cold_elo = json.loads((Path(cold["path"]).parent / "elo.json").read_text())["snapshots"]
    assert [(s["harmless_elo"], s["helpful_elo"]) for s in cold_elo] == [(s["harmless_elo"], s["helpful_elo"]) for s in warm_elo]

    # The judge's quality, measured on human comparisons, per axis: in elo.json with its interval.
    # Another system's answers rated with the run: a copy of the initial model's answers ties it on every prompt.
    initial = [r for r in read_jsonl(out / "answers.jsonl") if r["snapshot"] == "initial"]
    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in initial))
    [with_copy] = run(make_cfg("stage=eval", *TINY, f"eval.external=[copy:{copy}]"))
    rated = json.loads((Path(with_copy["path"]).parent / "elo.json").read_text())
    [ext] = [s for s in rated["snapshots"] if s["label"] == "ext:copy"]
    assert ext["order"] == -1 and rated["runs"]["ext:copy"] == [ext["key"]] and rated["games"]["harmless"] == 10 * 6
    for axis in ("harmless", "helpful"):
        assert ext[f"{axis}_low"] <= 0.0 <= ext[f"{axis}_high"] and abs(ext[f"{axis}_elo"]) < 60

    checked = make_cfg("stage=eval", *TINY, f"eval.judge_check={HH_SMALL}", f"eval.judge_check_helpful={HH_SMALL}", "eval.judge_check_n=10")
    [done] = run(checked)
    quality = json.loads((Path(done["path"]).parent / "elo.json").read_text())["judge"]["quality"]
    assert set(quality) == {"harmless", "helpful"}
    for q in quality.values():
        assert q["comparisons"] == 10 and 0 <= q["interval_95"][0] <= q["agreement"] <= q["interval_95"][1] <= 1


def test_answer_sets_of_other_systems_are_rated_without_any_run(make_cfg, tmp_path):
    """stage=frontier with eval.external alone: a judge PM that learned refusals are unhelpful ranks them last;
    two copies of one answer set tie on every prompt."""
    human = (
        "model=tiny",
        "label=human",
        f"label.data={FIXTURES / 'hh_helpful_refusals.jsonl.gz'}",
        "pm.lr=1e-3",
        "pm.epochs=4",
        "pm.batch_size=4",
    )
    run(make_cfg("stage=label", *human))
    [pm] = run(make_cfg("stage=pm", *human))
    sets = f"[real:{FIXTURES / 'answers_helpful.jsonl'},again:{FIXTURES / 'answers_helpful.jsonl'},refusals:{FIXTURES / 'answers_refusals.jsonl'}]"
    cfg = make_cfg(
        "stage=frontier",
        "model=tiny",
        "eval.judge=pm",
        f"eval.judge_pm={pm['path']}",
        f"eval.external={sets}",
        "logger=csv",
        f"logger.dir={tmp_path}/log",
    )
    [done] = run(cfg)
    elo = json.loads((Path(done["path"]).parent / "elo.json").read_text())
    by = {s["label"]: s for s in elo["snapshots"]}
    assert set(by) == {"ext:real", "ext:again", "ext:refusals"} and set(elo["runs"]) == set(by)
    assert elo["games"] == {"harmless": 0, "helpful": 3 * 8}  # helpfulness prompts only: one axis measured
    assert by["ext:refusals"]["helpful_elo"] < min(by["ext:real"]["helpful_elo"], by["ext:again"]["helpful_elo"]) - 200
    table = read_jsonl(tmp_path / "log" / "tables" / "frontier_judgements.jsonl")
    copies = [t for t in table if {t["snapshot_a"], t["snapshot_b"]} == {"ext:real", "ext:again"}]
    assert len(copies) == 8 and all(t["p_a"] == 0.5 for t in copies)  # a set against itself: a tie on every prompt
    assert_real_plot(Path(done["path"]))


def test_a_retrained_policy_is_rated_afresh(make_cfg, tmp_path, monkeypatch):
    """Snapshots are keyed by their weights: a PPO retrained under the same config into other weights
    (its directory deleted; here a learning rate the config does not see stands in for another device
    count or GPU nondeterminism) gets new answers and a new Elo, not the old ones from the cache."""
    import cai.stages.ppo

    cfg = make_cfg("stage=all", *TINY, "ppo.iterations=2", "ppo.snapshot_every=2")
    run(cfg)
    before = {s["label"]: s for s in json.loads((stage_path(cfg, "eval") / "elo.json").read_text())["snapshots"]}
    shutil.rmtree(stage_path(cfg, "ppo"))
    adamw = cai.stages.ppo.adamw
    monkeypatch.setattr(cai.stages.ppo, "adamw", lambda params, lr, trainer=None, clips=False: adamw(params, lr * 30, trainer, clips))
    summaries = {s["stage"]: s for s in run(cfg)}
    assert all("cached" in summaries[s]["metric"] for s in ("sl_data", "sft", "pairs", "label", "pm"))
    assert "cached" not in summaries["ppo"]["metric"] and "cached" not in summaries["eval"]["metric"]
    after = {s["label"]: s for s in json.loads((stage_path(cfg, "eval") / "elo.json").read_text())["snapshots"]}
    assert set(after) == set(before) == {"initial", "sft", "ppo@2"}
    assert after["initial"]["key"] == before["initial"]["key"] and after["sft"]["key"] == before["sft"]["key"]
    assert after["ppo@2"]["key"] != before["ppo@2"]["key"]  # a new player, answering anew


def test_eval_before_ppo_says_what_to_run_and_writes_nothing(make_cfg, tmp_path):
    with pytest.raises(CaiError, match="stage 'eval' needs the output of stage 'sft'.*python train.py stage=sft"):
        run(make_cfg("stage=eval", "model=tiny"))
    assert not (tmp_path / "artifacts" / "eval").exists()
    with pytest.raises(CaiError, match="eval.runs: no finished evaluation"):
        run(make_cfg("stage=frontier", "model=tiny"))


def assert_exports(cfg) -> None:
    """What SFT trained on as chat rows and the labels as preference rows, as `datasets` loads them; a card per model."""
    from datasets import load_dataset

    sft, label = stage_path(cfg, "sft"), stage_path(cfg, "label")
    counts = {s: json.loads((stage_path(cfg, s) / "manifest.json").read_text())["counts"] for s in ("sft", "label")}
    train = load_dataset("json", data_files=str(sft / "data" / "train.jsonl"), split="train")
    assert len(train) == counts["sft"]["train_examples"] and train.column_names == ["messages"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"].strip() for r in train)
    prefs = load_dataset("json", data_files=str(label / "preferences.jsonl"), split="train")
    assert len(prefs) == counts["label"]["labels"]
    assert {"prompt", "chosen", "rejected", "p_chosen", "principles", "p_chosen_by_principle"} <= set(prefs.column_names)
    for r, row in zip(prefs, read_jsonl(label / "shard-00000.jsonl")):
        assert 0.5 <= r["p_chosen"] <= 1 and r["prompt"] == row["conversation"] and r["chosen"][0]["role"] == "assistant"
        assert {r["chosen"][0]["content"], r["rejected"][0]["content"]} == {row["response_a"], row["response_b"]}
        assert len(r["principles"]) == len(r["p_chosen_by_principle"]) >= 1
    for stage, n in (("sft", 1), ("pm", 1), ("ppo", 3)):  # ppo: the final policy and two snapshots
        cards = sorted(stage_path(cfg, stage).rglob("README.md"))
        assert len(cards) == n, (stage, cards)
        for card in cards:
            text = card.read_text()
            assert text.startswith("---\nlibrary_name: transformers") and stage_path(cfg, stage).name in text
            assert "## Measured when it was made" in text and "from_pretrained" in text


def test_multirun_shares_upstream_stages_and_draws_one_frontier(tmp_path):
    """The ablation-grid recipe (`python train.py -m label=hard,soft,cot`): one SL data/SFT/pairs artifact, three
    label/PM/PPO/eval, one frontier, and in W&B (offline) one group of four runs named by what varies, linked
    through lineage-keyed artifacts; every key they logged is in the metrics reference."""
    env = {**os.environ, "CAI_ROOT": str(tmp_path), "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.setdefault("CAI_CACHE", str(tmp_path / "cache"))
    own = (*TINY, "label.cot_max_new_tokens=8", "logger=wandb")
    cmd = ["bash", str(cai.ROOT / "recipes" / "ablation_grid.sh"), *own]  # LABELS defaults to hard,soft,cot
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    art = tmp_path / "artifacts"

    def lineages(stage: str) -> list[Path]:
        return [d for d in (art / stage).iterdir() if d.is_dir() and d.name != "latest"]

    for stage in ("sl_data", "sft", "pairs"):
        assert len(lineages(stage)) == 1, stage  # computed once, reused by the other two jobs
    for stage in ("label", "pm", "ppo", "eval"):
        assert len(lineages(stage)) == 3, stage
    kinds = {json.loads((d / "manifest.json").read_text())["config"]["label"]["kind"] for d in lineages("label")}
    assert kinds == {"hard", "soft", "cot"}
    # Each job redrew the group's frontier as its eval ended (over 1, 2, then 3 runs): the last one merged all
    # three, initial and SFT shared, each run's PPO snapshots its own.
    frontiers = sorted(lineages("frontier"), key=lambda d: len(json.loads((d / "elo.json").read_text())["runs"]))
    assert [len(json.loads((d / "elo.json").read_text())["runs"]) for d in frontiers] == [1, 2, 3]
    elo = json.loads((frontiers[-1] / "elo.json").read_text())
    assert len(elo["snapshots"]) == 2 + 3 * 2
    assert sum(s["label"] == "sft" for s in elo["snapshots"]) == 1
    assert set(elo["runs"]) == {"label=hard", "label=soft", "label=cot"}
    assert_real_plot(frontiers[-1] / "frontier.png")

    runs = wandb_runs(tmp_path / "multirun")
    assert sorted(r["name"] for r in runs) == ["label=cot", "label=hard", "label=soft"]
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"].startswith("multirun-")
    assert sorted(r["job_type"] for r in runs) == ["all", "all", "all"]
    # ... and logged it into the group, as W&B wrote it: the last job's table has every job's snapshots, one judge.
    from cai.stages.frontier import GROUP_COLUMNS

    tables = [json.loads(t.read_text()) for t in tmp_path.glob("multirun/**/media/table/frontier/group/table_*.table.json")]
    assert sorted(len(t["data"]) for t in tables) == [4, 6, 8]  # initial + sft + two PPO snapshots of 1, 2, 3 runs
    last = max(tables, key=lambda t: len(t["data"]))
    assert last["columns"] == GROUP_COLUMNS
    rows = [dict(zip(GROUP_COLUMNS, r)) for r in last["data"]]
    [shared] = [r for r in rows if r["snapshot"] == "sft"]
    assert set(shared["run"].split(", ")) == {"label=hard", "label=soft", "label=cot"}
    assert {r["run"] for r in rows if "ppo@" in r["snapshot"]} == {"label=hard", "label=soft", "label=cot"}
    assert len({r["judge"] for r in rows}) == 1 and all(isinstance(r["harmless_elo"], float) for r in rows)
    assert len(list(tmp_path.glob("multirun/**/media/images/frontier/group/plot_*.png"))) == 3
    logged = [a["name"] for r in runs for a in r["artifacts"]]
    sft_key = lineages("sft")[0].name
    assert logged.count(f"sft_model-{sft_key}") == 1  # logged by the job that trained it, under its lineage key
    users = [r for r in runs if f"sft_model-{sft_key}" in r["config"]["_meta"].get("uses", [])]
    assert len(users) == 3  # the trainer's PPO read it, and so did the two jobs that found it cached
    # A table or an image is one key to cai; W&B records its fields under it (path, sha256, ...); `_step` & co. are W&B's own.
    fields = {
        "_type",
        "_latest_artifact_path",
        "artifact_path",
        "log_mode",
        "ncols",
        "nrows",
        "path",
        "sha256",
        "size",
        "format",
        "height",
        "width",
    }
    keys = {k.rsplit("/", 1)[0] if k.rsplit("/", 1)[-1] in fields else k for r in runs for k in r["history_keys"] if not k.startswith("_")}
    assert {"sft/train/loss", "pm/val/ece", "ppo/train/kl", "eval/summary/harmless_elo", "frontier/group/table", "ppo/rollouts"} <= keys
    assert sorted(k for k in keys if not documented(k)) == []  # docs/reference/metrics.md has every key

    # Everything cached: the job runs no stage and opens no W&B run.
    again = subprocess.run(
        [sys.executable, str(cai.ROOT / "train.py"), "label=hard", *own], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(cached)" in again.stdout and not list((tmp_path / "outputs").rglob("offline-run-*"))


def test_run_names_drop_the_overrides_every_run_shares():
    from cai.stages.frontier import short_names

    assert short_names(["label=hard,model=tiny", "label=soft,model=tiny"]) == ["label=hard", "label=soft"]
    assert short_names(["model=tiny"]) == ["model=tiny"]  # one run keeps its whole name
    assert short_names(["default", "label=hard"]) == ["default", "label=hard"]


def test_answer_sets_without_a_kind_say_what_is_missing(make_cfg, tmp_path):
    """Two answer sets sharing their prompts, rows with no `kind`: the error names the missing field and
    the command-line form; NAME:FILE:KIND gives the set its axis."""
    rows = [json.loads(line) for line in (FIXTURES / "answers_helpful.jsonl").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) + "\n" for r in rows))
    base = ("stage=frontier", "model=tiny", "eval.bootstrap=20")
    with pytest.raises(CaiError, match=r"rows name no 'kind'.*eval.external=\[a:.*bare.jsonl:helpful\]"):
        run(make_cfg(*base, f"eval.external=[a:{bare},b:{bare}]"))
    [done] = run(make_cfg(*base, f"eval.external=[a:{bare}:helpful,b:{bare}:helpful]"))
    elo = json.loads((Path(done["path"]).parent / "elo.json").read_text())
    assert elo["games"] == {"harmless": 0, "helpful": len(rows)}


def test_a_group_judged_by_two_judges_draws_no_frontier(tmp_path):
    """Runs judged by different feedback models have Elos on different scales: no group frontier, and the fix named."""
    from cai.stages.frontier import one_judge

    found = {}
    for name, judge in (("model=a", "feedback model a"), ("model=b", "feedback model b"), ("model=c", "feedback model a")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "elo.json").write_text(json.dumps({"judge": {"key": judge, "identity": judge}}))
        found[tmp_path / name] = name
    with pytest.raises(CaiError, match=r"group g: .*different judges \(feedback model a: model=a, model=c; feedback model b: model=b\)"):
        one_judge(found, "g")
    with pytest.raises(CaiError, match=r"set eval.judge=pm with eval.judge_pm=DIR .*model@feedback_model="):
        one_judge(found, "g")
    one_judge({p: n for p, n in found.items() if n != "model=b"}, "g")  # one judge: drawn


def test_exports_train_with_trl(make_cfg, tmp_path):
    """The exports are what TRL reads: the SL data trains `SFTTrainer` from cai's SFT model, the preference
    rows train `RewardTrainer` from cai's PM (RewardBench's format), one step each, with a finite loss."""
    pytest.importorskip("trl", reason="TRL, a peer framework: pip install -e '.[dev]' brings it")
    from datasets import load_dataset
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    for stage in ("sl_data", "sft", "pairs", "label", "pm"):
        run(make_cfg(f"stage={stage}", *TINY))
    cfg = make_cfg(*TINY)
    common = {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none", "use_cpu": True, "save_strategy": "no"}
    sft = stage_path(cfg, "sft")
    data = load_dataset("json", data_files=str(sft / "data" / "train.jsonl"), split="train")
    trainer = SFTTrainer(model=str(sft / "model"), args=SFTConfig(str(tmp_path / "trl_sft"), max_length=128, **common), train_dataset=data)
    assert np.isfinite(trainer.train().training_loss)
    prefs = load_dataset("json", data_files=str(stage_path(cfg, "label") / "preferences.jsonl"), split="train")
    pm = stage_path(cfg, "pm") / "model"
    trainer = RewardTrainer(model=str(pm), args=RewardConfig(str(tmp_path / "trl_rm"), max_length=128, **common), train_dataset=prefs)
    assert np.isfinite(trainer.train().training_loss)
