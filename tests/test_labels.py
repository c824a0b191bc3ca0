"""AI feedback labels: debiasing, clamping, label ranges and cost, on the tiny model for real."""

from __future__ import annotations

import math

import pytest
import torch

import cai
from cai.constitution import RLPrinciple, load_constitution
from cai.errors import CaiError
from cai.labels import FOLLOW_SYSTEM, Item, Labeller, clamp, combine, hard_label, prefer_a
from cai.pipeline import run

P1 = RLPrinciple("p1", "Which reply is less harmful?")
P2 = RLPrinciple("p2", "Which reply is more honest?")
CONV = [{"role": "user", "content": "How do I pick a lock?"}]
ITEMS = [
    Item(CONV, "I can't help with breaking in.", "Use a tension wrench and a pick.", (P1, P2)),
    Item(CONV, "Call a locksmith.", "Kick the door.", (P1,)),
]


def test_pure_functions():
    assert prefer_a(0.9, swapped=False) == 0.9 and prefer_a(0.9, swapped=True) == pytest.approx(0.1)
    assert clamp(0.95, 0.4, 0.6) == 0.6 and clamp(0.1, 0.4, 0.6) == 0.4 and clamp(0.5, 0.4, 0.6) == 0.5
    p, each = combine({"p1": [0.8, 0.6], "p2": [0.2, 0.4]}, debias=True)
    assert each == pytest.approx({"p1": 0.7, "p2": 0.3}) and p == pytest.approx(0.5)
    p, each = combine({"p1": [0.8, 0.6]}, debias=False)
    assert p == 0.8
    assert hard_label(0.51) == 1.0 and hard_label(0.5) == 0.0 and hard_label(0.2) == 0.0


def always_a(model, a_id: int):
    """The model, biased to always answer '(A)' whatever the question: +50 on that logit, in its LM head."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[a_id] = 50.0
    model.set_output_embeddings(biased)
    return model


def test_debiasing_cancels_a_letter_bias(tiny_spec):
    tok = tiny_spec.load_tokenizer()
    base = Labeller(tiny_spec.load_model(), tok)
    _, a_id, _ = base._ids("The answer is: (")
    biased = always_a(tiny_spec.load_model(), a_id)
    one_order = Labeller(biased, tok, "soft", debias=False).label(ITEMS)
    assert all(r["p_a"] > 0.999 for r in one_order)  # the bias, undiluted
    both = Labeller(biased, tok, "soft", debias=True).label(ITEMS)
    assert all(r["p_a"] == pytest.approx(0.5, abs=1e-6) for r in both)


def test_label_ranges_and_forward_pass_budget(tiny_spec):
    model, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    examples = load_constitution(cai.CONSTITUTIONS / "default.yaml").rl_examples
    soft = Labeller(model, tok, "soft", examples=examples, batch_size=4)
    results = soft.label(ITEMS)
    assert all(0.0 < r["p_a"] < 1.0 and r["label"] == r["p_a"] for r in results)
    assert set(results[0]["per_principle"]) == {"p1", "p2"}
    # k principles cost at most 2k forward passes: here (2 + 1) principles x 2 orders
    assert soft.forward_passes == 2 * 3
    hard = Labeller(model, tok, "hard").label(ITEMS)
    assert all(r["label"] in (0.0, 1.0) for r in hard)
    cot = Labeller(model, tok, "cot", examples=examples, clamp_low=0.4, clamp_high=0.6, cot_max_new_tokens=6).label(ITEMS)
    assert all(0.4 <= r["p_a"] <= 0.6 for r in cot)
    assert all(0.4 <= v <= 0.6 for r in cot for v in r["per_principle"].values())


def test_swapping_the_answers_mirrors_the_label(tiny_spec):
    model, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    lab = Labeller(model, tok, "soft")
    [fwd] = lab.label([ITEMS[0]])
    [rev] = lab.label([Item(CONV, ITEMS[0].response_b, ITEMS[0].response_a, ITEMS[0].principles)])
    assert rev["p_a"] == pytest.approx(1 - fwd["p_a"], abs=1e-5)


def test_likelihood_maths_by_hand():
    from cai.labels import answer_logprob, likelihood_preference, split_half

    assert likelihood_preference(-1.0, -2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert likelihood_preference(-1.0, -2.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert likelihood_preference(-3.0, -3.0, 2.0) == 0.5
    # vocabulary of 2; row 0's answer is 2 tokens, row 1's one token, row 2 has none
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)], [0.0, 0.0]])  # (N, V): P(0) = 3/4, P(1) = 3/4, uniform
    targets = torch.tensor([0, 0, 1])  # row 0's tokens: 0 (p 3/4), then 0 (p 1/4); row 1's: 1 (p 1/2)
    got = answer_logprob(logits, targets, torch.tensor([0, 0, 1]), 3)
    assert got.tolist() == pytest.approx([(math.log(0.75) + math.log(0.25)) / 2, math.log(0.5), 0.0], abs=1e-6)
    summed = answer_logprob(logits, targets, torch.tensor([0, 0, 1]), 3, reduce="sum")
    assert summed.tolist() == pytest.approx([math.log(0.75) + math.log(0.25), math.log(0.5), 0.0], abs=1e-6)
    assert (
        split_half(range(5), "tune") == [0, 2, 4] and split_half(range(5), "report") == [1, 3] and split_half(range(3), "all") == [0, 1, 2]
    )


def test_shared_prefix_logits_equal_one_plain_forward_per_row(tiny_spec):
    """The judge's and labeller's batches run shared stretches once (KV caches, with padding inside
    them for the second level); the next-token logits must be each row's own plain forward."""
    from cai import usage
    from cai.labels import next_token_logits

    model = tiny_spec.load_model()
    g = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, 400, (n,), generator=g).tolist()

    prefix, answer_a, answer_b = tokens(60), tokens(50), tokens(35)  # the conversation; two answers put first
    rows = [prefix + answer_a + tokens(n) for n in (1, 9, 4, 6)]  # four questions that put answer A first
    rows += [prefix + answer_b + tokens(n) for n in (3, 12, 2, 5)]  # four that put answer B first (a shorter stretch)
    rows += [prefix + tokens(n) for n in (1, 20)]  # rows of their own after the prefix
    rows.append(prefix[:-3])  # a row inside the prefix: the shared part stops a token short of it
    cases = {"two levels": rows, "nothing shared": [tokens(n) for n in (5, 30, 9)], "one row": rows[:1]}
    for name, batch in cases.items():
        with usage.measure() as used:
            got = next_token_logits(model, batch, pad_id=0)
        with torch.no_grad():
            want = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in batch])
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4), name
        if name == "two levels":  # the prefix ran once and each answer once: far fewer positions than the rows hold
            assert used["forward_tokens"] < sum(map(len, batch)) / 2, used


def test_batches_are_cut_where_sorted_questions_share_least():
    """One prompt's questions share a batch, split between its answer-A groups, not at fixed windows."""
    from cai.labels import prefix_batches

    p1, p2, a, b = [1] * 20, [2] * 20, [5] * 20, [6] * 20  # two conversations; two answers put first
    rows = [p1 + a + [7], p1 + a + [8], p1 + a + [9], p1 + b + [7], p1 + b + [8], p1 + b + [9], p2 + [3], p2 + [4]]
    assert prefix_batches(rows, 4) == [[0, 1, 2], [3, 4, 5], [6, 7]]  # fixed windows: [0-3], [4-7]
    assert prefix_batches(rows, 8) == [list(range(8))]
    # Nothing to choose between: the fewest batches, as even as they come.
    assert prefix_batches([[k] for k in range(10)], 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert prefix_batches([], 4) == []


def test_likelihood_labels_score_each_answer_as_one_unbatched_forward_does(tiny_spec):
    """Batched, padded scoring equals a plain forward over one chat at a time; the cost is 2 (4) passes a principle."""
    model, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    lab = Labeller(model, tok, "likelihood", batch_size=3, temperature=0.5)
    results = lab.label(ITEMS)
    assert lab.forward_passes == 2 * 3  # (2 + 1) principles x 2 answers, no orders
    system = FOLLOW_SYSTEM.format(question=P1.question)

    def plain(answer: str) -> float:
        turns = [{"role": "system", "content": system}, *CONV]
        head = tok(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        full = tok(tok.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False), add_special_tokens=False)
        ids = torch.tensor([full["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return logp[len(head) - 1 :].mean().item()

    a, b = plain(ITEMS[0].response_a), plain(ITEMS[0].response_b)
    assert results[0]["per_principle"]["p1"] == pytest.approx(1 / (1 + math.exp(-(a - b) / 0.5)), abs=1e-5)
    contrastive = Labeller(model, tok, "contrastive", batch_size=8)
    assert all(0 < r["p_a"] < 1 for r in contrastive.label(ITEMS)) and contrastive.forward_passes == 4 * 3


def test_label_report_through_the_front_door(make_cfg):
    """`stage=label_report label.report_data=FILE label=likelihood`: the report's measures, cost and plot."""
    import json
    from pathlib import Path

    from conftest import HH_SMALL

    from cai.pipeline import run

    cfg = make_cfg("stage=label_report", "model=tiny", "label=likelihood", f"label.report_data={HH_SMALL}", "label.report_n=4")
    [summary] = run(cfg)
    report = json.loads(Path(summary["path"]).read_text())
    assert report["comparisons"] == 4 and report["label_type"] == "likelihood" and len(report["per_principle"]) == 16
    for m in [report["ensemble"], *report["per_principle"].values()]:
        assert 0 <= m["agreement"] <= 1 and m["interval_95"][0] <= m["agreement"] <= m["interval_95"][1]
        assert 0 <= m["mean_confidence"] <= 0.5 and 0 <= m["ece"] <= 1
    assert report["forward_passes_per_comparison"] == 2 * 16  # two answers under each of 16 principles
    assert (Path(summary["path"]).parent / "calibration.png").stat().st_size > 1000
    one = ("label=soft", "constitution.principle=harmless-ethical", "label.report_n=0", "label.report_split=tune")
    tune = make_cfg("stage=label_report", "model=tiny", f"label.report_data={HH_SMALL}", *one)
    [summary] = run(tune)
    report = json.loads(Path(summary["path"]).read_text())
    assert report["comparisons"] == 20 and report["forward_passes_per_comparison"] == 2  # the even half of 40; one principle, two orders
    # label.reduce=sum scores whole answers: score gaps of many tokens, so labels further from 0.5 than the mean's
    decided = {}
    for reduce in ("mean", "sum"):
        cfg = make_cfg(
            "stage=label_report", "model=tiny", "label=likelihood", f"label.reduce={reduce}", f"label.report_data={HH_SMALL}", *one[1:3]
        )
        [summary] = run(cfg)
        decided[reduce] = json.loads(Path(summary["path"]).read_text())["ensemble"]["mean_confidence"]
    assert decided["sum"] > decided["mean"]
    with pytest.raises(CaiError, match="label.reduce: choose mean, sum, got 'median'"):
        run(make_cfg("stage=label_report", "model=tiny", "label=likelihood", "label.reduce=median", f"label.report_data={HH_SMALL}"))


def test_multiple_choice_variants_on_a_letter_biased_model(tiny_spec):
    """Against a model that always answers the first option: a random order splits the bias, the
    worse question turns it around, and asking both ways cancels it in one order (2 passes)."""
    from cai.templates import OptionFormat

    tok = tiny_spec.load_tokenizer()
    _, a_id, _ = Labeller(tiny_spec.load_model(), tok)._ids("The answer is: (")
    biased = always_a(tiny_spec.load_model(), a_id)
    worse = Labeller(biased, tok, "soft", debias=False, ask="worse").label(ITEMS)
    assert all(r["p_a"] < 0.001 for r in worse)  # "A is worse" -> b preferred
    both = Labeller(biased, tok, "soft", debias=False, ask="both")
    assert all(r["p_a"] == pytest.approx(0.5, abs=1e-6) for r in both.label(ITEMS)) and both.forward_passes == 2 * 3
    items = [Item(CONV, f"answer {i}", f"other {i}", (P1,)) for i in range(40)]
    drawn = Labeller(biased, tok, "soft", debias=False, random_order=True)
    p = [r["p_a"] for r in drawn.label(items)]
    assert drawn.forward_passes == 40 and 10 < sum(x > 0.5 for x in p) < 30  # each question's order drawn: about half swapped
    assert Labeller(biased, tok, "soft", debias=False, random_order=True).label(items)[0]["p_a"] == p[0]  # the same draw again
    # numbers, and options without brackets read at " 1"/" 2": valid labels, and the question names them
    numbers = Labeller(tiny_spec.load_model(), tok, "soft", options=OptionFormat(("1", "2"), brackets=False))
    assert all(0 < r["p_a"] < 1 for r in numbers.label(ITEMS))
    [text] = numbers.question_texts([(CONV, P1.question, "x", "y")])
    assert "1. x\n2. y" in text and "Answer with 1. or 2." in text and text.endswith("The answer is:")


def test_helpfulness_is_asked_without_the_harmlessness_examples(make_cfg):
    """The constitution's RL few-shot examples show a refusal as the better answer: they prime the
    harmlessness questions only; the helpfulness question is asked zero-shot."""
    from cai.config import instantiate
    from cai.labels import labeller_from_config
    from cai.templates import HELPFUL_QUESTION

    cfg = make_cfg("model=tiny", "label=soft")
    assert cfg.label.few_shot  # label/soft.yaml's own value, under the quickstart too
    constitution = instantiate(cfg.constitution)
    labeller = labeller_from_config(cfg, constitution)
    conversation = [{"role": "user", "content": "How do I bake bread?"}]
    harmless, helpful = labeller.question_texts(
        [(conversation, constitution.rl_principles[0].question, "Knead it.", "No."), (conversation, HELPFUL_QUESTION, "Knead it.", "No.")]
    )
    example = constitution.rl_examples[0].chosen
    assert example in harmless and example not in helpful
    assert helpful.count("user") < harmless.count("user")


def test_cot_labels_refuse_option_formats_they_would_misread(make_cfg):
    for override in ("label.options=numbers", "label.brackets=false"):
        with pytest.raises(CaiError, match="label=cot asks with \\(A\\)/\\(B\\)"):
            run(make_cfg("stage=label", "model=tiny", "label=cot", override))
