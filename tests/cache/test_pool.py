"""Chunk pool: reservations, lookups, pins, eviction order, spill tier, snapshots and events."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from disagg.cache import (
    METADATA_SCHEMA,
    CacheEvent,
    CacheNamespace,
    ChunkPool,
    ExpireCounts,
    MatchResult,
    chunk_keys,
)
from disagg.kv.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")
CHUNK_TOKENS = 4
CHUNK_BYTES = CHUNK_TOKENS * LAYOUT.bytes_per_token  # 512


class FakeClock:
    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_namespace(layout: KVLayout = LAYOUT, salt: str | None = None) -> CacheNamespace:
    return CacheNamespace.for_model("tiny", "sha256:abc", layout, CHUNK_TOKENS, salt=salt)


def prompt_keys(first_token: int, num_chunks: int, layout: KVLayout = LAYOUT) -> list[bytes]:
    tokens = list(range(first_token, first_token + num_chunks * CHUNK_TOKENS))
    return chunk_keys(tokens, make_namespace(layout))


def payload(value: float, layout: KVLayout = LAYOUT) -> torch.Tensor:
    shape = (layout.num_layers, 2, layout.num_kv_heads, CHUNK_TOKENS, layout.head_dim)
    dtype = torch.bfloat16 if layout.dtype == "bfloat16" else torch.float32
    return torch.full(shape, value, dtype=dtype)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_pool(clock: FakeClock):
    """Build pools of ``num_slots`` slots, then check every pool's integrity after the test."""
    pools: list[ChunkPool] = []

    def factory(num_slots: int = 4, layout: KVLayout = LAYOUT, **options) -> ChunkPool:
        options.setdefault("clock", clock)
        capacity_bytes = num_slots * CHUNK_TOKENS * layout.bytes_per_token
        pool = ChunkPool(make_namespace(layout), layout, capacity_bytes, **options)
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.check_integrity()


def put(pool: ChunkPool, key: bytes, value: float, parent: bytes | None = None) -> int:
    """Reserve and commit ``key`` filled with ``value``, and return its slot."""
    reservation = pool.reserve(key, "writer", ttl_s=10.0, parent=parent)
    assert reservation is not None
    assert pool.commit(reservation, payload(value, pool.layout))
    return reservation.slot


def put_chain(pool: ChunkPool, keys: list[bytes], value: float) -> list[int]:
    parents = [None] + keys[:-1]
    return [put(pool, key, value + index, parent) for index, (key, parent) in enumerate(zip(keys, parents))]


def evicted_keys(pool: ChunkPool, since_seq: int = 0) -> list[bytes]:
    return [event.key for event in pool.events_since(since_seq) if event.kind == "evict"]


# -- memory layout -------------------------------------------------------------


def test_buffer_tensor_shape_and_zero_fill(make_pool) -> None:
    pool = make_pool(num_slots=3)

    tensor = pool.buffer_tensor()

    assert tuple(tensor.shape) == (3, 2, 2, 2, CHUNK_TOKENS, 4)
    assert tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert torch.count_nonzero(tensor) == 0
    assert pool.stats()["bytes_total"] == 3 * CHUNK_BYTES


def test_bfloat16_buffer_views_same_bytes(make_pool) -> None:
    layout = dataclasses.replace(LAYOUT, dtype="bfloat16")
    pool = make_pool(num_slots=2, layout=layout)
    key = prompt_keys(0, 1, layout)[0]

    slot = put(pool, key, 1.5)

    assert pool.buffer_tensor().dtype == torch.bfloat16
    assert pool.chunk_bytes == CHUNK_BYTES // 2
    assert torch.equal(pool.read(slot), payload(1.5, layout))
    assert pool.verify(slot)


def test_capacity_rounds_down_to_whole_chunks(clock) -> None:
    pool = ChunkPool(make_namespace(), LAYOUT, 3 * CHUNK_BYTES + CHUNK_BYTES - 1, clock=clock)

    assert pool.num_slots == 3


def test_slot_regions_follow_layer_kv_head(make_pool) -> None:
    pool = make_pool(num_slots=3)
    tensor = pool.buffer_tensor()

    regions = pool.slot_regions(2)

    assert regions.shape == (2 * 2 * 2, 2)
    assert regions.dtype == np.int64
    expected = [
        tensor[2, layer, kv, head].data_ptr()
        for layer in range(2)
        for kv in range(2)
        for head in range(2)
    ]
    assert regions[:, 0].tolist() == expected
    assert regions[:, 1].tolist() == [CHUNK_TOKENS * 4 * 4] * 8
    assert regions[0, 0] == tensor.data_ptr() + 2 * CHUNK_BYTES
    assert regions[-1, 0] + regions[-1, 1] == tensor.data_ptr() + 3 * CHUNK_BYTES


def test_slot_outside_pool_raises(make_pool) -> None:
    pool = make_pool(num_slots=2)

    with pytest.raises(ValueError, match="slot 2 is outside"):
        pool.slot_regions(2)


# -- writes -------------------------------------------------------------------


def test_reserved_key_is_invisible_until_commit(make_pool) -> None:
    pool = make_pool()
    key = prompt_keys(0, 1)[0]

    reservation = pool.reserve(key, "writer", ttl_s=5.0)

    assert reservation.slot == 0
    assert pool.match_prefix([key]) == MatchResult(0, [])
    assert pool.listed_keys() == []
    assert pool.stats()["reserved"] == 1
    assert pool.commit(reservation, payload(3.0))
    assert pool.match_prefix([key]) == MatchResult(1, [0])
    assert torch.equal(pool.read(0), payload(3.0))
    assert pool.stats()["reserved"] == 0


def test_second_reserve_of_key_returns_none(make_pool) -> None:
    pool = make_pool()
    key = prompt_keys(0, 1)[0]

    first = pool.reserve(key, "a", ttl_s=5.0)
    while_reserved = pool.reserve(key, "b", ttl_s=5.0)
    pool.commit(first, payload(1.0))
    while_listed = pool.reserve(key, "c", ttl_s=5.0)

    assert while_reserved is None
    assert while_listed is None
    assert pool.stats()["skipped_puts"] == 2


def test_abort_frees_slot_once(make_pool) -> None:
    pool = make_pool(num_slots=1)
    key = prompt_keys(0, 1)[0]
    reservation = pool.reserve(key, "writer", ttl_s=5.0)

    assert pool.abort(reservation)
    assert not pool.abort(reservation)
    assert not pool.commit(reservation, payload(1.0))
    assert pool.stats()["free_slots"] == 1
    assert pool.reserve(key, "other", ttl_s=5.0).slot == 0


def test_commit_wrong_shape_raises(make_pool) -> None:
    pool = make_pool()
    reservation = pool.reserve(prompt_keys(0, 1)[0], "writer", ttl_s=5.0)

    with pytest.raises(ValueError, match="expected shape"):
        pool.commit(reservation, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="dtype"):
        pool.commit(reservation, payload(1.0).to(torch.float16))

    assert pool.abort(reservation)


def test_commit_written_checksums_slot(make_pool) -> None:
    pool = make_pool()
    key = prompt_keys(0, 1)[0]
    reservation = pool.reserve(key, "nixl-writer", ttl_s=5.0)

    pool.buffer_tensor()[reservation.slot] = payload(7.0)
    assert pool.commit_written(reservation)

    assert pool.verify(reservation.slot)
    assert torch.equal(pool.read(reservation.slot), payload(7.0))
    assert pool.metadata_table().column("checksum")[0].as_py() is not None


def test_failed_copy_frees_reservation(make_pool) -> None:
    pool = make_pool(num_slots=1)
    key = prompt_keys(0, 1)[0]
    reservation = pool.reserve(key, "writer", ttl_s=5.0)

    with pytest.raises(RuntimeError, match="copy failed"):
        pool._write_and_list(reservation, lambda slot: (_ for _ in ()).throw(RuntimeError("copy failed")))

    assert pool.stats()["free_slots"] == 1
    assert pool.match_prefix([key]).num_chunks == 0


def test_invalid_arguments_raise(make_pool) -> None:
    pool = make_pool()
    key = prompt_keys(0, 1)[0]

    with pytest.raises(ValueError, match="32-byte"):
        pool.reserve(b"short", "writer", ttl_s=5.0)
    with pytest.raises(ValueError, match="parent"):
        pool.reserve(key, "writer", ttl_s=5.0, parent=b"x")
    with pytest.raises(ValueError, match="ttl_s=0"):
        pool.reserve(key, "writer", ttl_s=0)
    with pytest.raises(ValueError, match="ttl_s=-1"):
        pool.pin([key], "reader", ttl_s=-1)
    with pytest.raises(ValueError, match="32-byte"):
        pool.match_prefix([key, "not bytes"])


def test_capacity_below_one_chunk_raises(clock) -> None:
    with pytest.raises(ValueError, match="raise capacity_bytes"):
        ChunkPool(make_namespace(), LAYOUT, CHUNK_BYTES - 1, clock=clock)


def test_namespace_of_other_layout_raises(clock) -> None:
    other = dataclasses.replace(LAYOUT, num_layers=3)

    with pytest.raises(ValueError, match="CacheNamespace.for_model"):
        ChunkPool(make_namespace(other), LAYOUT, 4 * CHUNK_BYTES, clock=clock)


def test_salted_namespace_is_recorded(make_pool) -> None:
    pool = make_pool()
    salted = make_namespace(salt="tenant-a")
    key = chunk_keys(list(range(4)), salted)[0]
    reservation = pool.reserve(key, "writer", ttl_s=5.0, namespace=salted)
    pool.commit(reservation, payload(1.0))

    row = pool.metadata_table().to_pylist()[0]

    assert row["namespace"] == salted.digest()
    with pytest.raises(ValueError, match="only the salt may differ"):
        other_model = dataclasses.replace(salted, model_name="other")
        pool.reserve(prompt_keys(8, 1)[0], "writer", ttl_s=5.0, namespace=other_model)


def test_spill_settings_must_agree(clock, tmp_path) -> None:
    with pytest.raises(ValueError, match="without spill_dir"):
        ChunkPool(make_namespace(), LAYOUT, 4 * CHUNK_BYTES, spill_capacity_bytes=100, clock=clock)
    with pytest.raises(ValueError, match="spill_capacity_bytes > 0"):
        ChunkPool(make_namespace(), LAYOUT, 4 * CHUNK_BYTES, spill_dir=tmp_path, clock=clock)


# -- concurrent writers and dead writers ---------------------------------------


@pytest.mark.parametrize("num_writers", [2, 8])
def test_concurrent_writers_list_one_value(make_pool, num_writers: int) -> None:
    pool = make_pool(num_slots=4)
    keys = prompt_keys(0, 10)

    for round_index, key in enumerate(keys):
        barrier = threading.Barrier(num_writers)
        committed: list[int] = []

        def write(writer: int, key: bytes, barrier: threading.Barrier, value: float, committed: list[int]) -> None:
            barrier.wait()
            reservation = pool.reserve(key, f"writer-{writer}", ttl_s=5.0)
            if reservation is not None and pool.commit(reservation, payload(value)):
                committed.append(writer)

        threads = [
            threading.Thread(target=write, args=(writer, key, barrier, 100.0 * round_index + writer, committed))
            for writer in range(num_writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(committed) == 1
        match = pool.match_prefix([key])
        assert match.num_chunks == 1
        assert torch.equal(pool.read(match.slots[0]), payload(100.0 * round_index + committed[0]))
        assert pool.verify(match.slots[0])
        pool.check_integrity()


def test_dead_writer_reservation_expires(make_pool, clock) -> None:
    pool = make_pool(num_slots=1)
    key = prompt_keys(0, 1)[0]
    dead = pool.reserve(key, "dead-writer", ttl_s=2.0)

    assert pool.reserve(key, "live-writer", ttl_s=2.0) is None
    clock.now_s += 2.5
    live = pool.reserve(key, "live-writer", ttl_s=2.0)

    assert live is not None
    assert live.slot == dead.slot
    assert pool.commit(live, payload(2.0))
    assert not pool.commit(dead, payload(1.0))
    assert torch.equal(pool.read(live.slot), payload(2.0))
    assert pool.stats()["expired_reservations"] == 1


def test_expire_reports_counts(make_pool, clock) -> None:
    pool = make_pool()
    keys = prompt_keys(0, 3)
    put(pool, keys[0], 1.0)
    pool.reserve(keys[1], "writer", ttl_s=1.0)
    pool.pin([keys[0]], "reader", ttl_s=3.0)

    assert pool.expire() == ExpireCounts(0, 0)
    clock.now_s += 1.0
    assert pool.expire() == ExpireCounts(1, 0)
    clock.now_s += 2.0
    assert pool.expire() == ExpireCounts(0, 1)
    assert pool.expire() == ExpireCounts(0, 0)
    assert pool.stats()["free_slots"] == 3


def test_writing_chunk_survives_its_deadline(make_pool, clock) -> None:
    pool = make_pool(num_slots=1)
    key = prompt_keys(0, 1)[0]
    reservation = pool.reserve(key, "slow-writer", ttl_s=1.0)

    def slow_write(slot: int) -> None:
        clock.now_s += 5.0
        assert pool.expire() == ExpireCounts(0, 0)
        pool.buffer_tensor()[slot] = payload(4.0)

    assert pool._write_and_list(reservation, slow_write)
    assert pool.match_prefix([key]).num_chunks == 1


# -- lookups and pins -----------------------------------------------------------


def test_match_prefix_counts_chunk_hits(make_pool) -> None:
    pool = make_pool()
    keys = prompt_keys(0, 3)
    slots = put_chain(pool, keys[:2], 1.0)

    assert pool.match_prefix(keys) == MatchResult(2, slots)
    assert pool.match_prefix(keys[1:]) == MatchResult(1, slots[1:])
    assert pool.match_prefix(prompt_keys(500, 2) + keys) == MatchResult(0, [])
    assert pool.match_prefix([]) == MatchResult(0, [])
    stats = pool.stats()
    assert stats["hits"] == 3
    assert stats["misses"] == 1 + 1 + 5


def test_pin_holds_leading_listed_run(make_pool) -> None:
    pool = make_pool()
    keys = prompt_keys(0, 3)
    slots = put_chain(pool, [keys[0], keys[1]], 1.0)
    pool.reserve(keys[2], "writer", ttl_s=5.0, parent=keys[1])

    pin = pool.pin([keys[0], keys[2], keys[1]], "reader", ttl_s=5.0)
    full = pool.pin(keys, "reader", ttl_s=5.0)

    assert pin.keys == (keys[0],)
    assert pin.slots == (slots[0],)
    assert full.keys == (keys[0], keys[1])
    assert pool.stats()["pinned"] == 2
    assert pool.metadata_table().column("refcount").to_pylist()[:2] == [2, 1]


def test_unpin_is_idempotent(make_pool) -> None:
    pool = make_pool()
    key = prompt_keys(0, 1)[0]
    put(pool, key, 1.0)
    pin = pool.pin([key], "reader", ttl_s=5.0)

    assert pool.unpin(pin)
    assert not pool.unpin(pin)
    assert pool.stats()["pinned"] == 0
    assert pool.stats()["pins"] == 0


def test_empty_pin_holds_nothing(make_pool) -> None:
    pool = make_pool()

    pin = pool.pin(prompt_keys(0, 2), "reader", ttl_s=5.0)

    assert pin.num_chunks == 0
    assert not pool.unpin(pin)


def test_pin_expiry_releases_refcounts(make_pool, clock) -> None:
    pool = make_pool(num_slots=2)
    keys = prompt_keys(0, 2)
    put_chain(pool, keys, 1.0)
    pin = pool.pin(keys, "reader", ttl_s=3.0)

    clock.now_s += 3.0
    put(pool, prompt_keys(100, 1)[0], 5.0)  # a mutating call expires the pin, then evicts

    assert not pool.unpin(pin)
    stats = pool.stats()
    assert stats["pinned"] == 0
    assert stats["expired_pins"] == 1
    assert evicted_keys(pool) == [keys[1]]


def test_read_of_unlisted_slot_raises(make_pool) -> None:
    pool = make_pool()
    pool.reserve(prompt_keys(0, 1)[0], "writer", ttl_s=5.0)

    with pytest.raises(ValueError, match="contains no listed chunk"):
        pool.read(0)
    with pytest.raises(ValueError, match="contains no listed chunk"):
        pool.verify(1)


def test_verify_detects_corrupted_slot(make_pool) -> None:
    pool = make_pool()
    slot = put(pool, prompt_keys(0, 1)[0], 1.0)

    pool.buffer_tensor()[slot, 1, 0, 1, 2, 3] = -1.0

    assert not pool.verify(slot)
    with pytest.raises(RuntimeError, match="ChunkPool 'chunk-pool'.*checksum"):
        pool.check_integrity()
    pool.buffer_tensor()[slot] = payload(1.0)


# -- eviction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "touched,expected_order",
    [
        (None, ["A1", "A0", "B1", "B0"]),
        ("A", ["B1", "B0", "A1", "A0"]),
        ("B", ["A1", "A0", "B1", "B0"]),
    ],
)
def test_eviction_order_tail_first(make_pool, touched: str | None, expected_order: list[str]) -> None:
    pool = make_pool(num_slots=4)
    a_keys, b_keys = prompt_keys(0, 2), prompt_keys(1000, 2)
    names = {a_keys[0]: "A0", a_keys[1]: "A1", b_keys[0]: "B0", b_keys[1]: "B1"}
    slots = dict(zip(a_keys + b_keys, put_chain(pool, a_keys, 1.0) + put_chain(pool, b_keys, 3.0)))
    if touched is not None:
        pool.match_prefix(a_keys if touched == "A" else b_keys)

    new_slots = put_chain(pool, prompt_keys(5000, 4), 10.0)

    order = evicted_keys(pool)
    assert [names[key] for key in order] == expected_order
    assert list(slots.values()) == [0, 1, 2, 3]
    assert new_slots == [slots[key] for key in order]
    assert pool.stats()["evictions"] == 4


def test_parent_outlives_more_recent_child(make_pool) -> None:
    pool = make_pool(num_slots=3)
    a_keys, b_key = prompt_keys(0, 2), prompt_keys(1000, 1)[0]
    put_chain(pool, a_keys, 1.0)
    put(pool, b_key, 3.0)
    pool.match_prefix([a_keys[1]])  # A1 becomes the most recently used, and A0 the oldest

    put_chain(pool, prompt_keys(5000, 3), 10.0)

    assert evicted_keys(pool) == [b_key, a_keys[1], a_keys[0]]


def test_pins_survive_eviction_pressure(make_pool) -> None:
    pool = make_pool(num_slots=4)
    a_keys, b_keys = prompt_keys(0, 2), prompt_keys(1000, 2)
    a_slots = put_chain(pool, a_keys, 1.0)
    put_chain(pool, b_keys, 3.0)
    pin = pool.pin(a_keys, "reader", ttl_s=60.0)

    singles = [prompt_keys(10000 + 100 * index, 1)[0] for index in range(6)]
    for index, key in enumerate(singles):
        put(pool, key, 20.0 + index)

    assert evicted_keys(pool) == [b_keys[1], b_keys[0], *singles[:4]]
    assert pool.match_prefix(a_keys) == MatchResult(2, a_slots)
    assert torch.equal(pool.read(a_slots[0]), payload(1.0))
    assert torch.equal(pool.read(a_slots[1]), payload(2.0))

    seq = pool.last_seq
    pool.unpin(pin)
    for index in range(4):
        put(pool, prompt_keys(20000 + 100 * index, 1)[0], 30.0 + index)
    assert evicted_keys(pool, seq) == [singles[4], singles[5], a_keys[1], a_keys[0]]


def test_all_pinned_drops_put_with_warning(make_pool, caplog) -> None:
    pool = make_pool(num_slots=2)
    keys = prompt_keys(0, 2)
    put_chain(pool, keys, 1.0)
    pin = pool.pin(keys, "reader", ttl_s=60.0)

    with caplog.at_level(logging.WARNING, logger="disagg.cache.core"):
        assert pool.reserve(prompt_keys(100, 1)[0], "writer", ttl_s=5.0) is None
        assert pool.reserve(prompt_keys(200, 1)[0], "writer", ttl_s=5.0) is None

    assert pool.stats()["dropped_puts"] == 2
    warnings = [record for record in caplog.records if "dropped the put" in record.getMessage()]
    assert len(warnings) == 1  # the second drop within 10 s is counted, not logged
    pool.unpin(pin)
    assert pool.reserve(prompt_keys(100, 1)[0], "writer", ttl_s=5.0) is not None


def test_unpinned_parent_of_pinned_child_goes_last(make_pool) -> None:
    pool = make_pool(num_slots=3)
    a_keys, b_key = prompt_keys(0, 2), prompt_keys(1000, 1)[0]
    new_keys = [prompt_keys(5000 + 100 * index, 1)[0] for index in range(3)]
    put_chain(pool, a_keys, 1.0)
    put(pool, b_key, 3.0)
    pool.pin([a_keys[1]], "reader", ttl_s=60.0)  # pins the child A1 but not its parent A0

    put(pool, new_keys[0], 10.0)  # evicts B0, the only unpinned leaf
    pool.pin([new_keys[0]], "reader", ttl_s=60.0)
    put(pool, new_keys[1], 11.0)  # no unpinned leaf is left, so the parent A0 goes
    pool.pin([new_keys[1]], "reader", ttl_s=60.0)

    assert evicted_keys(pool) == [b_key, a_keys[0]]
    assert pool.reserve(new_keys[2], "writer", ttl_s=5.0) is None


def test_eviction_order_survives_queue_rebuild(make_pool) -> None:
    pool = make_pool(num_slots=3)
    keys = [prompt_keys(1000 * index, 1)[0] for index in range(3)]
    for index, key in enumerate(keys):
        put(pool, key, float(index))
    for _ in range(200):  # each lookup queues a new eviction candidate
        pool.match_prefix([keys[1]])
        pool.match_prefix([keys[0]])

    assert len(pool._index._evictable) <= 4 * pool.num_slots + 64
    put(pool, prompt_keys(9000, 1)[0], 9.0)
    put(pool, prompt_keys(9100, 1)[0], 9.1)
    assert evicted_keys(pool) == [keys[2], keys[1]]


def test_released_pins_do_not_pile_up_deadlines(make_pool) -> None:
    pool = make_pool(num_slots=2)
    key = prompt_keys(0, 1)[0]
    put(pool, key, 1.0)

    for index in range(3000):
        pool.unpin(pool.pin([key], f"reader-{index}", ttl_s=3600.0))

    assert len(pool._leases._deadlines) <= 1024 + 1
    assert pool.stats()["pinned"] == 0


# -- spill tier -----------------------------------------------------------------


def test_spill_and_promote(make_pool, tmp_path) -> None:
    pool = make_pool(num_slots=2, spill_dir=tmp_path, spill_capacity_bytes=64 * CHUNK_BYTES)
    a_keys, b_key = prompt_keys(0, 2), prompt_keys(1000, 1)[0]
    a_slots = put_chain(pool, a_keys, 1.0)

    put(pool, b_key, 3.0)  # evicts A1 into the spill tier
    stats = pool.stats()
    match = pool.match_prefix(a_keys)

    assert stats["spilled_chunks"] == 1
    assert stats["spill_bytes"] > CHUNK_BYTES
    assert stats["evictions"] == 1
    assert evicted_keys(pool) == []
    assert len(list(tmp_path.glob("*.chunk.arrow"))) == 1
    assert match == MatchResult(2, [a_slots[0], None])
    assert match.num_spilled == 1
    assert set(pool.listed_keys()) == {*a_keys, b_key}
    pin = pool.pin(a_keys, "reader", ttl_s=5.0)
    assert pin.keys == (a_keys[0],)  # a spilled chunk cannot be pinned before promote
    pool.unpin(pin)
    assert pool.snapshot(tmp_path / "pool.arrow") == 2  # the memory tier only

    slot = pool.promote(a_keys[1])  # evicts B0, the least recently used leaf

    assert slot == a_slots[1]
    assert torch.equal(pool.read(slot), payload(2.0))
    assert pool.verify(slot)
    assert pool.match_prefix(a_keys) == MatchResult(2, a_slots)
    assert pool.match_prefix([b_key]) == MatchResult(1, [None])
    assert pool.promote(a_keys[1]) == slot
    assert pool.promote(prompt_keys(9000, 1)[0]) is None
    stats = pool.stats()
    assert stats["promotions"] == 1
    assert stats["spilled_chunks"] == 1


def spill_file_bytes(tmp_path, clock) -> int:
    pool = ChunkPool(
        make_namespace(), LAYOUT, CHUNK_BYTES, spill_dir=tmp_path / "probe", spill_capacity_bytes=2**20, clock=clock
    )
    put(pool, prompt_keys(0, 1)[0], 1.0)
    put(pool, prompt_keys(100, 1)[0], 1.0)
    return pool.stats()["spill_bytes"]


def test_spill_capacity_drops_oldest_with_event(make_pool, tmp_path, clock) -> None:
    file_bytes = spill_file_bytes(tmp_path, clock)
    pool = make_pool(num_slots=1, spill_dir=tmp_path / "spill", spill_capacity_bytes=2 * file_bytes)
    keys = [prompt_keys(1000 * index, 1)[0] for index in range(4)]

    for index, key in enumerate(keys):
        put(pool, key, float(index))

    stats = pool.stats()
    assert stats["spilled_chunks"] == 2
    assert stats["spill_bytes"] == 2 * file_bytes
    assert stats["spill_drops"] == 1
    assert evicted_keys(pool) == [keys[0]]
    assert pool.match_prefix([keys[0]]).num_chunks == 0
    assert pool.match_prefix([keys[1]]) == MatchResult(1, [None])


def test_unreadable_spill_file_is_dropped(make_pool, tmp_path, caplog) -> None:
    pool = make_pool(num_slots=1, spill_dir=tmp_path, spill_capacity_bytes=64 * CHUNK_BYTES)
    first, second = prompt_keys(0, 1)[0], prompt_keys(100, 1)[0]
    put(pool, first, 1.0)
    put(pool, second, 2.0)
    (spill_file,) = tmp_path.glob("*.chunk.arrow")
    spill_file.write_bytes(spill_file.read_bytes()[:100])

    with caplog.at_level(logging.WARNING):
        assert pool.promote(first) is None

    assert "unreadable" in caplog.text
    assert evicted_keys(pool) == [first]
    assert pool.match_prefix([first]).num_chunks == 0
    # Making room for the promotion spilled the second chunk before the read failed.
    assert pool.match_prefix([second]) == MatchResult(1, [None])
    assert pool.stats()["spilled_chunks"] == 1


def test_close_drops_spilled_chunks(make_pool, tmp_path) -> None:
    pool = make_pool(num_slots=1, spill_dir=tmp_path, spill_capacity_bytes=64 * CHUNK_BYTES)
    first, second = prompt_keys(0, 1)[0], prompt_keys(100, 1)[0]
    put(pool, first, 1.0)
    put(pool, second, 2.0)

    pool.close()

    assert list(tmp_path.glob("*.chunk.arrow")) == []
    assert evicted_keys(pool) == [first]
    assert pool.listed_keys() == [second]


# -- snapshot and restore --------------------------------------------------------


def fill_random(pool: ChunkPool, num_prompts: int, seed: int = 0) -> dict[bytes, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for prompt in range(num_prompts):
        keys = prompt_keys(1000 * prompt, 2, pool.layout)
        for key, parent in zip(keys, [None, keys[0]]):
            kv = torch.randn(pool.chunk_shape, generator=generator).to(pool.buffer_tensor().dtype)
            reservation = pool.reserve(key, "writer", ttl_s=5.0, parent=parent)
            assert pool.commit(reservation, kv)
            values[key] = kv
    return values


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_snapshot_restore_identical_bytes(make_pool, tmp_path, clock, dtype: str) -> None:
    layout = dataclasses.replace(LAYOUT, dtype=dtype)
    pool = make_pool(num_slots=8, layout=layout)
    values = fill_random(pool, num_prompts=3)
    pool.match_prefix(prompt_keys(0, 2, layout))
    path = tmp_path / "pool.arrow"

    assert pool.snapshot(path) == 6
    restored = ChunkPool.restore(path, make_namespace(layout), layout, 8 * pool.chunk_bytes, clock=clock)

    restored.check_integrity()
    columns = ["key", "namespace", "parent", "checksum", "last_use", "state"]
    before = pool.metadata_table().sort_by("key").select(columns)
    after = restored.metadata_table().sort_by("key").select(columns)
    assert before.equals(after)
    assert sorted(restored.listed_keys()) == sorted(pool.listed_keys())
    for key, kv in values.items():
        slot = restored.match_prefix([key]).slots[0]
        assert torch.equal(restored.read(slot), kv)
        assert restored.verify(slot)
    assert [event.kind for event in restored.events_since(0)] == ["put"] * 6


def test_restore_into_smaller_pool_keeps_recent(make_pool, tmp_path, clock) -> None:
    pool = make_pool(num_slots=6)
    fill_random(pool, num_prompts=3)
    pool.match_prefix(prompt_keys(0, 2))  # prompt 0 becomes the most recently used
    path = tmp_path / "pool.arrow"
    pool.snapshot(path)

    restored = ChunkPool.restore(path, make_namespace(), LAYOUT, 2 * CHUNK_BYTES, clock=clock)

    assert restored.match_prefix(prompt_keys(0, 2)).num_chunks == 2
    assert len(restored.listed_keys()) == 2
    restored.check_integrity()


def test_restore_drops_corrupted_chunk(make_pool, tmp_path, clock, caplog) -> None:
    pool = make_pool(num_slots=4)
    keys = prompt_keys(0, 2)
    put_chain(pool, keys, 1.0)
    marker = payload(77.0)
    put(pool, prompt_keys(1000, 1)[0], 77.0)
    path = tmp_path / "pool.arrow"
    pool.snapshot(path)
    data = bytearray(path.read_bytes())
    offset = data.find(marker.numpy().tobytes())
    assert offset >= 0
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        restored = ChunkPool.restore(path, make_namespace(), LAYOUT, 4 * CHUNK_BYTES, clock=clock)

    assert sorted(restored.listed_keys()) == sorted(keys)
    assert "failed its checksum" in caplog.text
    assert "restored 2 of 3 chunks" in caplog.text
    restored.check_integrity()


def test_restore_rejects_other_weights(make_pool, tmp_path, clock) -> None:
    pool = make_pool()
    put(pool, prompt_keys(0, 1)[0], 1.0)
    path = tmp_path / "pool.arrow"
    pool.snapshot(path)
    other = dataclasses.replace(make_namespace(), weights_digest="sha256:new")

    with pytest.raises(ValueError, match="same model, weights and layout"):
        ChunkPool.restore(path, other, LAYOUT, 4 * CHUNK_BYTES, clock=clock)


def test_restore_rejects_foreign_file(tmp_path, clock) -> None:
    path = tmp_path / "other.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("x", pa.int32())])) as writer:
        writer.write_table(pa.table({"x": pa.array([1], pa.int32())}))

    with pytest.raises(ValueError, match="not a chunk pool snapshot"):
        ChunkPool.restore(path, make_namespace(), LAYOUT, 4 * CHUNK_BYTES, clock=clock)


# -- events, metadata, statistics ------------------------------------------------


def test_event_sequence_is_monotonic(make_pool) -> None:
    pool = make_pool(num_slots=2)
    keys = [prompt_keys(1000 * index, 1)[0] for index in range(4)]
    for index, key in enumerate(keys):
        put(pool, key, float(index))

    events = pool.events_since(0)

    assert [event.seq for event in events] == list(range(1, 7))
    assert events == [
        CacheEvent(1, "put", keys[0]),
        CacheEvent(2, "put", keys[1]),
        CacheEvent(3, "evict", keys[0]),
        CacheEvent(4, "put", keys[2]),
        CacheEvent(5, "evict", keys[1]),
        CacheEvent(6, "put", keys[3]),
    ]
    assert pool.events_since(4) == events[4:]
    assert pool.events_since(6) == []
    assert pool.last_seq == 6
    with pytest.raises(ValueError, match="rebuild the index"):
        pool.events_since(7)


def test_discarded_events_require_rebuild(make_pool) -> None:
    pool = make_pool(num_slots=2, max_events=3)
    keys = [prompt_keys(1000 * index, 1)[0] for index in range(4)]
    for index, key in enumerate(keys):
        put(pool, key, float(index))

    assert [event.seq for event in pool.events_since(3)] == [4, 5, 6]
    with pytest.raises(ValueError, match="listed_keys"):
        pool.events_since(2)


def test_index_rebuild_by_replay(make_pool) -> None:
    pool = make_pool(num_slots=3)
    for index in range(3):
        put(pool, prompt_keys(1000 * index, 1)[0], float(index))
    seq = pool.last_seq
    index_keys = set(pool.listed_keys())
    for index in range(3, 6):
        put(pool, prompt_keys(1000 * index, 1)[0], float(index))

    for event in pool.events_since(seq):
        if event.kind == "put":
            index_keys.add(event.key)
        else:
            index_keys.discard(event.key)

    assert index_keys == set(pool.listed_keys())


def test_metadata_table_rows(make_pool) -> None:
    pool = make_pool()
    keys = prompt_keys(0, 2)
    put(pool, keys[0], 1.0)
    pool.reserve(keys[1], "writer", ttl_s=5.0, parent=keys[0])

    table = pool.metadata_table()

    assert table.schema.equals(METADATA_SCHEMA)
    rows = table.to_pylist()
    assert [row["key"] for row in rows] == keys
    assert [row["state"] for row in rows] == ["listed", "reserved"]
    assert [row["parent"] for row in rows] == [None, keys[0]]
    assert [row["slot"] for row in rows] == [0, 1]
    assert rows[0]["shape"] == [2, 2, 2, CHUNK_TOKENS, 4]
    assert rows[0]["num_tokens"] == CHUNK_TOKENS
    assert rows[0]["dtype"] == "float32"
    assert rows[1]["checksum"] is None


def test_stats_idle_after_traffic(make_pool, clock) -> None:
    pool = make_pool(num_slots=4)
    keys = prompt_keys(0, 3)
    put_chain(pool, keys, 1.0)
    pins = [pool.pin(keys, f"reader-{index}", ttl_s=5.0) for index in range(3)]
    pool.reserve(prompt_keys(1000, 1)[0], "dead-writer", ttl_s=1.0)
    pool.unpin(pins[0])
    pool.unpin(pins[1])

    clock.now_s += 10.0
    pool.expire()

    stats = pool.stats()
    assert stats["pinned"] == 0
    assert stats["pins"] == 0
    assert stats["reserved"] == 0
    assert stats["chunks"] == 3
    assert stats["bytes_used"] == 3 * CHUNK_BYTES
    assert stats["free_slots"] == 1
    assert stats["expired_pins"] == 1
    assert stats["expired_reservations"] == 1


def test_check_integrity_detects_refcount_drift(make_pool) -> None:
    pool = make_pool()
    key = prompt_keys(0, 1)[0]
    put(pool, key, 1.0)
    pool._index.get(key).refcount = 1

    with pytest.raises(RuntimeError, match="ChunkPool 'chunk-pool'.*refcount 1, but 0 live pins"):
        pool.check_integrity()
    pool._index.get(key).refcount = 0


def test_check_integrity_detects_slot_owned_twice(make_pool) -> None:
    pool = make_pool()
    keys = prompt_keys(0, 2)
    put(pool, keys[0], 1.0)
    put(pool, keys[1], 1.0)
    pool._index.get(keys[1]).slot = 0

    with pytest.raises(RuntimeError, match="owned twice"):
        pool.check_integrity(verify_checksums=False)
    pool._index.get(keys[1]).slot = 1


@pytest.mark.parametrize("spill_chunks", [4, 64])
def test_threads_mixed_traffic_keep_invariants(make_pool, tmp_path, spill_chunks: int) -> None:
    pool = make_pool(num_slots=6, spill_dir=tmp_path, spill_capacity_bytes=spill_chunks * 2 * CHUNK_BYTES)
    prompts = [prompt_keys(1000 * index, 3) for index in range(8)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                keys = rng.choice(prompts)
                match = pool.match_prefix(keys)
                for key in keys[: match.num_chunks]:
                    pool.promote(key)
                pin = pool.pin(keys, f"reader-{seed}", ttl_s=60.0)
                for key, parent in zip(keys, [None, *keys[:-1]]):
                    reservation = pool.reserve(key, f"writer-{seed}", ttl_s=60.0, parent=parent)
                    if reservation is not None:
                        pool.commit(reservation, payload(float(seed)))
                for slot in pin.slots:
                    assert pool.verify(slot)
                pool.unpin(pin)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    pool.check_integrity()
    stats = pool.stats()
    assert stats["pinned"] == 0
    assert stats["reserved"] == 0
    assert stats["promotions"] > 0
    assert [event.seq for event in pool.events_since(0)] == list(range(1, pool.last_seq + 1))
