from __future__ import annotations

import pytest

import disagg
from tests.conftest import assert_idle


@pytest.fixture(scope="module", params=["nixl", "object_store"])
def tiny_cluster(request, ray_session):
    """A 1 prefill + 1 decode cluster on the tiny random model, small blocks to cross block edges."""
    cluster = disagg.launch(
        model="tiny-random-llama", transport=request.param, max_seq_len=256, max_batch=8,
        prefill_block_tokens=16, prefill_outbox_tokens=2048,
    )
    yield cluster
    assert_idle(cluster)
    cluster.shutdown()
