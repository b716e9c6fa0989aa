"""Load beyond capacity gets overload errors; admitted requests complete; queues stay bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import disagg
from disagg.errors import OverloadedError
from tests.conftest import assert_idle

pytestmark = pytest.mark.ray


def test_excess_load_is_rejected_not_queued(ray_session):
    cluster = disagg.launch(
        model="tiny-random-llama", max_seq_len=512, max_batch=2, max_queued_requests=2,
        prefill_block_tokens=16, prefill_outbox_tokens=1024, cache_pool_bytes=0,
        timeouts=disagg.Timeouts(admission_s=2.0),
    )
    try:
        params = disagg.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        peaks = {"prefill_waiting": 0, "decode_waiting": 0, "running": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                stats = cluster.stats()
                peaks["prefill_waiting"] = max(peaks["prefill_waiting"], stats["prefill"]["waiting"])
                peaks["decode_waiting"] = max(peaks["decode_waiting"], stats["decode"]["waiting"])
                peaks["running"] = max(peaks["running"], stats["decode"]["running"])
                time.sleep(0.02)

        async def flood():
            coros = [cluster.generate_async(f"flood {i} " * 4, params) for i in range(16)]
            return await asyncio.gather(*coros, return_exceptions=True)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = asyncio.run(flood())
        finally:
            stop.set()
            watcher.join()

        done = [r[0] for r in results if isinstance(r, list)]
        overloaded = [r for r in results if isinstance(r, OverloadedError)]
        others = [r for r in results if not isinstance(r, (list, OverloadedError))]
        assert not others, others
        assert overloaded, "16 requests against 2 slots and queues of 2 should overload"
        assert done, "admitted requests should complete"
        assert all(len(o.token_ids) == 200 for o in done)
        assert "max_queued_requests=2" in str(overloaded[0])
        assert peaks["running"] <= 2
        assert peaks["decode_waiting"] <= 2
        assert peaks["prefill_waiting"] <= 2
        assert_idle(cluster)
        assert len(cluster.generate("after the flood", params)[0].token_ids) == 200
    finally:
        cluster.shutdown()
