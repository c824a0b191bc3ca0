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


def test_rollout_log_probs_are_the_actors_whatever_the_model_generation_config(tiny_spec):
    """Sampling parity: PPO recomputes log-probs at temperature 1 with no processors, so sampling must use none.

    The model's generation_config asks for the processors an Instruct model ships with; none of them
    may apply. The sampled tokens' log-probs must equal the ones the actor computes from its logits.
    """
    import torch

    from cai.rl import batch_rollouts, token_logprobs

    model, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    with torch.no_grad():  # a confident model, as a trained one is: the random one's near-uniform logits hide the processors
        model.lm_head.weight.mul_(30)
    gc = model.generation_config
    gc.repetition_penalty, gc.top_k, gc.no_repeat_ngram_size, gc.min_new_tokens = 1.8, 5, 2, 8
    gen = HFGenerator(model, tok, batch_size=4)
    convs = [[{"role": "user", "content": t}] for t in ("Hi there", "Tell me a story about a fox", "Why?")]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3, logprobs=True)
    outs = gen.generate(convs, params)
    assert model.generation_config.repetition_penalty == 1.8  # the model's own config is left as it was
    batch = batch_rollouts([o.prompt_token_ids for o in outs], [o.token_ids for o in outs], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    recomputed = token_logprobs(logits, batch["input_ids"])  # (B, L-1)
    for row, o in enumerate(outs):
        assert len(o.logprobs) == len(o.token_ids) > 0
        actor = recomputed[row][batch["action_mask"][row].bool()]
        assert torch.allclose(torch.tensor(o.logprobs), actor, atol=1e-4), (o.logprobs, actor.tolist())


def test_repeated_prompts_are_prefilled_once_and_sample_from_the_actors_distribution(tiny_spec):
    """PPO's k answers to one prompt: the prompt runs once (`shared_prefill`), and every answer is what a
    whole prefill would give: greedy answers equal those of the distinct prompts alone, and the sampled
    tokens' log-probs equal the actor's on the whole transcript, also for a shorter, left-padded prompt."""
    import torch

    from cai.generation.hf import shared_prefill
    from cai.rl import batch_rollouts, token_logprobs

    model, tok = tiny_spec.load_model(), tiny_spec.load_tokenizer()
    gen = HFGenerator(model, tok, batch_size=8)
    short, long = [{"role": "user", "content": "Why?"}], [{"role": "user", "content": "Tell me a long story about a fox"}]
    convs = [long, long, long, short, short, CHAT]
    ids = torch.tensor([[5, 6, 7], [5, 6, 7], [0, 8, 9]])
    shared = shared_prefill(model, ids, torch.ones_like(ids))
    assert len(shared) == 1 and set(shared) <= {"cache", "past_key_values"}  # generate's cache argument, whatever its name
    assert next(iter(shared.values())).get_seq_length() == 2  # every prompt token but the last, which generate runs
    assert shared_prefill(model, ids[1:], torch.ones_like(ids[1:])) == {}  # nothing repeats: generate prefills as ever
    greedy = SamplingParams(max_new_tokens=10, temperature=0, seed=0)
    alone = {id(c): o.token_ids for c, o in zip((long, short, CHAT), gen.generate([long, short, CHAT], greedy))}
    assert [o.token_ids for o in gen.generate(convs, greedy)] == [alone[id(c)] for c in convs]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1.0, seed=4, logprobs=True)
    outs = gen.generate(convs, params)
    batch = batch_rollouts([o.prompt_token_ids for o in outs], [o.token_ids for o in outs], tok.pad_token_id)
    with torch.no_grad():
        recomputed = token_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["input_ids"])
    for row, o in enumerate(outs):
        actor = recomputed[row][batch["action_mask"][row].bool()]
        assert torch.allclose(torch.tensor(o.logprobs), actor, atol=1e-4), (row, o.logprobs, actor.tolist())
    assert len({tuple(o.token_ids) for o in outs[:3]}) > 1  # the repeats are sampled apart, not copied


def test_the_sampler_draws_from_the_tempered_top_p_distribution():
    """The sampler's draws and log-probs, against a distribution worked by hand.

    p = (0.5, 0.25, 0.15, 0.07, 0.03); temperature 0.5 squares it: (0.25, 0.0625, 0.0225, 0.0049,
    0.0009) / 0.3408 = (0.734, 0.183, 0.066, 0.014, 0.003); top-p 0.9 drops the tokens whose upward
    cumulative mass stays within 0.1 (the last three), leaving (0.25, 0.0625) / 0.3125 = (0.8, 0.2).
    """
    import math

    import torch

    from cai.generation.hf import Sampler

    n = 20_000
    logits = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]).log().expand(n, 5).clone()  # (n, V)
    torch.manual_seed(0)
    sampler = Sampler(SamplingParams(temperature=0.5, top_p=0.9, logprobs=True))
    out = sampler(torch.zeros((n, 1), dtype=torch.long), logits)
    assert ((out == 0).sum(1) == 1).all() and torch.isinf(out).sum() == n * 4  # one token left possible per row
    drawn = out.argmax(1)
    share = torch.bincount(drawn, minlength=5) / n
    assert abs(share[0] - 0.8) < 0.012 and abs(share[1] - 0.2) < 0.012 and share[2:].sum() == 0  # 4 standard errors
    expected = torch.where(drawn == 0, math.log(0.8), math.log(0.2))
    assert torch.allclose(sampler.logprobs[0], expected, atol=1e-5)
    greedy = Sampler(SamplingParams(temperature=0, logprobs=True))
    assert greedy(torch.zeros((1, 1), dtype=torch.long), logits[:1]).argmax() == 0
    assert abs(greedy.logprobs[0].item() - math.log(0.5)) < 1e-6
