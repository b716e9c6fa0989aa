from __future__ import annotations

import pytest

from disagg.cache.directory import ChunkDirectory, PrefixLocation

A, B, C, D = (bytes([i]) * 32 for i in range(1, 5))


def make() -> ChunkDirectory:
    directory = ChunkDirectory()
    directory.add_pool("pool-1", "node-1")
    directory.add_pool("pool-2", "node-2")
    return directory


def test_longest_prefix_wins():
    directory = make()
    directory.apply("pool-1", [(1, "put", A), (2, "put", B)])
    directory.apply("pool-2", [(1, "put", A), (2, "put", B), (3, "put", C)])
    assert directory.lookup([A, B, C, D]) == PrefixLocation("pool-2", 3)
    assert directory.lookup([B, C]) == PrefixLocation("pool-2", 2)
    assert directory.lookup([D, A]) == PrefixLocation(None, 0)  # a run must start at the first key


def test_tie_prefers_local_node():
    directory = make()
    directory.apply("pool-1", [(1, "put", A)])
    directory.apply("pool-2", [(1, "put", A)])
    assert directory.lookup([A], prefer_node="node-2") == PrefixLocation("pool-2", 1)
    assert directory.lookup([A], prefer_node="node-1") == PrefixLocation("pool-1", 1)


def test_evict_and_replayed_events():
    directory = make()
    directory.apply("pool-1", [(1, "put", A), (2, "put", B), (3, "evict", B)])
    directory.apply("pool-1", [(2, "put", B), (3, "evict", B)])  # replay: ignored
    assert directory.lookup([A, B]) == PrefixLocation("pool-1", 1)
    assert directory.num_chunks() == 1


def test_gap_raises_and_rebuild_recovers():
    directory = make()
    directory.apply("pool-1", [(1, "put", A)])
    with pytest.raises(RuntimeError, match="skipped events 2..4"):
        directory.apply("pool-1", [(5, "put", B)])
    directory.rebuild("pool-1", [A, B], last_seq=5)
    assert directory.lookup([A, B]) == PrefixLocation("pool-1", 2)
    directory.apply("pool-1", [(6, "evict", A)])
    assert directory.lookup([A, B]) == PrefixLocation(None, 0)


def test_empty_and_removed_pool_miss():
    directory = make()
    assert directory.lookup([A]) == PrefixLocation(None, 0)
    directory.apply("pool-1", [(1, "put", A)])
    directory.remove_pool("pool-1")
    assert directory.lookup([A]) == PrefixLocation(None, 0)
