"""Shared fixtures: a Ray instance for the session and small clusters over it.

Integration tests start Ray, which on a closed network host must run inside a
loopback-only network namespace (``make test`` arranges that).
"""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def assert_idle(cluster, within_s: float = 2.0) -> None:
    """Assert that a cluster holds no KV block, lease or NIXL transfer within ``within_s``.

    Releases travel as fire-and-forget calls and notifications, so a request's
    output can reach the driver a few milliseconds before its KV is released.
    """
    deadline = time.monotonic() + within_s
    while True:
        stats = cluster.stats()
        if _is_idle(stats) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert stats["decode"]["kv_blocks_used"] == 0, stats["decode"]
    assert stats["decode"]["running"] == 0, stats["decode"]
    assert stats["leases_active"] == 0, stats
    assert stats["prefill"]["outbox_blocks_used"] == 0, stats["prefill"]
    assert stats["nixl_transfers_in_flight"] == 0, stats
    assert stats["coordinator"]["in_flight"] == 0, stats["coordinator"]


def _is_idle(stats: dict) -> bool:
    return (
        stats["decode"]["kv_blocks_used"] == 0
        and stats["decode"]["running"] == 0
        and stats["leases_active"] == 0
        and stats["prefill"]["outbox_blocks_used"] == 0
        and stats["nixl_transfers_in_flight"] == 0
        and stats["coordinator"]["in_flight"] == 0
    )
