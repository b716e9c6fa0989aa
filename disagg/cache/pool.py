"""``ChunkPool``: lookups, snapshots, statistics and integrity checks over the pool core.

A reader calls ``match_prefix`` for the longest cached run of leading keys,
``promote`` for matched chunks that are in the spill tier, then ``pin`` to
keep the chunks in memory while it copies them, and ``unpin`` when done::

    match_prefix(keys) -> MatchResult(num_chunks, slots)    slot None: in the spill tier
    promote(key) -> slot                                     back into memory
    pin(keys) -> Pin ... unpin(pin)                          no eviction in between

A snapshot contains every chunk listed in memory, most recently used first, so
a restore into a smaller pool keeps the most recent chunks. Chunks in the
spill tier are not part of a snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict

import pyarrow as pa
import torch

from disagg.cache.core import ChunkPoolCore
from disagg.cache.keys import CacheNamespace, check_key, key_hex
from disagg.cache.leases import check_ttl
from disagg.cache.metadata import ChunkEntry, metadata_table
from disagg.cache.snapshot import SNAPSHOT_FORMAT, open_snapshot, write_snapshot
from disagg.cache.types import MATCHABLE_STATES, ChunkState, MatchResult, Pin
from disagg.kv.layout import KVLayout

logger = logging.getLogger(__name__)

_LISTED = frozenset({ChunkState.LISTED})


class ChunkPool(ChunkPoolCore):
    """Per-node pool of KV chunks keyed by prefix hash. ``ChunkPoolCore`` has the write protocol.

    Thread-safe: every method that reads or changes chunks takes the pool's one lock.
    """

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike,
        namespace: CacheNamespace,
        layout: KVLayout,
        capacity_bytes: int,
        *,
        spill_dir: str | os.PathLike | None = None,
        spill_capacity_bytes: int = 0,
        name: str = "chunk-pool",
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 65536,
    ) -> ChunkPool:
        """Build a pool and fill it from the snapshot at ``path``.

        Chunks whose bytes fail their checksum are dropped with a WARNING,
        and so are the least recently used ones that do not fit. Every
        restored chunk gets a ``put`` event. Raises ValueError when the
        snapshot was written for another model, weights or layout, and
        OSError or ``pa.ArrowInvalid`` when the file is unreadable.
        """
        pool = cls(
            namespace,
            layout,
            capacity_bytes,
            spill_dir=spill_dir,
            spill_capacity_bytes=spill_capacity_bytes,
            name=name,
            clock=clock,
            max_events=max_events,
        )
        pool._load_snapshot(path)
        return pool

    # -- lookups --------------------------------------------------------------

    def match_prefix(self, keys: Sequence[bytes]) -> MatchResult:
        """Return the longest run of leading ``keys`` cached in memory or in the spill tier.

        Marks the matched chunks as used and counts hits and misses per
        chunk, so it mutates the pool. Raises ValueError for a malformed key.
        """
        for key in keys:
            check_key(key)
        with self._lock:
            self._expire_locked(self._clock())
            run = self._index.leading_run(keys, MATCHABLE_STATES)
            self._touch_locked(run)
            self._counters["hits"] += len(run)
            self._counters["misses"] += len(keys) - len(run)
            return MatchResult(len(run), [entry.slot for entry in run])

    def pin(self, keys: Sequence[bytes], owner: str, ttl_s: float) -> Pin:
        """Pin the leading run of ``keys`` listed in memory until ``unpin`` or ``ttl_s`` from now.

        The returned pin lists the chunks it pins, which may be fewer than
        requested, or none. Pinned chunks are never evicted. Mutates the
        pool. Raises ValueError for a malformed key or a non-positive ttl_s.
        """
        for key in keys:
            check_key(key)
        check_ttl(ttl_s)

        with self._lock:
            now_s = self._clock()
            self._expire_locked(now_s)
            run = self._index.leading_run(keys, _LISTED)
            pin = Pin(
                self._leases.next_id(),
                owner,
                tuple(entry.key for entry in run),
                tuple(entry.slot for entry in run),
                now_s + ttl_s,
            )
            if run:
                for entry in run:
                    entry.refcount += 1
                self._touch_locked(run)
                self._leases.add_pin(pin)
        return pin

    def unpin(self, pin: Pin) -> bool:
        """Release ``pin``, and return False when it was already released or expired.

        Idempotent. Mutates the pool.
        """
        with self._lock:
            self._expire_locked(self._clock())
            live = self._leases.pop_pin(pin.pin_id)
            if live is None:
                return False
            self._release_pin_locked(live)
        return True

    def read(self, slot: int) -> torch.Tensor:
        """Return a copy of the chunk in ``slot``. Mutates nothing.

        Raises ValueError when the slot contains no listed chunk. Pin the chunk
        first, or the slot may hold another chunk by the time this runs.
        """
        with self._lock:
            self._listed_entry_at(slot)
            return self._buffer.read(slot)

    def verify(self, slot: int) -> bool:
        """Return whether the bytes of ``slot`` match the checksum taken at commit. Mutates nothing.

        Raises ValueError when the slot contains no listed chunk.
        """
        with self._lock:
            entry = self._listed_entry_at(slot)
            return self._buffer.checksum(slot) == entry.checksum

    def promote(self, key: bytes) -> int | None:
        """Bring a chunk from the spill tier back into memory and return its slot.

        Returns the slot at once for a chunk listed in memory. Returns None
        when the key is not cached, is still being written, is unreadable on
        disk (then it is dropped with an ``evict`` event), or when every slot
        is pinned or reserved. May evict chunks. Mutates the pool.
        """
        check_key(key)
        with self._lock:
            now_s = self._clock()
            self._expire_locked(now_s)
            entry = self._index.get(key)
            if entry is None or entry.state is not ChunkState.SPILLED:
                return entry.slot if entry is not None and entry.state is ChunkState.LISTED else None

            self._spill.touch(key)
            slot = self._take_slot_locked()
            if slot is None:
                self._note_dropped_put_locked(key, now_s, "promotion")
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

    def _listed_entry_at(self, slot: int) -> ChunkEntry:
        self._check_slot(slot)
        key = self._index.key_at(slot)
        entry = self._index.get(key) if key is not None else None
        if entry is None or entry.state is not ChunkState.LISTED:
            raise ValueError(f"slot {slot} of pool {self.name!r} contains no listed chunk: pin a key before reading.")
        return entry

    # -- persistence and inspection ------------------------------------------

    def snapshot(self, path: str | os.PathLike) -> int:
        """Write every chunk listed in memory, metadata and bytes, to an Arrow IPC file at ``path``.

        Returns the number of chunks written. Holds the lock for the whole
        write and mutates nothing. Raises OSError when the file cannot be written.
        """
        with self._lock:
            entries = sorted(
                (entry for entry in self._index.entries.values() if entry.state is ChunkState.LISTED),
                key=lambda entry: entry.last_use,
                reverse=True,
            )
            data = [self._buffer.view_bytes(entry.slot) for entry in entries]
            write_snapshot(path, self._snapshot_header(), self._metadata_table_locked(entries), data)

        logger.info(
            "chunk pool %r: wrote %d chunks (%.1f MiB) to %s",
            self.name,
            len(entries),
            len(entries) * self.chunk_bytes / 2**20,
            path,
        )
        return len(entries)

    def metadata_table(self) -> pa.Table:
        """Return one ``METADATA_SCHEMA`` row per chunk in any state. Mutates nothing."""
        with self._lock:
            return self._metadata_table_locked(self._index.entries.values())

    def stats(self) -> dict:
        """Return sizes, chunk counts and counters of the pool. Mutates nothing.

        ``hits`` and ``misses`` count chunks, not lookups. ``pinned`` counts
        chunks with at least one pin, and ``pins`` the live pins.
        """
        with self._lock:
            entries = self._index.entries.values()
            states = Counter(entry.state for entry in entries)
            stats = {
                "bytes_used": (self.num_slots - self._index.num_free_slots) * self.chunk_bytes,
                "bytes_total": self.num_slots * self.chunk_bytes,
                "chunks": states[ChunkState.LISTED],
                "pinned": sum(entry.refcount > 0 for entry in entries),
                "pins": self._leases.num_pins,
                "reserved": states[ChunkState.RESERVED] + states[ChunkState.WRITING],
                "free_slots": self._index.num_free_slots,
                "spilled_chunks": states[ChunkState.SPILLED],
                "spill_bytes": self._spill.num_bytes,
                "last_seq": self._last_seq,
            }
            for counter in (
                "hits",
                "misses",
                "evictions",
                "skipped_puts",
                "dropped_puts",
                "expired_reservations",
                "expired_pins",
                "promotions",
                "spill_drops",
            ):
                stats[counter] = self._counters[counter]
            return stats

    def check_integrity(self, verify_checksums: bool = True) -> None:
        """Check the pool's invariants, and raise RuntimeError naming the pool when one is broken.

        Checks that free + used + reserved slots == num_slots, that no slot is
        owned twice, that refcounts equal the live pins, that parent links
        match the child counts, that leases match chunk states, and that the
        spill tier stores exactly the spilled chunks. With
        ``verify_checksums``, it also rehashes every listed chunk, which
        reads the whole pool under the lock. Mutates nothing.
        """
        with self._lock:
            pin_counts = self._leases.pin_counts()
            checksum = self._buffer.checksum if verify_checksums else None
            self._index.check(self.name, pin_counts, checksum)
            self._check_leases_locked()
            spilled = {key for key, entry in self._index.entries.items() if entry.state is ChunkState.SPILLED}
            self._spill.check_integrity(self.name, spilled)

    def close(self) -> None:
        """Drop every chunk in the spill tier and delete its files. Each chunk gets an ``evict`` event.

        The memory tier stays usable. Mutates the pool.
        """
        with self._lock:
            spilled = [entry for entry in self._index.entries.values() if entry.state is ChunkState.SPILLED]
            for entry in spilled:
                self._index.remove(entry)
                self._emit_locked("evict", entry.key)
            self._spill.discard_all()

    def _check_leases_locked(self) -> None:
        writing = {ChunkState.RESERVED, ChunkState.WRITING}
        num_writing = 0
        for entry in self._index.entries.values():
            has_reservation = entry.reservation is not None and self._leases.is_live(entry.reservation)
            if (entry.state in writing) != has_reservation:
                raise RuntimeError(
                    f"ChunkPool {self.name!r}: chunk {key_hex(entry.key)} is {entry.state.name} "
                    f"but {'has' if has_reservation else 'lacks'} a live reservation"
                )
            if entry.state not in writing and entry.checksum is None:
                raise RuntimeError(f"ChunkPool {self.name!r}: chunk {key_hex(entry.key)} is listed without a checksum")
            num_writing += entry.state in writing
        if num_writing != self._leases.num_reservations:
            raise RuntimeError(
                f"ChunkPool {self.name!r}: {self._leases.num_reservations} live reservations "
                f"but {num_writing} reserved chunks"
            )

    def _metadata_table_locked(self, entries: Iterable[ChunkEntry]) -> pa.Table:
        return metadata_table(entries, self.namespace.chunk_tokens, self.layout.dtype, self.chunk_shape)

    def _snapshot_header(self) -> dict:
        return {"format": SNAPSHOT_FORMAT, "namespace": asdict(self.namespace), "layout": asdict(self.layout)}

    def _load_snapshot(self, path: str | os.PathLike) -> None:
        with open_snapshot(path) as (header, rows), self._lock:
            self._check_snapshot_header(header, path)
            restored: list[ChunkEntry] = []
            num_rows = 0
            for row in rows:
                num_rows += 1
                entry = self._restore_row_locked(row)
                if entry is not None:
                    restored.append(entry)

            self._index.clock = max([self._index.clock] + [entry.last_use for entry in restored])
            self._index.rebuild_eviction_order()
            for entry in sorted(restored, key=lambda entry: entry.last_use):
                self._emit_locked("put", entry.key)

        level = logging.INFO if len(restored) == num_rows else logging.WARNING
        logger.log(
            level, "chunk pool %r: restored %d of %d chunks from %s", self.name, len(restored), num_rows, path
        )

    def _check_snapshot_header(self, header: dict, path: str | os.PathLike) -> None:
        written_for = CacheNamespace(**header["namespace"])
        if not written_for.same_except_salt(self.namespace) or header["layout"] != asdict(self.layout):
            raise ValueError(
                f"snapshot {path} was written for {written_for} with layout {header['layout']}, "
                f"but pool {self.name!r} serves {self.namespace} with layout {asdict(self.layout)}: "
                "restore it into a pool of the same model, weights and layout."
            )

    def _restore_row_locked(self, row: dict) -> ChunkEntry | None:
        key = row["key"]
        if self._index.get(key) is not None:
            return None
        slot = self._index.take_free_slot()
        if slot is None:
            return None

        try:
            self._buffer.load(slot, row["data"])
            intact = self._buffer.checksum(slot) == row["checksum"]
        except ValueError:
            intact = False
        if not intact:
            logger.warning("snapshot chunk %s failed its checksum or size and was dropped", key_hex(key))
            self._index.return_free_slot(slot)
            return None

        entry = ChunkEntry(key, row["namespace"], row["parent"], ChunkState.LISTED, row["last_use"], None, row["checksum"])
        self._index.place(entry, slot)
        return entry
