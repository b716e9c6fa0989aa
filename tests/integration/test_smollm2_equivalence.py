"""Greedy SmolLM2 output through the disaggregated path equals a single-process reference.

Eight concurrent prompts from 1 to over 1,000 tokens, over NIXL and over the
Ray object store, with different output lengths so sequences join and leave
the decode batch while it runs.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import textwrap

import pytest

import disagg
from disagg.model.sources import resolve_model
from tests.conftest import assert_idle
from tests.reference import assert_matches_reference, greedy_reference, load_reference_model

pytestmark = [pytest.mark.ray, pytest.mark.smollm2]


def _prompts(tokenizer) -> list:
    doc = inspect.getdoc(json) + "\n" + inspect.getdoc(textwrap) + "\n" + inspect.getdoc(inspect)
    long_ids = tokenizer(doc * 3, add_special_tokens=False)["input_ids"][:1100]
    return [
        [long_ids[0]],  # one token
        "The capital of France is",
        [{"role": "user", "content": "What is 2 + 2? Answer briefly."}],
        [{"role": "system", "content": "You are a concise assistant."},
         {"role": "user", "content": "Name three primary colors."}],
        long_ids[:130],
        long_ids[:511],
        long_ids[:777],
        long_ids,  # 1,100 tokens
    ]


@pytest.fixture(scope="module", params=["nixl", "object_store"])
def smol_cluster(request, ray_session):
    cluster = disagg.launch(model="smollm2-135m-instruct", transport=request.param, max_seq_len=1280, max_batch=8)
    yield cluster
    # Every block, lease and NIXL transfer must be released once all its tests ran.
    assert_idle(cluster)
    cluster.shutdown()


@pytest.fixture(scope="module")
def references():
    """Reference outputs, computed once and shared by both transports."""
    resolved = resolve_model("smollm2-135m-instruct")
    model = load_reference_model(resolved.path)
    eos_ids = (model.config.eos_token_id,)
    cache = {}

    def get(token_ids: list[int], max_tokens: int):
        key = (tuple(token_ids), max_tokens)
        if key not in cache:
            cache[key] = greedy_reference(model, token_ids, max_tokens, eos_ids=eos_ids)
        return cache[key]

    return get


def test_greedy_matches_reference(smol_cluster, references):
    prompts = _prompts(smol_cluster.tokenizer)
    max_tokens = [12, 32, 20, 28, 16, 24, 8, 30]

    async def run_all():
        coros = [smol_cluster.generate_async(p, disagg.SamplingParams(max_tokens=m, temperature=0.0))
                 for p, m in zip(prompts, max_tokens)]
        return await asyncio.gather(*coros)

    outputs = [batch[0] for batch in asyncio.run(run_all())]
    assert len(outputs[-1].prompt_token_ids) > 1000
    for m, output in zip(max_tokens, outputs):
        reference = references(output.prompt_token_ids, m)
        assert_matches_reference(output.token_ids, reference, f"{smol_cluster.transport}, "
                                 f"{len(output.prompt_token_ids)}-token prompt")
        assert output.text == smol_cluster.tokenizer.decode(output.token_ids, skip_special_tokens=True)
    assert_idle(smol_cluster)


def test_chat_answer_is_sensible(smol_cluster):
    output = smol_cluster.generate([{"role": "user", "content": "What is the capital of France?"}],
                                   disagg.SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert "Paris" in output.text
