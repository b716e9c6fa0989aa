"""Bookkeeping of the chunk pool: which key sits in which slot, and what to evict next.

Eviction order is leaves first, then least recently used::

    A0 -> A1 -> A2        A2 is a leaf (no child in memory). A0 and A1 are not.
    B0                    B0 is a leaf.

Only leaves with no pin are candidates, least recently used first, so a
prefix is evicted from its tail and a parent outlives its children. A chunk
that is reserved or being written counts as its parent's child. When no
leaf is free, the least recently used unpinned chunk of any kind goes.

``last_use`` is a logical clock. A lookup touches its chunks from the last
to the first, so the first chunk of a prefix is the most recently used.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence

from disagg.cache.heaps import EvictionQueue
from disagg.cache.keys import key_hex
from disagg.cache.metadata import ChunkEntry
from disagg.cache.types import ChunkState


class ChunkIndex:
    """Keys, slots, parent links and eviction order of one pool. Not thread-safe: the pool locks."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.entries: dict[bytes, ChunkEntry] = {}
        self._slot_keys: list[bytes | None] = [None] * num_slots
        self._free_slots = list(range(num_slots))  # a heap: lowest free slot first
        self._num_children: dict[bytes, int] = {}  # parent key -> children in memory
        self._evictable = EvictionQueue()
        self.clock = 0

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def get(self, key: bytes) -> ChunkEntry | None:
        return self.entries.get(key)

    def key_at(self, slot: int) -> bytes | None:
        return self._slot_keys[slot]

    def take_free_slot(self) -> int | None:
        """Remove and return the lowest free slot, or None when every slot is in use."""
        return heapq.heappop(self._free_slots) if self._free_slots else None

    def return_free_slot(self, slot: int) -> None:
        """Give back a slot from ``take_free_slot`` that no entry was placed in."""
        heapq.heappush(self._free_slots, slot)

    def place(self, entry: ChunkEntry, slot: int) -> None:
        """Record ``entry`` as occupying ``slot`` (taken from ``take_free_slot``) and link it to its parent."""
        entry.slot = slot
        self._slot_keys[slot] = entry.key
        self.entries[entry.key] = entry
        if entry.parent is not None:
            self._num_children[entry.parent] = self._num_children.get(entry.parent, 0) + 1
        self.push_if_evictable(entry)

    def vacate(self, entry: ChunkEntry) -> None:
        """Free the slot of an in-memory ``entry`` and unlink it from its parent. The entry stays in the index."""
        self._slot_keys[entry.slot] = None
        heapq.heappush(self._free_slots, entry.slot)
        entry.slot = None
        if entry.parent is None:
            return

        remaining = self._num_children[entry.parent] - 1
        if remaining:
            self._num_children[entry.parent] = remaining
            return
        del self._num_children[entry.parent]
        parent = self.entries.get(entry.parent)
        if parent is not None:
            self.push_if_evictable(parent)

    def remove(self, entry: ChunkEntry) -> None:
        """Forget ``entry``, freeing its slot first if it is in memory."""
        if entry.in_memory:
            self.vacate(entry)
        del self.entries[entry.key]

    def touch(self, entries: Sequence[ChunkEntry]) -> None:
        """Mark ``entries`` as just used, the first one as the most recent."""
        for entry in reversed(entries):
            self.clock += 1
            entry.last_use = self.clock
            self.push_if_evictable(entry)

    def leading_run(self, keys: Iterable[bytes], states: frozenset[ChunkState]) -> list[ChunkEntry]:
        """Return the entries of the leading keys whose state is in ``states``, up to the first other key."""
        run = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None or entry.state not in states:
                break
            run.append(entry)
        return run

    def is_evictable(self, entry: ChunkEntry) -> bool:
        """Return whether ``entry`` is a listed, unpinned leaf."""
        return (
            entry.state is ChunkState.LISTED and entry.refcount == 0 and entry.key not in self._num_children
        )

    def push_if_evictable(self, entry: ChunkEntry) -> None:
        if not self.is_evictable(entry):
            return
        self._evictable.push(entry.last_use, entry.key)
        # Every touch queues a new item, so drop the stale ones now and then.
        if len(self._evictable) > 4 * self.num_slots + 64:
            self.rebuild_eviction_order()

    def pop_victim(self) -> ChunkEntry | None:
        """Return the chunk to evict next, or None when every listed chunk is pinned.

        The caller must evict the returned entry: it is no longer queued.
        """
        key = self._evictable.pop(self._is_current)
        if key is not None:
            return self.entries[key]

        unpinned = [
            entry
            for entry in self.entries.values()
            if entry.state is ChunkState.LISTED and entry.refcount == 0
        ]
        return min(unpinned, key=lambda entry: entry.last_use, default=None)

    def _is_current(self, key: bytes, last_use: int) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.last_use == last_use and self.is_evictable(entry)

    def rebuild_eviction_order(self) -> None:
        """Requeue every evictable entry. Call it after bulk changes such as a restore."""
        self._evictable.rebuild(
            (entry.last_use, entry.key) for entry in self.entries.values() if self.is_evictable(entry)
        )

    def check(self, pool_name: str, pin_counts: dict[bytes, int], slot_checksum: Callable[[int], int] | None) -> None:
        """Raise RuntimeError naming ``pool_name`` if slots, refcounts, children or checksums disagree.

        ``pin_counts`` is the number of live pins per key. ``slot_checksum``,
        when given, recomputes a slot's checksum for every listed chunk.
        """
        self._check_slots(pool_name)
        children: dict[bytes, int] = {}
        for entry in self.entries.values():
            prefix = f"ChunkPool {pool_name!r}: chunk {key_hex(entry.key)}"
            if entry.refcount != pin_counts.get(entry.key, 0) or entry.refcount < 0:
                raise RuntimeError(
                    f"{prefix} has refcount {entry.refcount}, but {pin_counts.get(entry.key, 0)} live pins"
                )
            if entry.in_memory and entry.parent is not None:
                children[entry.parent] = children.get(entry.parent, 0) + 1
            listed = entry.state is ChunkState.LISTED
            if listed and slot_checksum is not None and slot_checksum(entry.slot) != entry.checksum:
                raise RuntimeError(f"{prefix} in slot {entry.slot} does not match its checksum")
        if children != self._num_children:
            raise RuntimeError(f"ChunkPool {pool_name!r}: parent links disagree with the child counts")

    def _check_slots(self, pool_name: str) -> None:
        in_memory = [entry for entry in self.entries.values() if entry.in_memory]
        owned = [entry.slot for entry in in_memory]
        free = set(self._free_slots)
        if len(set(owned)) != len(owned) or len(free) != len(self._free_slots) or free & set(owned):
            raise RuntimeError(f"ChunkPool {pool_name!r}: a slot is owned twice or both owned and free")
        if len(free) + len(owned) != self.num_slots:
            raise RuntimeError(
                f"ChunkPool {pool_name!r}: {len(free)} free + {len(owned)} used or reserved slots "
                f"!= {self.num_slots} slots"
            )
        for entry in in_memory:
            if self._slot_keys[entry.slot] != entry.key:
                raise RuntimeError(
                    f"ChunkPool {pool_name!r}: slot {entry.slot} maps to another key than chunk {key_hex(entry.key)}"
                )
        if any(self._slot_keys[slot] is not None for slot in free):
            raise RuntimeError(f"ChunkPool {pool_name!r}: a free slot still maps to a key")
        for entry in self.entries.values():
            if not entry.in_memory and (entry.slot is not None or entry.refcount):
                raise RuntimeError(f"ChunkPool {pool_name!r}: spilled chunk {key_hex(entry.key)} still has a slot or a pin")
