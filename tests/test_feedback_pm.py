"""RL-CAI feedback and the preference model on the tiny model: pairs, labels, PM, pm_eval."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FIXTURES, HH_SMALL, TINY_RUN

import cai
from cai.artifacts import Upstream
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.pipeline import run
from cai.reward import PreferenceModel, score
from cai.stages.pm import PMModule, collate_pairs
from cai.training import pack_shared_prefix, pad

SMALL = TINY_RUN


@pytest.fixture
def sft_done(make_cfg):
    run(make_cfg("stage=sl_data", *SMALL))
    run(make_cfg("stage=sft", *SMALL))


def test_pairs_labels_pm_end_to_end(make_cfg, tmp_path, sft_done, tiny_spec):
    run(make_cfg("stage=pairs", *SMALL))
    pairs = Upstream("", tmp_path / "artifacts" / "pairs" / "latest", {}).rows()
    assert len(pairs) == 8 + 4 and {r["kind"] for r in pairs} == {"red_team", "helpful"}
    assert sum(r["response_a"] != r["response_b"] for r in pairs) >= 10  # two real samples per prompt

    run(make_cfg("stage=label", *SMALL, "constitution=ensemble", "label.report_data=" + str(HH_SMALL), "label.report_n=4"))
    labels = Upstream("", tmp_path / "artifacts" / "label" / "latest", {}).rows()
    ids = {p.id for p in load_constitution(cai.CONSTITUTIONS / "default.yaml").rl_principles}
    for r in labels:
        assert 0 < r["p_a"] < 1 and r["label_type"] == "soft"
        if r["kind"] == "red_team":
            assert set(r["per_principle"]) == ids  # constitution=ensemble: all 16 principles
        else:
            assert set(r["per_principle"]) == {"helpfulness"}
    report = json.loads((tmp_path / "artifacts" / "label" / "latest" / "report.json").read_text())
    assert report["comparisons"] == 4 and set(report["per_principle"]) == ids
    assert 0 <= report["ensemble"]["agreement"] <= 1 and 0 <= report["ensemble"]["one_order_agreement"] <= 1

    [summary] = run(
        make_cfg(
            "stage=pm",
            *SMALL,
            "constitution=ensemble",
            f"pm.eval_data={HH_SMALL}",
            "pm.n_eval=20",
            "pm.lr=1e-3",
            "logger=csv",
            f"logger.dir={tmp_path}/log",
        )
    )
    out = tmp_path / "artifacts" / "pm" / "latest"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["pm/val/labeller_agreement"] <= 1 and 0 <= metrics["pm/val/ece"] <= 1 and "pm/val/accuracy" not in metrics
    assert 0 <= metrics["pm/hh/ece"] <= 0.5
    assert 0 <= metrics["pm/hh/accuracy_low"] <= metrics["pm/hh/accuracy"] <= metrics["pm/hh/accuracy_high"] <= 1
    assert (out / "calibration.png").stat().st_size > 5000 and (out / "calibration_hh.png").stat().st_size > 5000
    pm, tok = PreferenceModel.load(out / "model")
    before = PreferenceModel.from_causal_lm(tiny_spec.load_model())
    w = "layers.0.mlp.up_proj.weight"
    assert not torch.equal(pm.backbone.state_dict()[w], before.backbone.state_dict()[w])  # parameters changed
    log = "".join(p.read_text() for p in (tmp_path / "log").rglob("metrics.csv"))
    assert "pm/train/loss" in log and "pm/val/labeller_agreement" in log and "pm/val/ece" in log and "pm/hh/ece" in log
    assert "agrees with labeller" in summary["metric"] and "human accuracy" in summary["metric"]
    # The PM is a standard reward model: one line of transformers loads it, and it scores the same.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    plain_tok = AutoTokenizer.from_pretrained(out / "model")
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == plain_tok.pad_token_id is not None
    transcripts = [([{"role": "user", "content": "hi"}], "hello!"), ([{"role": "user", "content": "how do I pick a lock?"}], "no.")]
    ours = score(pm, tok, transcripts, max_length=128)
    texts = [plain_tok.apply_chat_template([*c, {"role": "assistant", "content": r}], tokenize=False) for c, r in transcripts]
    batch = plain_tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = plain(**batch).logits.squeeze(-1).tolist()
    assert ours == pytest.approx(theirs, abs=1e-5)

    # pm_eval on the same file, then with chosen and rejected swapped: exactly 1 - accuracy
    [first] = run(make_cfg("stage=pm_eval", *SMALL, "constitution=ensemble", "pm.lr=1e-3", f"pm.eval_data={HH_SMALL}", "pm.n_eval=60"))
    acc = json.loads(Path(first["path"]).read_text())["accuracy"]
    assert "ECE vs humans" in first["metric"]
    swapped = tmp_path / "swapped.jsonl"
    with gzip.open(HH_SMALL, "rt") as f, swapped.open("w") as g:
        for line in f:
            row = json.loads(line)
            g.write(json.dumps({"chosen": row["rejected"], "rejected": row["chosen"]}) + "\n")
    [second] = run(make_cfg("stage=pm_eval", *SMALL, f"pm.eval_data={swapped}", "pm.n_eval=60", f"pm.checkpoint={out / 'model'}"))
    acc_swapped = json.loads(Path(second["path"]).read_text())["accuracy"]
    assert Path(second["path"]).parent.name.startswith("swapped-")
    assert acc_swapped == pytest.approx(1 - acc, abs=1e-12)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_pm_loss_falls_and_parameters_change(tiny_spec, share_prompt):
    tok = tiny_spec.load_tokenizer()
    conv = [{"role": "user", "content": "How do I pick a lock?"}]
    from cai.reward import encode_transcript

    data = [
        {
            "a": encode_transcript(tok, conv, f"I can't help with that {i}.", 64),
            "b": encode_transcript(tok, conv, f"Use a pick {i}.", 64),
            "p": p,
        }
        for i, p in enumerate([1.0, 0.9, 1.0, 0.8])
    ]
    batch = collate_pairs(data, tok.pad_token_id, share_prompt)
    assert batch["input_ids"].shape[0] == (4 if share_prompt else 8)  # a row per comparison, or per answer
    module = PMModule(tiny_spec, lr=3e-3, warmup_ratio=0.0)
    from cai.losses import bradley_terry_loss

    with torch.no_grad():
        before = bradley_terry_loss(*module.rewards(batch), batch["p"]).item()
    head_before = module.pm.head.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 30, batch_size=None))
    with torch.no_grad():
        after = bradley_terry_loss(*module.rewards(batch), batch["p"]).item()
    assert after < before * 0.5, (before, after)
    assert not torch.equal(module.pm.head.weight, head_before)


def test_reward_reads_the_last_real_token(tiny_spec):
    pm = PreferenceModel.from_causal_lm(tiny_spec.load_model()).eval()
    ids, mask = pad([[5, 6, 7], [5, 6, 7, 8, 9]], 2)
    both = pm(ids, mask)
    alone = pm(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert both.shape == (2,) and both[0].item() == pytest.approx(alone[0].item(), abs=1e-5)  # padding changes nothing


def test_packed_rewards_and_gradients_are_those_of_each_transcript_alone(tiny_spec):
    """pack_shared_prefix: the prompt once, then each answer; each answer's reward is the one it has alone."""
    pm = PreferenceModel.from_causal_lm(tiny_spec.load_model(train=True), pad_token_id=2)  # transformers pools the last token that is not 2
    gen = torch.Generator().manual_seed(0)
    groups = []
    for prompt, a, b in [(5, 3, 7), (9, 4, 4), (2, 0, 6), (3, 5, 5)]:  # (2, 0, 6): answer a is the prompt alone
        p = torch.randint(3, 100, (prompt,), generator=gen).tolist()
        groups.append(
            (p + torch.randint(3, 100, (a,), generator=gen).tolist(), p + [101] + torch.randint(3, 100, (b,), generator=gen).tolist())
        )
    groups.append((groups[0][0], groups[0][0]))  # identical answers
    groups.append((groups[1][0] + [2], groups[1][1] + [2, 2]))  # transcripts ending with the pad token (an eos used as pad)
    for attention in ("sdpa", "eager"):
        pm.model.set_attn_implementation(attention)
        packed = pm.packed(pack_shared_prefix(groups, 2, pool_skip=2)).view(-1, 2)  # (6, 2)
        ids, mask = pad([s for group in groups for s in group], 2)
        alone = pm(ids, mask).view(-1, 2)  # (6, 2)
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        grads = []
        for rewards in (packed, alone):
            pm.zero_grad()
            (rewards * torch.arange(12.0).view(6, 2)).sum().backward(retain_graph=True)
            grads.append(torch.cat([p.grad.flatten() for p in pm.parameters()]))
        torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_the_pm_stage_trains_the_same_pm_with_and_without_a_shared_prompt(make_cfg, tmp_path):
    data = ("model=tiny", "label=human", f"label.data={FIXTURES / 'hh_helpful_refusals.jsonl.gz'}", "pm.lr=1e-3", "pm.epochs=4")
    data += ("pm.batch_size=32",)  # every comparison in each step: the batches do not depend on how rows are bucketed
    run(make_cfg("stage=label", *data))
    shared, alone = (run(make_cfg("stage=pm", *data, f"pm.share_prompt={share}"))[0] for share in ("true", "false"))
    assert shared["path"] != alone["path"]  # keyed apart
    rows = Upstream("", tmp_path / "artifacts" / "label" / "latest", {}).rows()[:8]
    scores = []
    for summary in (shared, alone):
        pm, tok = PreferenceModel.load(summary["path"])
        scores.append(torch.tensor(score(pm, tok, [(r["conversation"], r["response_a"]) for r in rows], 384)))
    torch.testing.assert_close(scores[0], scores[1], atol=2e-3, rtol=2e-3)  # the same PM, up to rounding
    assert scores[0].std() > 1e-3  # and one that tells the answers apart


def test_human_labels(make_cfg, tmp_path):
    run(make_cfg("stage=label", *SMALL, "label=human", f"label.data={HH_SMALL}", "label.n_human=30"))
    rows = Upstream("", tmp_path / "artifacts" / "label" / "latest", {}).rows()
    assert len(rows) == 30 and all(r["label"] in (0.0, 1.0) and r["label_type"] == "human" for r in rows)
    assert 5 < sum(r["label"] for r in rows) < 25  # chosen is randomly placed in a or b


def test_label_needs_pairs_and_pm_eval_needs_data(make_cfg):
    with pytest.raises(CaiError, match="stage 'label' needs the output of stage 'pairs'"):
        run(make_cfg("stage=label", *SMALL))
    with pytest.raises(CaiError, match="pm.eval_data: stage=pm_eval needs an hh-rlhf-format file"):
        run(make_cfg("stage=pm_eval", *SMALL))


@pytest.mark.parametrize("trainable", ["head", "last_block"])
def test_a_pm_with_a_frozen_backbone_trains_only_what_it_says(make_cfg, tmp_path, tiny_spec, trainable):
    data = ("model=tiny", "label=human", f"label.data={FIXTURES / 'hh_helpful_refusals.jsonl.gz'}", "pm.lr=1e-3", "pm.epochs=3")
    run(make_cfg("stage=label", *data))
    [summary] = run(make_cfg("stage=pm", *data, f"pm.trainable={trainable}"))
    pm, _ = PreferenceModel.load(summary["path"])
    start = PreferenceModel.from_causal_lm(tiny_spec.load_model())
    changed = {k for k, v in pm.backbone.state_dict().items() if not torch.equal(v, start.backbone.state_dict()[k])}
    if trainable == "head":
        assert not changed  # the backbone is exactly the initial model
    else:
        assert changed and all(k.startswith(("layers.1.", "norm.")) for k in changed)  # the last of 2 blocks, and the norm
    assert float(json.loads((Path(summary["path"]).parent / "metrics.json").read_text())["pm/val/labeller_agreement"]) >= 0.5


def test_the_old_pm_format_still_loads_with_a_warning(tiny_spec, tmp_path, caplog):
    """PMs written before the HF format (pm.json, backbone/, head.safetensors with a bias) still load and rank alike."""
    from safetensors.torch import save_file

    pm = PreferenceModel.from_causal_lm(tiny_spec.load_model()).eval()
    old = tmp_path / "old"
    pm.backbone.save_pretrained(old / "backbone")
    tiny_spec.load_tokenizer().save_pretrained(old / "backbone")
    save_file({"weight": pm.head.weight.detach().contiguous(), "bias": torch.tensor([0.7])}, str(old / "head.safetensors"))
    (old / "pm.json").write_text(json.dumps({"format": "cai-pm-1", "backbone": "backbone", "head": "head.safetensors"}))
    loaded, _ = PreferenceModel.load(old, dtype=torch.float32)
    assert "old format" in caplog.text
    ids, mask = pad([[5, 6, 7], [5, 6, 7, 8, 9]], 2)
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), pm(ids, mask), atol=1e-5)  # the bias only shifted every score alike


def test_pm_calibration_is_measured_against_the_soft_targets():
    """A PM that reproduces clamped CoT labels exactly is calibrated: ECE 0, not the 0.45 that the
    labels rounded to 0/1 would give; a hard-label PM is not calibrated by construction."""
    from cai.stages.pm import validation_metrics

    clamped = [0.4, 0.6, 0.6, 0.4, 0.55, 0.45, 0.6, 0.5]
    exact = validation_metrics(clamped, clamped)
    assert exact["pm/val/ece"] == pytest.approx(0.0) and exact["pm/val/labeller_agreement"] == 1.0
    confident = validation_metrics([0.99, 0.01, 0.99, 0.01], [0.6, 0.4, 0.6, 0.4])  # sure where the labels were not
    assert confident["pm/val/ece"] == pytest.approx(0.39) and confident["pm/val/labeller_agreement"] == 1.0
    assert "pm/val/labeller_agreement" not in validation_metrics([0.7], [0.5])  # a tie decides nothing


def test_the_readme_pm_snippet_scores_as_cai_does_with_a_bos_adding_tokenizer(tmp_path, tiny_spec, capsys):
    """The training guide's one plain-transformers snippet, run as written on a PM whose tokenizer adds a BOS."""
    import re

    from tokenizers import processors

    import cai

    tok = tiny_spec.load_tokenizer()
    bos = tok.bos_token or tok.eos_token
    bos_id = tok.convert_tokens_to_ids(bos)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    pm = PreferenceModel.from_causal_lm(tiny_spec.load_model(), tok.pad_token_id)
    pm.save(tmp_path / "pm", tok)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "pm")("hi")["input_ids"][0] == bos_id  # it does add one
    guide = (cai.ROOT / "docs" / "guides" / "training.md").read_text()
    snippet = re.search(r"Plain\s+transformers gives the same scores as cai:\s*```python\n(.*?)```", guide, re.S).group(1)
    pages = [cai.ROOT / "README.md", *(cai.ROOT / "docs").rglob("*.md")]
    assert (
        sum(p.read_text().count("AutoModelForSequenceClassification.from_pretrained(") for p in pages) == 1
    )  # one snippet, not two that disagree
    exec(snippet.replace('"artifacts/pm/latest/model"', repr(str(tmp_path / "pm"))), {})
    theirs = float(capsys.readouterr().out.split()[-1])
    loaded, loaded_tok = PreferenceModel.load(tmp_path / "pm")
    chat = [{"role": "user", "content": "How do I pick a lock?"}]
    [ours] = score(loaded, loaded_tok, [(chat, "A locksmith can help.")], max_length=256)
    assert theirs == pytest.approx(ours, abs=1e-5)
