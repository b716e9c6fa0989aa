"""A worker whose KV layout differs from its peers' fails at connect time, naming both sides."""

from __future__ import annotations

import pytest
import ray

import disagg
from actors.prefill_worker import PrefillWorker
from disagg.transfer.protocol import IncompatiblePeerError

pytestmark = pytest.mark.ray


def test_mismatched_dtype_rejected_at_registration(ray_session):
    cluster = disagg.launch(model="tiny-random-llama", max_seq_len=128, prefill_outbox_tokens=512)
    try:
        config = cluster.config.to_dict()
        config["dtype"] = "bfloat16"
        stranger = ray.remote(PrefillWorker).options(num_cpus=0.5).remote("stranger-prefill", config, "nixl", 1)
        info = ray.get(stranger.start.remote(), timeout=120)
        with pytest.raises(IncompatiblePeerError) as caught:
            ray.get(cluster._coordinator.register.remote("stranger-prefill", "prefill", stranger, info["handshake"]),
                    timeout=60)
        message = str(caught.value)
        assert "stranger-prefill" in message
        assert cluster._name in message  # the peer that rejected it (a decode worker or a pool)
        assert "bfloat16" in message
        assert "float32" in message
        assert ray.get(cluster._coordinator.workers.remote())["prefill"] == [f"{cluster._name}-prefill-0"]
        ray.get(stranger.shutdown.remote())
        ray.kill(stranger)
        output = cluster.generate("still fine", disagg.SamplingParams(max_tokens=3, temperature=0.0))[0]
        assert len(output.token_ids) == 3
    finally:
        cluster.shutdown()
