"""AI feedback labels: debiasing, clamping, label ranges and cost, on the tiny model for real."""

from __future__ import annotations

import pytest
import torch

import cai
from cai.constitution import RLPrinciple, load_constitution
from cai.labels import Item, Labeller, clamp, combine, hard_label, prefer_a

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


class AlwaysA(torch.nn.Module):
    """A labeller model biased to always answer '(A)', whatever the question."""

    def __init__(self, model, a_id: int) -> None:
        super().__init__()
        self.model, self.a_id = model, a_id

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        out.logits[..., self.a_id] += 50.0
        return out


def test_debiasing_cancels_a_letter_bias(tiny_spec):
    tok = tiny_spec.load_tokenizer()
    base = Labeller(tiny_spec.load_model(), tok)
    _, a_id, _ = base._ids("The answer is: (")
    biased = AlwaysA(tiny_spec.load_model(), a_id)
    one_order = Labeller(biased, tok, "soft", debias=False).label(ITEMS)
    assert all(r["p_a"] > 0.999 for r in one_order)  # the bias, undiluted
    both = Labeller(biased, tok, "soft", debias=True).label(ITEMS)
    assert all(r["p_a"] == pytest.approx(0.5, abs=1e-6) for r in both)


def test_label_ranges_and_forward_pass_budget(tiny_spec):
    model, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    examples = load_constitution(cai.ROOT / "cai" / "constitutions" / "default.yaml").rl_examples
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
