"""The shared KV chunk cache: reuse is exact, isolated by salt, and survives a coordinator restart."""

from __future__ import annotations

import time

import pytest
import ray

import disagg
from tests.conftest import assert_idle

pytestmark = pytest.mark.ray

CHUNK = 16
GREEDY = disagg.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def tokens(length: int, seed: int) -> list[int]:
    return [(seed * 53 + i * 7) % 250 + 3 for i in range(length)]


@pytest.fixture(scope="module")
def cached(ray_session):
    cluster = disagg.launch(model="tiny-random-llama", max_seq_len=256, max_batch=8, prefill_block_tokens=CHUNK,
                            prefill_outbox_tokens=2048, cache_pool_bytes=4 * 2**20)
    yield cluster
    assert_cache_idle(cluster)
    cluster.shutdown()


@pytest.fixture(scope="module")
def uncached(ray_session):
    cluster = disagg.launch(model="tiny-random-llama", max_seq_len=256, max_batch=8, prefill_block_tokens=CHUNK,
                            prefill_outbox_tokens=2048, cache_pool_bytes=0)
    yield cluster
    cluster.shutdown()


def assert_cache_idle(cluster) -> None:
    assert_idle(cluster)
    cache = cluster.stats()["cache"]
    assert cache["pinned"] == 0, cache
    assert cache["reserved"] == 0, cache


def wait_for_chunks(cluster, prompt: list[int], salt: str | None = None, within_s: float = 5.0) -> None:
    """Wait until the directory lists every full chunk of ``prompt``.

    Chunks are stored after the first token and indexed a moment later.
    """
    keys = cluster._chunk_keys(prompt, salt)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = ray.get(cluster._coordinator.lookup.remote(keys))
        if found["num_chunks"] == len(keys):
            return
        time.sleep(0.05)
    raise AssertionError(f"only {found['num_chunks']} of {len(keys)} chunks were indexed within {within_s} s")


def run_twice(cluster, prompt, **kwargs):
    first = cluster.generate(prompt, GREEDY, **kwargs)[0]
    wait_for_chunks(cluster, prompt, kwargs.get("cache_salt"))
    second = cluster.generate(prompt, GREEDY, **kwargs)[0]
    return first, second


@pytest.mark.parametrize(
    "length",
    [CHUNK, 2 * CHUNK, 3 * CHUNK, 2 * CHUNK - 1, 2 * CHUNK + 1, 5 * CHUNK + 3],
    ids=["1-chunk", "2-chunks", "3-chunks", "boundary-minus-1", "boundary-plus-1", "5-chunks-plus-3"],
)
def test_cache_hit_equals_cache_off(cached, uncached, length):
    prompt = tokens(length, seed=length)
    reference = uncached.generate(prompt, GREEDY)[0]
    first, second = run_twice(cached, prompt)

    assert first.token_ids == reference.token_ids
    assert second.token_ids == reference.token_ids
    assert first.metrics.cached_tokens == 0
    # The last prompt token is always recomputed, so a prompt of exactly k
    # chunks reuses k - 1 of them.
    assert second.metrics.cached_tokens == ((length - 1) // CHUNK) * CHUNK


def test_entirely_cached_prompt_recomputes_last_token(cached, uncached):
    prompt = tokens(4 * CHUNK, seed=77)
    longer = prompt + tokens(CHUNK, seed=78)
    cached.generate(longer, GREEDY)  # stores all 5 chunks, so every chunk of `prompt` is cached
    wait_for_chunks(cached, longer)
    output = cached.generate(prompt, GREEDY)[0]
    assert output.metrics.cached_tokens == 3 * CHUNK
    assert output.token_ids == uncached.generate(prompt, GREEDY)[0].token_ids


def test_shared_first_chunk_only(cached, uncached):
    base = tokens(3 * CHUNK + 5, seed=90)
    cached.generate(base, GREEDY)
    wait_for_chunks(cached, base)
    other = base[:CHUNK] + tokens(2 * CHUNK + 5, seed=91)
    output = cached.generate(other, GREEDY)[0]
    assert output.metrics.cached_tokens == CHUNK
    assert output.token_ids == uncached.generate(other, GREEDY)[0].token_ids


def test_shared_middle_chunk_reuses_nothing(cached, uncached):
    base = tokens(3 * CHUNK + 5, seed=100)
    cached.generate(base, GREEDY)
    wait_for_chunks(cached, base)
    # Same middle chunk, different first chunk: the chained key differs from chunk 0 on.
    other = tokens(CHUNK, seed=101) + base[CHUNK:]
    output = cached.generate(other, GREEDY)[0]
    assert output.metrics.cached_tokens == 0
    assert output.token_ids == uncached.generate(other, GREEDY)[0].token_ids


def test_salt_isolates_cache(cached):
    prompt = tokens(3 * CHUNK + 1, seed=120)
    cached.generate(prompt, GREEDY, cache_salt="tenant-a")
    wait_for_chunks(cached, prompt, "tenant-a")
    other_tenant = cached.generate(prompt, GREEDY, cache_salt="tenant-b")[0]
    no_salt = cached.generate(prompt, GREEDY)[0]
    same_tenant = cached.generate(prompt, GREEDY, cache_salt="tenant-a")[0]
    assert other_tenant.metrics.cached_tokens == 0
    assert no_salt.metrics.cached_tokens == 0
    assert same_tenant.metrics.cached_tokens == 3 * CHUNK
    with pytest.raises(ValueError, match="cache_salt"):
        cached.generate(prompt, GREEDY, cache_salt="")


def test_stats_report_cache(cached):
    cache = cached.stats()["cache"]
    assert cache["chunk_tokens"] == CHUNK
    assert cache["pool_bytes_total"] > 0
    assert cache["chunks"] > 0
    assert cache["pool_bytes_used"] > 0
    assert cache["hits"] > 0
    assert cache["misses"] > 0  # each prompt's first request found nothing


def test_eviction_under_pressure_stays_correct(ray_session, uncached):
    # 8 slots of 16 tokens: later prompts evict earlier chunks.
    small = disagg.launch(model="tiny-random-llama", max_seq_len=256, prefill_block_tokens=CHUNK,
                          prefill_outbox_tokens=2048, cache_pool_bytes=8 * CHUNK * 2048)
    try:
        prompts = [tokens(4 * CHUNK + 2, seed=200 + i) for i in range(4)]
        for prompt in prompts + prompts:
            output = small.generate(prompt, GREEDY)[0]
            assert output.token_ids == uncached.generate(prompt, GREEDY)[0].token_ids
        assert small.stats()["cache"]["evictions"] > 0
        assert_cache_idle(small)
    finally:
        small.shutdown()


def test_coordinator_restart_rebuilds_index(cached):
    prompt = tokens(4 * CHUNK + 3, seed=300)
    before = cached.generate(prompt, GREEDY)[0]
    wait_for_chunks(cached, prompt)
    ray.kill(cached._coordinator, no_restart=False)
    # Served while the restarted coordinator rebuilds: its lookup may miss, the output may not change.
    during = cached.generate(prompt, GREEDY)[0]
    assert during.token_ids == before.token_ids
    assert ray.get(cached._coordinator.workers.remote())["decode"]  # waits for the rebuild
    wait_for_chunks(cached, prompt)
    after = cached.generate(prompt, GREEDY)[0]
    assert after.token_ids == before.token_ids
    assert after.metrics.cached_tokens == 4 * CHUNK
