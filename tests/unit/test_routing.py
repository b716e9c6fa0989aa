from __future__ import annotations

import pytest

from disagg.routing import Router, WorkerEntry


def make_router(num_prefill=2, num_decode=2) -> Router:
    router = Router()
    for i in range(num_prefill):
        router.add(WorkerEntry(f"p{i}", "prefill", None, None))
    for i in range(num_decode):
        router.add(WorkerEntry(f"d{i}", "decode", None, None))
    return router


def test_least_loaded_prefill_by_tokens():
    router = make_router()
    first, _ = router.route("r1", 1000)
    second, _ = router.route("r2", 10)
    third, _ = router.route("r3", 10)
    assert first.worker_id != second.worker_id
    assert third.worker_id == second.worker_id  # 20 tokens queued < 1000


def test_finish_returns_load():
    router = make_router(1, 1)
    router.route("r1", 50)
    router.prefill_done("r1")
    assert router.workers["p0"].num_tokens == 0
    assert router.workers["p0"].num_requests == 0
    assert router.workers["d0"].num_requests == 1
    router.finish("r1")
    assert router.workers["d0"].num_requests == 0
    assert router.workers["d0"].num_tokens == 0
    router.finish("unknown")  # ignored
    assert not router.assignments


def test_duplicate_request_id_rejected():
    router = make_router()
    router.route("same", 5)
    with pytest.raises(ValueError, match="already in flight"):
        router.route("same", 5)


def test_no_worker_of_a_kind():
    router = make_router(num_decode=0)
    with pytest.raises(RuntimeError, match="no decode worker"):
        router.route("r", 1)


def test_draining_worker_gets_nothing():
    router = make_router()
    router.workers["d0"].draining = True
    assert {router.route(f"r{i}", 1)[1].worker_id for i in range(4)} == {"d1"}
