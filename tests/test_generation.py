"""The HF generation backend, for real, on the tiny and the embedded model."""

from __future__ import annotations

import pytest

from cai.errors import CaiError
from cai.generation import SamplingParams
from cai.generation.hf import HFGenerator

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_batched_generation_keeps_order_and_lengths(tiny_spec):
    gen = HFGenerator(tiny_spec, batch_size=3)
    convs = [[{"role": "user", "content": "x " * n + "?"}] for n in (1, 9, 4, 2, 7)]
    out = gen.generate(convs, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    assert len(out) == 5
    for conv, c in zip(convs, out):
        assert 1 <= len(c.token_ids) <= 6
        # the prompt ids are this conversation's own, rendered with the chat template
        assert gen.tokenizer.decode(c.prompt_token_ids).count("x") == conv[0]["content"].count("x")
        assert c.text == gen.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip()


def test_same_seed_same_text_other_seed_differs(tiny_spec):
    gen = HFGenerator(tiny_spec, batch_size=4)
    convs = [CHAT] * 4
    a = gen.generate(convs, SamplingParams(max_new_tokens=12, temperature=1.0, seed=11))
    b = gen.generate(convs, SamplingParams(max_new_tokens=12, temperature=1.0, seed=11))
    c = gen.generate(convs, SamplingParams(max_new_tokens=12, temperature=1.0, seed=12))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_prefix_starts_the_assistant_turn(tiny_spec):
    gen = HFGenerator(tiny_spec)
    [with_prefix] = gen.generate([CHAT], SamplingParams(max_new_tokens=2, temperature=0), prefixes=["Let's think step by step:"])
    assert gen.tokenizer.decode(with_prefix.prompt_token_ids).endswith("Let's think step by step:")


def test_empty_prompt_and_bad_params_fail_clearly(tiny_spec):
    gen = HFGenerator(tiny_spec)
    with pytest.raises(CaiError, match="empty prompt"):
        gen.generate([[{"role": "user", "content": "  "}]])
    with pytest.raises(CaiError, match="generation.top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(CaiError, match="generation.batch_size"):
        HFGenerator(tiny_spec, batch_size=0)


@pytest.mark.slow
def test_embedded_model_answers_a_chat_prompt(embedded_spec):
    gen = HFGenerator(embedded_spec, batch_size=2)
    greedy = SamplingParams(max_new_tokens=24, temperature=0, seed=0)
    [answer] = gen.generate([CHAT], greedy)
    assert "paris" in answer.text.lower()
    assert answer.finished and answer.token_ids[-1] == gen.tokenizer.eos_token_id
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, seed=5)
    convs = [CHAT, [{"role": "user", "content": "Name a fruit."}]]
    first, second = gen.generate(convs, sampled), gen.generate(convs, sampled)
    assert [c.text for c in first] == [c.text for c in second]
    assert all(c.text for c in first)
