"""Disaggregated greedy output equals a single-process reference (tiny random model, both transports)."""

from __future__ import annotations

import pytest

import disagg
from tests.conftest import assert_idle
from tests.reference import assert_matches_reference, greedy_reference, load_reference_model

pytestmark = pytest.mark.ray

# Block size is 16 tokens: cover 1 token, just under, at and over one and two block edges.
PROMPT_LENGTHS = [1, 15, 16, 17, 31, 32, 33, 100, 200]


def make_prompt(length: int, seed: int) -> list[int]:
    return [(seed * 37 + i * 11) % 250 + 3 for i in range(length)]


@pytest.fixture(scope="module")
def reference_model(tiny_cluster):
    return load_reference_model(tiny_cluster.model.path)


def test_greedy_matches_reference_concurrently(tiny_cluster, reference_model):
    prompts = [make_prompt(n, seed) for seed, n in enumerate(PROMPT_LENGTHS)]
    # Different max_tokens make sequences leave the decode batch at different steps.
    max_tokens = [5 + 3 * i for i in range(len(prompts))]

    async def run_all():
        import asyncio

        coros = [
            tiny_cluster.generate_async(p, disagg.SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
            for p, m in zip(prompts, max_tokens)
        ]
        return await asyncio.gather(*coros)

    import asyncio

    outputs = [batch[0] for batch in asyncio.run(run_all())]
    for prompt, m, output in zip(prompts, max_tokens, outputs):
        reference = greedy_reference(reference_model, prompt, m, eos_ids=())
        assert_matches_reference(output.token_ids, reference, f"prompt of {len(prompt)} tokens")
        assert output.finish_reason == disagg.FinishReason.LENGTH
        assert output.metrics.transfer_bytes == len(prompt) * tiny_cluster_bytes_per_token(tiny_cluster)
    assert_idle(tiny_cluster)


def tiny_cluster_bytes_per_token(cluster) -> int:
    worker = cluster.stats()["decode"]["workers"][0]
    return worker["kv_bytes_per_token"]


def test_max_tokens_one_skips_decode(tiny_cluster, reference_model):
    prompt = make_prompt(20, 99)
    output = tiny_cluster.generate(prompt, disagg.SamplingParams(max_tokens=1, temperature=0.0))[0]
    reference = greedy_reference(reference_model, prompt, 1, eos_ids=())
    assert output.token_ids == reference.token_ids
    assert output.finish_reason == disagg.FinishReason.LENGTH
    assert output.metrics.transfer_bytes == 0
    assert_idle(tiny_cluster)
