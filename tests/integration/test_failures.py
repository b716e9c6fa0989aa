"""Cancellation and failures: every path ends the request and releases its KV on both sides."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import ray

import disagg
from disagg.errors import WorkerDiedError
from tests.conftest import assert_idle

pytestmark = pytest.mark.ray

LONG = disagg.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
SHORT = disagg.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def launch(**options):
    defaults = dict(model="tiny-random-llama", max_seq_len=512, max_batch=4, prefill_block_tokens=16,
                    prefill_outbox_tokens=1024, cache_pool_bytes=2 * 2**20)
    defaults.update(options)
    return disagg.launch(**defaults)


@pytest.fixture(scope="module")
def shared(ray_session):
    """For tests that leave every worker alive."""
    cluster = launch(prefill_replicas=1, decode_replicas=1)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def cluster(ray_session):
    """A fresh cluster for a test that kills one of its actors."""
    cluster = launch(prefill_replicas=2, decode_replicas=2)
    yield cluster
    cluster.shutdown()


def wait_until_running(cluster, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while cluster.stats()["decode"]["running"] == 0:
        assert time.monotonic() < deadline, "request never started decoding"
        time.sleep(0.02)


def in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_abort_ends_request_and_frees_kv(shared):
    thread, box = in_thread(lambda: asyncio.run(shared.generate_async("x" * 40, LONG, request_id="abort-me")))
    wait_until_running(shared)
    assert shared.abort("abort-me")
    thread.join(timeout=10)
    output = box["result"][0]
    assert output.finish_reason == disagg.FinishReason.ABORT
    assert 0 < len(output.token_ids) < 400
    assert_idle(shared, within_s=1.0)
    assert not shared.abort("abort-me")
    assert not shared.abort("never-existed")


def test_cancelled_task_frees_kv(shared):
    async def cancel_midway():
        task = asyncio.ensure_future(shared.generate_async("y" * 40, LONG))
        while (await asyncio.to_thread(shared.stats))["decode"]["running"] == 0:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert_idle(shared, within_s=1.0)


def test_stream_consumer_leaving_frees_kv(shared):
    stream = shared.stream("z" * 40, LONG)
    next(stream)
    stream.close()
    assert_idle(shared, within_s=1.0)


def test_dead_prefill_worker_is_retried(cluster):
    expected = cluster.generate("retry me please", SHORT)[0].token_ids
    victim = next(w for w, kind in cluster._kinds.items() if kind == "prefill")
    ray.kill(cluster._workers[victim])
    outputs = cluster.generate(["retry me please"] * 3, SHORT)
    assert [o.token_ids for o in outputs] == [expected] * 3
    assert all(o.metrics.prefill_worker != victim for o in outputs)
    stats = cluster.stats()
    assert stats["prefill"]["replicas"] == 1
    assert_idle(cluster)


def test_dead_decode_worker_fails_its_requests_only(cluster):
    thread, box = in_thread(lambda: cluster.generate("w" * 40, LONG))
    wait_until_running(cluster)
    busy = next(w["worker_id"] for w in cluster.stats()["decode"]["workers"] if w["running"])
    ray.kill(cluster._workers[busy])
    thread.join(timeout=30)
    error = box.get("error")
    assert isinstance(error, WorkerDiedError), box
    assert busy in str(error)
    # Routing no longer sends work to it, and the prefill side released the KV.
    outputs = cluster.generate(["after the crash"] * 4, SHORT)
    assert all(o.metrics.decode_worker != busy for o in outputs)
    assert cluster.stats()["decode"]["replicas"] == 1
    assert_idle(cluster)


def test_coordinator_killed_under_load(shared):
    prompts = [f"steady request {i} " * 3 for i in range(6)]
    expected = [o.token_ids for o in shared.generate(prompts, SHORT)]

    thread, box = in_thread(lambda: shared.generate(prompts, SHORT))
    time.sleep(0.05)
    ray.kill(shared._coordinator, no_restart=False)
    thread.join(timeout=60)
    assert "error" not in box, box
    assert [o.token_ids for o in box["result"]] == expected
    assert [o.token_ids for o in shared.generate(prompts, SHORT)] == expected
    assert_idle(shared)


def test_abort_is_reliable_in_a_loop(shared):
    for round_number in range(5):
        request_id = f"loop-abort-{round_number}"
        thread, box = in_thread(lambda rid=request_id: asyncio.run(shared.generate_async("v" * 30, LONG, request_id=rid)))
        wait_until_running(shared)
        assert shared.abort(request_id)
        thread.join(timeout=10)
        assert not thread.is_alive(), f"round {round_number}: abort did not end the request"
        output = box["result"][0]
        assert output.finish_reason == disagg.FinishReason.ABORT, (round_number, len(output.token_ids))
        assert_idle(shared, within_s=1.0)


def test_duplicate_request_id_rejected(shared):
    async def both():
        first = asyncio.ensure_future(shared.generate_async("dup " * 5, LONG, request_id="dup-1"))
        await asyncio.sleep(0.2)
        with pytest.raises(ValueError, match="already in flight"):
            await shared.generate_async("dup " * 5, SHORT, request_id="dup-1")
        assert shared.abort("dup-1")
        return await first

    output = asyncio.run(both())[0]
    assert output.finish_reason == disagg.FinishReason.ABORT
    assert_idle(shared, within_s=1.0)


def test_prefill_dead_before_transfer_frees_decode_slot(cluster):
    """Kill the prefill worker after it exported KV, before the decode worker READs it."""
    prefill_id = next(w for w, kind in cluster._kinds.items() if kind == "prefill")
    decode_id = next(w for w, kind in cluster._kinds.items() if kind == "decode")
    prefill, decode = cluster._workers[prefill_id], cluster._workers[decode_id]
    request = {"request_id": "doomed-transfer", "prompt_token_ids": [5] * 100,
               "params": SHORT.to_dict(), "chunk_keys": [], "cache_salt": None}
    exported = ray.get(prefill.prefill.remote(request))
    ray.kill(prefill)
    time.sleep(0.5)

    stream = decode.generate.options(num_returns="streaming").remote(request, exported["first_token"],
                                                                     exported["handle"])
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        for ref in stream:
            ray.get(ref, timeout=30)
    assert time.monotonic() - started < 30
    assert f"{prefill_id}-nixl" in str(caught.value)  # the error names the dead peer
    stats = ray.get(decode.stats.remote())
    assert stats["kv_blocks_used"] == 0
    assert stats["running"] == 0
    # The decode worker is not blamed: it keeps serving through the surviving prefill worker.
    ray.get(cluster._coordinator.remove_worker.remote(prefill_id))
    cluster.fleet.workers.pop(prefill_id)
    cluster.fleet.kinds.pop(prefill_id)
    outputs = cluster.generate(["after the lost transfer"] * 4, SHORT)
    assert all(len(o.token_ids) == 8 for o in outputs)
    assert decode_id in {o.metrics.decode_worker for o in outputs}
    assert_idle(cluster)
