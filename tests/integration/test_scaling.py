"""Scaling prefill and decode replicas while requests flow."""

from __future__ import annotations

import threading
import time

import pytest

import disagg
from tests.conftest import assert_idle

pytestmark = pytest.mark.ray

PARAMS = disagg.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(ray_session):
    cluster = disagg.launch(model="tiny-random-llama", max_seq_len=256, max_batch=4, prefill_block_tokens=16,
                            prefill_outbox_tokens=1024, cache_pool_bytes=2 * 2**20,
                            prefill_resources=disagg.WorkerResources(num_cpus=0.5),
                            decode_resources=disagg.WorkerResources(num_cpus=0.5))
    yield cluster
    cluster.shutdown()


def test_scale_up_and_down_under_traffic(cluster):
    expected = cluster.generate("steady traffic", PARAMS)[0].token_ids
    stop = threading.Event()
    outputs, errors = [], []

    def traffic():
        while not stop.is_set():
            try:
                outputs.extend(cluster.generate(["steady traffic"] * 2, PARAMS))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        reports = [cluster.scale(prefill=2, decode=2)]
        time.sleep(1.0)
        assert cluster.stats()["prefill"]["replicas"] == 2
        assert cluster.stats()["decode"]["replicas"] == 2
        reports.append(cluster.scale(prefill=1, decode=1))
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=60)

    assert not errors, errors
    assert len(outputs) >= 4
    assert all(o.token_ids == expected for o in outputs)
    removed = reports[-1]["removed"]
    assert len(removed) == 2
    for worker_id, held in removed.items():
        assert not any(held.values()), (worker_id, held)
    stats = cluster.stats()
    assert stats["prefill"]["replicas"] == 1
    assert stats["decode"]["replicas"] == 1
    assert_idle(cluster)


def test_scale_rejects_zero(cluster):
    with pytest.raises(ValueError, match="at least 1 replica"):
        cluster.scale(decode=0)


def test_unplaceable_replica_is_pending(cluster):
    cluster.fleet.resources["decode"] = disagg.WorkerResources(num_cpus=0.5, resources={"no_such_node": 1})
    try:
        cluster.scale(decode=2, wait=False)
        stats = cluster.stats()
        assert stats["decode"]["pending_replicas"] == 1
        assert stats["decode"]["replicas"] == 1
        assert cluster.generate("still serving", PARAMS)[0].finish_reason == disagg.FinishReason.LENGTH
    finally:
        cluster.fleet.resources["decode"] = disagg.WorkerResources(num_cpus=0.5)


def test_autoscaler_grows_prefill_under_queueing(cluster):
    policy = disagg.AutoscalePolicy(max_prefill=2, max_decode=1, target_prefill_queue_s=1e-6,
                                    target_decode_occupancy=10.0, cooldown_s=60, interval_s=0.2)
    cluster.enable_autoscaling(policy)
    try:
        deadline = time.monotonic() + 60
        while cluster.stats()["prefill"]["replicas"] < 2:
            assert time.monotonic() < deadline, "autoscaler never added a prefill replica"
            cluster.generate([f"queue up {i}" for i in range(4)], PARAMS)
        assert cluster.stats()["decode"]["replicas"] == 1
    finally:
        cluster.disable_autoscaling()
    cluster.scale(prefill=1)
    assert_idle(cluster)
