"""Per-node CPU pool of KV chunks, shared by every worker on the node.

A writer stores a chunk in three steps, and readers see it only after the
last one, so a listed chunk's slot always holds its complete bytes::

    reserve(key) -> Reservation     exclusive claim on key and slot, with a deadline
    commit(reservation, kv)         copy kv in, checksum it, list the key
      or commit_written(...)        after filling the slot through slot_regions()
    abort(reservation)              give the slot back

A reader calls ``match_prefix`` for the longest cached run of leading keys,
``promote`` for chunks in the spill tier, then ``pin`` to keep the chunks in
memory while it copies them, and ``unpin`` when done. Reservations and pins
whose deadline passes end on the next ``expire`` or mutating call.

Thread safety: one ``threading.Lock`` guards all state. Copying a chunk in
``commit`` and hashing in ``commit``/``commit_written`` run outside the lock,
because a WRITING chunk cannot expire or be evicted. Everything else,
including spill-tier disk IO and snapshots, runs under the lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from disagg.cache.heaps import DeadlineQueue
from disagg.cache.index import ChunkIndex
from disagg.cache.keys import CacheNamespace, check_key, chunk_layout_name, key_hex
from disagg.cache.metadata import ChunkEntry
from disagg.cache.slots import SlotBuffer
from disagg.cache.spill import make_spill_tier
from disagg.cache.types import CacheEvent, ChunkState, ExpireCounts, MatchResult, Pin, Reservation
from disagg.kv.layout import KVLayout

logger = logging.getLogger(__name__)

_MATCHABLE = frozenset({ChunkState.LISTED, ChunkState.SPILLED})
_LISTED = frozenset({ChunkState.LISTED})
_DROPPED_PUT_WARNING_INTERVAL_S = 10.0


class ChunkPoolCore:
    """Fixed-capacity host memory of KV chunks keyed by prefix hash, with an optional spill tier.

    The write, lookup and expiry protocol; ``ChunkPool`` adds snapshots,
    metadata, statistics and integrity checks.

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
        expected_layout = chunk_layout_name(layout)
        if namespace.kv_dtype != layout.dtype or namespace.kv_layout != expected_layout:
            raise ValueError(
                f"namespace kv_dtype={namespace.kv_dtype!r}, kv_layout={namespace.kv_layout!r} does not match "
                f"the pool layout (dtype {layout.dtype!r}, kv_layout {expected_layout!r}): "
                "build the namespace with CacheNamespace.for_model()."
            )
        self.name = name
        self.namespace = namespace
        self._namespace_digest_default = namespace.digest()
        self.layout = layout
        self._buffer = SlotBuffer(layout, namespace.chunk_tokens, capacity_bytes)
        self._spill = make_spill_tier(spill_dir, spill_capacity_bytes)
        self._clock = clock
        self._lock = threading.Lock()

        self._index = ChunkIndex(self._buffer.num_slots)
        self._reservations: dict[int, bytes] = {}  # reservation id -> key
        self._pins: dict[int, Pin] = {}
        self._deadlines = DeadlineQueue()
        self._next_id = itertools.count(1)
        self._events: deque[CacheEvent] = deque(maxlen=max_events)
        self._last_seq = 0
        self._counters: Counter[str] = Counter()
        self._last_drop_warning_s = float("-inf")

        logger.info(
            "chunk pool %r: %d slots x %d bytes (%d tokens per chunk), %.1f MiB of %.1f MiB requested",
            name,
            self.num_slots,
            self.chunk_bytes,
            namespace.chunk_tokens,
            self._buffer.total_bytes / 2**20,
            capacity_bytes / 2**20,
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
        a first chunk. ``namespace`` defaults to the pool's; another one may
        differ only in salt. Returns None, and the caller skips the write,
        when the key is cached or reserved already, or when every slot is
        pinned or reserved. May evict chunks. Mutates the pool. Raises
        ValueError for a malformed key, a non-positive ttl_s or a foreign namespace.
        """
        check_key(key)
        if parent is not None:
            check_key(parent, "parent")
        self._check_ttl(ttl_s)
        namespace_digest = self._namespace_digest(namespace)

        with self._lock:
            now_s = self._clock()
            self._expire_locked(now_s)
            if self._index.get(key) is not None:
                self._counters["skipped_puts"] += 1
                return None

            slot = self._take_slot_locked()
            if slot is None:
                self._note_dropped_put_locked(key, now_s)
                return None

            reservation = Reservation(next(self._next_id), key, slot, owner, now_s + ttl_s, parent)
            entry = ChunkEntry(key, namespace_digest, parent, ChunkState.RESERVED, self._index.clock, None)
            entry.reservation = reservation
            self._index.place(entry, slot)
            self._reservations[reservation.reservation_id] = key
            self._deadlines.push(reservation.deadline_s, "reservation", reservation.reservation_id)

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
        """
        return self._write_and_list(reservation, None)

    def abort(self, reservation: Reservation) -> bool:
        """End a reservation without listing its key and free its slot.

        Returns False when the reservation already ended or a commit of it is
        running. Idempotent. Mutates the pool.
        """
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._reserved_entry_locked(reservation)
            if entry is None or entry.state is not ChunkState.RESERVED:
                return False
            self._end_reservation_locked(entry)
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
                self._end_reservation_locked(entry)
            raise

        with self._lock:
            self._reservations.pop(reservation.reservation_id)
            entry.reservation = None
            entry.checksum = checksum
            entry.state = ChunkState.LISTED
            self._index.touch([entry])
            self._emit_locked("put", entry.key)
        return True

    # -- reads ----------------------------------------------------------------

    def match_prefix(self, keys: Sequence[bytes]) -> MatchResult:
        """Return the longest run of leading ``keys`` cached in memory or in the spill tier.

        Marks the matched chunks as used and counts hits and misses per
        chunk, so it mutates the pool. Raises ValueError for a malformed key.
        """
        for key in keys:
            check_key(key)
        with self._lock:
            self._expire_locked(self._clock())
            run = self._index.leading_run(keys, _MATCHABLE)
            self._touch_locked(run)
            self._counters["hits"] += len(run)
            self._counters["misses"] += len(keys) - len(run)
            return MatchResult(len(run), [entry.slot for entry in run])

    def pin(self, keys: Sequence[bytes], owner: str, ttl_s: float) -> Pin:
        """Pin the leading run of ``keys`` that is listed in memory until ``unpin`` or ``ttl_s`` from now.

        The returned pin lists the chunks it holds, which may be fewer than
        requested, or none. Pinned chunks are never evicted. Mutates the
        pool. Raises ValueError for a malformed key or a non-positive ttl_s.
        """
        for key in keys:
            check_key(key)
        self._check_ttl(ttl_s)
        with self._lock:
            now_s = self._clock()
            self._expire_locked(now_s)
            run = self._index.leading_run(keys, _LISTED)
            pin = Pin(
                next(self._next_id),
                owner,
                tuple(entry.key for entry in run),
                tuple(entry.slot for entry in run),
                now_s + ttl_s,
            )
            if run:
                for entry in run:
                    entry.refcount += 1
                self._touch_locked(run)
                self._pins[pin.pin_id] = pin
                self._deadlines.push(pin.deadline_s, "pin", pin.pin_id)
        return pin

    def unpin(self, pin: Pin) -> bool:
        """Release ``pin``; returns False when it was already released or expired. Idempotent. Mutates the pool."""
        with self._lock:
            self._expire_locked(self._clock())
            live = self._pins.pop(pin.pin_id, None)
            if live is None:
                return False
            self._release_pin_locked(live)
        return True

    def read(self, slot: int) -> torch.Tensor:
        """Return a copy of the chunk in ``slot``. Mutates nothing.

        Raises ValueError when the slot holds no listed chunk. Pin the chunk
        first, or the slot may hold another chunk by the time this runs.
        """
        with self._lock:
            self._listed_entry_at(slot)
            return self._buffer.read(slot)

    def verify(self, slot: int) -> bool:
        """Return whether the bytes of ``slot`` match the checksum taken at commit. Mutates nothing.

        Raises ValueError when the slot holds no listed chunk.
        """
        with self._lock:
            entry = self._listed_entry_at(slot)
            return self._buffer.checksum(slot) == entry.checksum

    def promote(self, key: bytes) -> int | None:
        """Bring a chunk from the spill tier back into memory and return its slot.

        Returns the slot at once for a chunk listed in memory. Returns None
        when the key is not cached, is still being written, is unreadable on
        disk (then it is dropped), or when every slot is pinned or reserved.
        May evict chunks. Mutates the pool.
        """
        check_key(key)
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._index.get(key)
            if entry is None or entry.state is not ChunkState.SPILLED:
                return entry.slot if entry is not None and entry.state is ChunkState.LISTED else None

            self._spill.touch(key)
            slot = self._take_slot_locked()
            if slot is None:
                self._note_dropped_put_locked(key, self._clock())
                return None
            if self._index.get(key) is not entry:  # making room dropped it from the spill tier
                self._index.return_free_slot(slot)
                return None
            return self._load_spilled_locked(entry, slot)

    def _load_spilled_locked(self, entry: ChunkEntry, slot: int) -> int | None:
        loaded = self._spill.take(entry.key, lambda data: self._buffer.load(slot, data))
        if loaded and self._buffer.checksum(slot) != entry.checksum:
            logger.warning("spilled chunk %s failed its checksum and was dropped", key_hex(entry.key))
            loaded = False
        if not loaded:
            self._index.return_free_slot(slot)
            self._index.remove(entry)
            self._counters["spill_drops"] += 1
            self._emit_locked("evict", entry.key)
            return None

        entry.state = ChunkState.LISTED
        self._index.place(entry, slot)
        self._index.touch([entry])
        self._counters["promotions"] += 1
        return slot

    # -- expiry, events, metadata ---------------------------------------------

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
        replay ``events_since(that seq)``: replaying a put or evict that the
        key list already reflects changes nothing.
        """
        with self._lock:
            return [key for key, entry in self._index.entries.items() if entry.state in _MATCHABLE]

    # -- private helpers, called with the lock held ----------------------------

    def _expire_locked(self, now_s: float) -> ExpireCounts:
        num_reservations = num_pins = 0
        for kind, ident in self._deadlines.pop_due(now_s):
            if kind == "pin":
                pin = self._pins.pop(ident, None)
                if pin is not None:
                    logger.warning("pin %d of %s on %d chunks expired unreleased", ident, pin.owner, pin.num_chunks)
                    self._release_pin_locked(pin)
                    num_pins += 1
                continue

            entry = self._index.get(self._reservations.get(ident, b""))
            # A WRITING chunk is mid-commit: its writer ends the reservation.
            if entry is not None and entry.state is ChunkState.RESERVED:
                logger.warning(
                    "reservation of chunk %s by %s expired without a commit; slot %d freed",
                    key_hex(entry.key),
                    entry.reservation.owner,
                    entry.slot,
                )
                self._end_reservation_locked(entry)
                num_reservations += 1

        self._counters["expired_reservations"] += num_reservations
        self._counters["expired_pins"] += num_pins
        if len(self._deadlines) > 4 * (len(self._pins) + len(self._reservations)) + 1024:
            self._deadlines.compact(self._is_lease_live)
        return ExpireCounts(num_reservations, num_pins)

    def _is_lease_live(self, kind: str, ident: int) -> bool:
        return ident in (self._pins if kind == "pin" else self._reservations)

    def _reserved_entry_locked(self, reservation: Reservation) -> ChunkEntry | None:
        if self._reservations.get(reservation.reservation_id) != reservation.key:
            return None
        entry = self._index.get(reservation.key)
        if entry is None or entry.reservation != reservation:
            return None
        return entry

    def _end_reservation_locked(self, entry: ChunkEntry) -> None:
        del self._reservations[entry.reservation.reservation_id]
        self._index.remove(entry)

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
        dropped = self._spill.put(entry.key, self._buffer.view_bytes(entry.slot), entry.checksum)
        self._index.vacate(entry)
        entry.state = ChunkState.SPILLED
        self._counters["evictions"] += 1
        logger.debug("evicted chunk %s (%d chunks left the spill tier)", key_hex(entry.key), len(dropped))

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

    def _note_dropped_put_locked(self, key: bytes, now_s: float) -> None:
        self._counters["dropped_puts"] += 1
        if now_s - self._last_drop_warning_s < _DROPPED_PUT_WARNING_INTERVAL_S:
            return
        self._last_drop_warning_s = now_s
        logger.warning(
            "chunk pool %r dropped the put of chunk %s: all %d slots are pinned or reserved "
            "(%d puts dropped so far); raise capacity_bytes or release pins sooner",
            self.name,
            key_hex(key),
            self.num_slots,
            self._counters["dropped_puts"],
        )

    def _listed_entry_at(self, slot: int) -> ChunkEntry:
        self._check_slot(slot)
        key = self._index.key_at(slot)
        entry = self._index.get(key) if key is not None else None
        if entry is None or entry.state is not ChunkState.LISTED:
            raise ValueError(f"slot {slot} of pool {self.name!r} holds no listed chunk: pin a key before reading.")
        return entry

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside pool {self.name!r} of {self.num_slots} slots.")

    def _namespace_digest(self, namespace: CacheNamespace | None) -> bytes:
        if namespace is None:
            return self._namespace_digest_default
        if not namespace.same_except_salt(self.namespace):
            raise ValueError(
                f"namespace {namespace} does not match pool {self.name!r} ({self.namespace}): "
                "only the salt may differ."
            )
        return namespace.digest()

    @staticmethod
    def _check_ttl(ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s={ttl_s} is invalid: use a positive number of seconds.")
