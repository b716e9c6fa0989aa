"""State of the per-node chunk pool and its write protocol.

A writer stores a chunk in two steps, and readers see it only after the
second, so a listed chunk's slot always contains its complete bytes::

    reserve(key) -> Reservation     exclusive claim on key and slot, with a deadline
    commit(reservation, kv)         copy kv in, checksum it, list the key
      or commit_written(...)        after filling the slot through slot_regions()
    abort(reservation)              give the slot back instead

Reservations and pins whose deadline passes end on the next ``expire`` or
mutating call. The lookup side (match, pin, promote) is in ``pool.py``.

Thread safety: one ``threading.Lock`` guards all state. The copy in
``commit`` and the hash in ``commit``/``commit_written`` run outside the
lock, because a WRITING chunk can neither expire nor be evicted. Everything
else, spill-tier disk IO and snapshots included, runs under the lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import numpy as np
import torch

from disagg.cache.index import ChunkIndex
from disagg.cache.keys import CacheNamespace, check_key, chunk_layout_name, key_hex
from disagg.cache.leases import LeaseBook, check_ttl
from disagg.cache.metadata import ChunkEntry
from disagg.cache.slots import SlotBuffer
from disagg.cache.spill import make_spill_tier
from disagg.cache.types import MATCHABLE_STATES, CacheEvent, ChunkState, ExpireCounts, Pin, Reservation
from disagg.kv.layout import KVLayout

logger = logging.getLogger(__name__)

_DROPPED_PUT_WARNING_INTERVAL_S = 10.0


class ChunkPoolCore:
    """Fixed-capacity host memory of KV chunks keyed by prefix hash, with an optional spill tier.

    Owns the state, the write protocol, expiry and events. ``ChunkPool``
    adds lookups, snapshots, statistics and integrity checks.

    ``capacity_bytes`` is rounded down to whole chunks. ``clock`` (seconds)
    sets reservation and pin deadlines. ``spill_dir`` and
    ``spill_capacity_bytes`` enable the disk spill tier. ``max_events``
    bounds the event history that ``events_since`` can replay.
    """

    def __init__(
        self,
        namespace: CacheNamespace,
        layout: KVLayout,
        capacity_bytes: int,
        *,
        spill_dir: str | os.PathLike | None = None,
        spill_capacity_bytes: int = 0,
        name: str = "chunk-pool",
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 65536,
    ) -> None:
        _check_namespace_fits(namespace, layout)
        self.name = name
        self.namespace = namespace
        self.layout = layout
        self._default_namespace_digest = namespace.digest()
        self._buffer = SlotBuffer(layout, namespace.chunk_tokens, capacity_bytes)
        self._spill = make_spill_tier(spill_dir, spill_capacity_bytes)
        self._clock = clock
        self._lock = threading.Lock()

        self._index = ChunkIndex(self._buffer.num_slots)
        self._leases = LeaseBook()
        self._events: deque[CacheEvent] = deque(maxlen=max_events)
        self._last_seq = 0
        self._counters: Counter[str] = Counter()
        self._last_drop_warning_s = float("-inf")

        logger.info(
            "chunk pool %r: %d slots x %d bytes (%d tokens per chunk) = %d bytes of %d requested",
            name,
            self.num_slots,
            self.chunk_bytes,
            namespace.chunk_tokens,
            self._buffer.total_bytes,
            capacity_bytes,
        )

    @property
    def num_slots(self) -> int:
        return self._buffer.num_slots

    @property
    def chunk_bytes(self) -> int:
        return self._buffer.chunk_bytes

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """Shape of one chunk: ``(num_layers, 2, kv_heads, chunk_tokens, head_dim)``."""
        return self._buffer.chunk_shape

    @property
    def last_seq(self) -> int:
        """Sequence number of the latest event, 0 before the first."""
        return self._last_seq

    # -- memory for transfers ------------------------------------------------

    def buffer_tensor(self) -> torch.Tensor:
        """Return the pool tensor ``[num_slots, *chunk_shape]`` over the one host buffer, to register once."""
        return self._buffer.tensor

    def slot_regions(self, slot: int) -> np.ndarray:
        """Return ``(address, num_bytes)`` rows of ``slot`` ordered by (layer, k/v, head).

        Mutates nothing. Raises ValueError for a slot outside the pool.
        """
        self._check_slot(slot)
        return self._buffer.regions(slot)

    # -- writes ---------------------------------------------------------------

    def reserve(
        self,
        key: bytes,
        owner: str,
        ttl_s: float,
        *,
        parent: bytes | None = None,
        namespace: CacheNamespace | None = None,
    ) -> Reservation | None:
        """Claim ``key`` and a slot for one writer until ``ttl_s`` from now.

        ``parent`` is the key of the previous chunk of the prompt, None for
        a first chunk. ``namespace`` defaults to the pool's, and another one
        may differ only in salt. Returns None, and the caller skips the
        write, when the key is cached or reserved already, or when every
        slot is pinned or reserved. May evict chunks. Mutates the pool.
        Raises ValueError for a malformed key, a non-positive ttl_s or a
        foreign namespace.
        """
        check_key(key)
        if parent is not None:
            check_key(parent, "parent")
        check_ttl(ttl_s)
        namespace_digest = self._namespace_digest(namespace)

        with self._lock:
            now_s = self._clock()
            self._expire_locked(now_s)
            if self._index.get(key) is not None:
                self._counters["skipped_puts"] += 1
                return None

            slot = self._take_slot_locked()
            if slot is None:
                self._note_dropped_put_locked(key, now_s, "put")
                return None

            reservation = Reservation(self._leases.next_id(), key, slot, owner, now_s + ttl_s, parent)
            entry = ChunkEntry(key, namespace_digest, parent, ChunkState.RESERVED, self._index.clock, None)
            entry.reservation = reservation
            self._index.place(entry, slot)
            self._leases.add_reservation(reservation)

        logger.debug("reserved chunk %s in slot %d for %s", key_hex(key), slot, owner)
        return reservation

    def commit(self, reservation: Reservation, kv: torch.Tensor) -> bool:
        """Copy ``kv`` (shape ``chunk_shape``, pool dtype) into the reserved slot and list the key.

        Returns False, writing nothing, when the reservation has expired or
        ended. Mutates the pool. Raises ValueError for a wrong shape or dtype.
        """
        if tuple(kv.shape) != self.chunk_shape or kv.dtype != self._buffer.dtype:
            raise ValueError(
                f"chunk KV of shape {tuple(kv.shape)} and dtype {kv.dtype} does not fit pool {self.name!r}: "
                f"expected shape {self.chunk_shape} and dtype {self._buffer.dtype}."
            )
        return self._write_and_list(reservation, lambda slot: self._buffer.write(slot, kv))

    def commit_written(self, reservation: Reservation) -> bool:
        """List the key of a slot the writer filled directly, checksumming the slot as it is.

        Returns False when the reservation has expired or ended. Mutates the pool.

        NOTE: the writer must finish its transfer before the deadline. After
        expiry the slot may go to another chunk, and a late transfer into it
        corrupts that chunk, which only ``verify`` would reveal.
        """
        return self._write_and_list(reservation, None)

    def abort(self, reservation: Reservation) -> bool:
        """End a reservation without listing its key, and free its slot.

        Returns False when the reservation already ended or a commit of it is
        running. Idempotent. Mutates the pool.
        """
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._reserved_entry_locked(reservation)
            if entry is None or entry.state is not ChunkState.RESERVED:
                return False
            self._leases.end_reservation(reservation)
            self._index.remove(entry)
        return True

    def _write_and_list(self, reservation: Reservation, write: Callable[[int], None] | None) -> bool:
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._reserved_entry_locked(reservation)
            if entry is None or entry.state is not ChunkState.RESERVED:
                logger.warning(
                    "commit of chunk %s by %s ignored: its reservation expired or ended",
                    key_hex(reservation.key),
                    reservation.owner,
                )
                return False
            entry.state = ChunkState.WRITING

        try:
            if write is not None:
                write(entry.slot)
            checksum = self._buffer.checksum(entry.slot)
        except BaseException:
            with self._lock:
                self._leases.end_reservation(reservation)
                self._index.remove(entry)
            raise

        with self._lock:
            self._leases.end_reservation(reservation)
            entry.reservation = None
            entry.checksum = checksum
            entry.state = ChunkState.LISTED
            self._index.touch([entry])
            self._emit_locked("put", entry.key)
        return True

    # -- expiry and events ----------------------------------------------------

    def expire(self) -> ExpireCounts:
        """End every reservation and pin whose deadline has passed, freeing their slots and refcounts.

        Mutates the pool. Every other mutating method does this first.
        """
        with self._lock:
            return self._expire_locked(self._clock())

    def events_since(self, seq: int) -> list[CacheEvent]:
        """Return the events after sequence number ``seq``, oldest first. Mutates nothing.

        Raises ValueError when events after ``seq`` were already discarded,
        or ``seq`` is ahead of the pool (a restarted pool). Then rebuild the
        index from ``listed_keys``.
        """
        with self._lock:
            oldest_seq = self._events[0].seq if self._events else self._last_seq + 1
            if seq < oldest_seq - 1 or seq > self._last_seq:
                raise ValueError(
                    f"events after seq {seq} are not available in pool {self.name!r}, which keeps "
                    f"seq {oldest_seq}..{self._last_seq}: rebuild the index from listed_keys()."
                )
            return [event for event in self._events if event.seq > seq]

    def listed_keys(self) -> list[bytes]:
        """Return every key a lookup can match, in memory or in the spill tier. Mutates nothing.

        To rebuild an index, read ``last_seq`` first, then call this, then
        replay ``events_since(that seq)``. Replaying a put or evict that the
        key list already reflects changes nothing.
        """
        with self._lock:
            return [key for key, entry in self._index.entries.items() if entry.state in MATCHABLE_STATES]

    # -- private helpers, called with the lock held ---------------------------

    def _expire_locked(self, now_s: float) -> ExpireCounts:
        reservations, pins = self._leases.pop_due(now_s, self._may_expire)
        for pin in pins:
            logger.warning("pin %d of %s on %d chunks expired unreleased", pin.pin_id, pin.owner, pin.num_chunks)
            self._release_pin_locked(pin)
        for reservation in reservations:
            logger.warning(
                "reservation of chunk %s by %s expired without a commit, so slot %d was freed",
                key_hex(reservation.key),
                reservation.owner,
                reservation.slot,
            )
            self._index.remove(self._index.get(reservation.key))

        self._counters["expired_reservations"] += len(reservations)
        self._counters["expired_pins"] += len(pins)
        return ExpireCounts(len(reservations), len(pins))

    def _may_expire(self, reservation: Reservation) -> bool:
        # A WRITING chunk is mid-commit: its writer ends the reservation.
        return self._index.get(reservation.key).state is ChunkState.RESERVED

    def _reserved_entry_locked(self, reservation: Reservation) -> ChunkEntry | None:
        if not self._leases.is_live(reservation):
            return None
        return self._index.get(reservation.key)

    def _release_pin_locked(self, pin: Pin) -> None:
        for key in pin.keys:
            entry = self._index.get(key)
            if entry is None or entry.refcount < 1:
                raise RuntimeError(f"ChunkPool {self.name!r}: pinned chunk {key_hex(key)} is missing or unpinned")
            entry.refcount -= 1
            self._index.push_if_evictable(entry)

    def _take_slot_locked(self) -> int | None:
        slot = self._index.take_free_slot()
        while slot is None:
            victim = self._index.pop_victim()
            if victim is None:
                return None
            self._evict_locked(victim)
            slot = self._index.take_free_slot()
        return slot

    def _evict_locked(self, entry: ChunkEntry) -> None:
        # NOTE: the spill write runs under the pool lock, so a slow disk stalls
        # every caller of the pool while a chunk is written out.
        dropped = self._spill.put(entry.key, self._buffer.view_bytes(entry.slot), entry.checksum)
        self._index.vacate(entry)
        entry.state = ChunkState.SPILLED
        self._counters["evictions"] += 1
        logger.debug("evicted chunk %s, and %d chunks left the node", key_hex(entry.key), len(dropped))

        for key in dropped:
            self._index.remove(self._index.get(key))
            if key != entry.key:
                self._counters["spill_drops"] += 1
            self._emit_locked("evict", key)

    def _touch_locked(self, entries: list[ChunkEntry]) -> None:
        self._index.touch(entries)
        for entry in reversed(entries):
            if entry.state is ChunkState.SPILLED:
                self._spill.touch(entry.key)

    def _emit_locked(self, kind: str, key: bytes) -> None:
        self._last_seq += 1
        self._events.append(CacheEvent(self._last_seq, kind, key))

    def _note_dropped_put_locked(self, key: bytes, now_s: float, action: str) -> None:
        self._counters["dropped_puts"] += 1
        if now_s - self._last_drop_warning_s < _DROPPED_PUT_WARNING_INTERVAL_S:
            return
        self._last_drop_warning_s = now_s
        logger.warning(
            "chunk pool %r dropped the %s of chunk %s: all %d slots are pinned or reserved "
            "(%d puts and promotions dropped so far). Raise capacity_bytes or release pins sooner",
            self.name,
            action,
            key_hex(key),
            self.num_slots,
            self._counters["dropped_puts"],
        )

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside pool {self.name!r} of {self.num_slots} slots.")

    def _namespace_digest(self, namespace: CacheNamespace | None) -> bytes:
        if namespace is None:
            return self._default_namespace_digest
        if not namespace.same_except_salt(self.namespace):
            raise ValueError(
                f"namespace {namespace} does not match pool {self.name!r} ({self.namespace}): "
                "only the salt may differ."
            )
        return namespace.digest()


def _check_namespace_fits(namespace: CacheNamespace, layout: KVLayout) -> None:
    expected_layout = chunk_layout_name(layout)
    if namespace.kv_dtype != layout.dtype or namespace.kv_layout != expected_layout:
        raise ValueError(
            f"namespace kv_dtype={namespace.kv_dtype!r}, kv_layout={namespace.kv_layout!r} does not match "
            f"the pool layout (dtype {layout.dtype!r}, kv_layout {expected_layout!r}): "
            "build the namespace with CacheNamespace.for_model()."
        )
