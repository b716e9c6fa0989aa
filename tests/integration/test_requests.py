"""Driver API behaviour on a running cluster: bad input, failures, sampling, stop strings, stats."""

from __future__ import annotations

import asyncio

import pytest

import disagg
from disagg.errors import RequestFailedError
from tests.conftest import assert_idle

pytestmark = pytest.mark.ray

GREEDY = disagg.SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def cluster(ray_session):
    """Two prefill and two decode workers, so requests spread over replicas."""
    cluster = disagg.launch(model="tiny-random-llama", prefill_replicas=2, decode_replicas=2, max_seq_len=128,
                            max_batch=4, prefill_block_tokens=16, prefill_outbox_tokens=512)
    yield cluster
    # Every block, lease and NIXL transfer must be released once all its tests ran.
    assert_idle(cluster)
    cluster.shutdown()


def served(cluster) -> bool:
    output = cluster.generate("still serving?", GREEDY)[0]
    return len(output.token_ids) == 6


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", GREEDY, "empty string"),
        ([], GREEDY, "prompts is empty"),
        ([[]], GREEDY, "empty list"),
        ("x" * 5000, GREEDY, "context"),
        ("hi", disagg.SamplingParams(max_tokens=127, temperature=0.0), "max_seq_len=128"),
        ([{"role": "user"}], GREEDY, "content"),
        ([{"role": "user", "content": ""}], GREEDY, "content"),
        ([{"content": "hello"}], GREEDY, "role"),
        ([1, 2, 99999], GREEDY, "token ids must be integers in"),
        ([1, "a"], GREEDY, "token ids must be integers in"),
        (42, GREEDY, "not supported"),
    ],
)
def test_bad_prompt_raises_before_work(cluster, prompt, params, message):
    before = cluster.stats()["prefill"]["prefills"]
    with pytest.raises(ValueError, match=message):
        cluster.generate(prompt, params)
    assert cluster.stats()["prefill"]["prefills"] == before
    assert served(cluster)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        disagg.SamplingParams(**kwargs)


def test_unknown_model_raises_before_ray(ray_session):
    with pytest.raises(ValueError, match="tiny-random-llama"):
        disagg.launch(model="no-such-model")


def test_prompt_longer_than_context_names_limit(cluster):
    with pytest.raises(ValueError, match="shorten the prompt"):
        cluster.generate([5] * 3000, GREEDY)


def test_worker_exception_fails_only_its_request(cluster):
    bad = cluster.generate_async("fine prompt", GREEDY)
    vocab = len(cluster.tokenizer)

    async def both():
        # Bypass driver validation to make the prefill worker itself fail.
        failing = cluster._run([1, vocab + 500], GREEDY, "req-broken", None)
        return await asyncio.gather(failing, bad, return_exceptions=True)

    failed, good = asyncio.run(both())
    assert isinstance(failed, RequestFailedError)
    assert "prefill" in str(failed)
    assert "req-broken" in str(failed)
    assert "IndexError" in str(failed) or "index" in str(failed).lower()
    assert good[0].finish_reason == disagg.FinishReason.LENGTH
    assert served(cluster)
    assert_idle(cluster)


def test_seeded_sampling_independent_of_batch(cluster):
    params = disagg.SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = cluster.generate("the seeded prompt", params)[0]
    others = [f"other prompt {i}" for i in range(5)]
    together = cluster.generate(["the seeded prompt", *others], params)
    assert together[0].token_ids == alone.token_ids
    again = cluster.generate("the seeded prompt", params)[0]
    assert again.token_ids == alone.token_ids
    unseeded = disagg.SamplingParams(max_tokens=12, temperature=0.9)
    outputs = {tuple(o.token_ids) for o in cluster.generate(["the seeded prompt"] * 4, unseeded)}
    assert len(outputs) > 1, "unseeded requests should sample independently"


def test_requests_spread_over_replicas(cluster):
    outputs = cluster.generate([f"prompt number {i}" for i in range(8)], GREEDY)
    assert len({o.metrics.prefill_worker for o in outputs}) == 2
    assert len({o.metrics.decode_worker for o in outputs}) == 2


def test_stop_string_never_reaches_output(cluster):
    full = cluster.generate("stop string prompt", disagg.SamplingParams(max_tokens=20, temperature=0.0))[0]
    text = full.text
    assert len(text) >= 4
    stop = text[2:4]
    params = disagg.SamplingParams(max_tokens=20, temperature=0.0, stop=[stop])
    stopped = cluster.generate("stop string prompt", params)[0]
    assert stopped.finish_reason == disagg.FinishReason.STOP
    assert stopped.text == text[: text.find(stop)]
    streamed = "".join(cluster.stream("stop string prompt", params))
    assert streamed == stopped.text
    assert stop not in streamed


def test_stop_token_ids_end_generation(cluster):
    full = cluster.generate("stop token prompt", disagg.SamplingParams(max_tokens=10, temperature=0.0))[0]
    target = full.token_ids[3]
    params = disagg.SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[target])
    stopped = cluster.generate("stop token prompt", params)[0]
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(target) + 1]
    assert stopped.finish_reason == disagg.FinishReason.STOP


def test_stream_matches_generate(cluster):
    params = disagg.SamplingParams(max_tokens=16, temperature=0.0)
    pieces = list(cluster.stream([{"role": "user", "content": "hello there"}], params))
    output = cluster.generate([{"role": "user", "content": "hello there"}], params)[0]
    assert "".join(pieces) == output.text
    assert all("\ufffd" not in piece[-1:] for piece in pieces)


def test_stream_closed_early_releases_kv(cluster):
    stream = cluster.stream("abandon me", disagg.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    next(stream)
    stream.close()
    assert_idle(cluster)


def test_request_id_roundtrip(cluster):
    outputs = asyncio.run(cluster.generate_async("named", GREEDY, request_id="my-request-1"))
    assert outputs[0].request_id == "my-request-1"


def test_metrics_and_stats(cluster):
    output = cluster.generate("metrics please", GREEDY)[0]
    metrics = output.metrics
    assert metrics.ttft_s > 0
    assert metrics.prefill_s > 0
    assert metrics.transfer_s > 0
    assert metrics.transfer_bytes > 0
    assert metrics.transport == "nixl"
    assert metrics.tpot_s > 0
    stats = cluster.stats()
    assert stats["prefill"]["replicas"] == 2
    assert stats["decode"]["replicas"] == 2
    assert stats["decode"]["kv_blocks_total"] == 8
    assert stats["transfers"]["count"] > 0
    assert stats["transfers"]["bytes"] > 0
    assert_idle(cluster)
