"""``ChunkPool``: the chunk pool with snapshots, metadata, statistics and integrity checks.

The write and lookup protocol lives in ``disagg.cache.core``. A snapshot
holds every chunk listed in memory, most recently used first, so a restore
into a smaller pool keeps the most recent chunks. Chunks in the spill tier
are not part of a snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

import pyarrow as pa

from disagg.cache.core import ChunkPoolCore
from disagg.cache.keys import CacheNamespace, key_hex
from disagg.cache.metadata import ChunkEntry, metadata_table
from disagg.cache.snapshot import SNAPSHOT_FORMAT, open_snapshot, write_snapshot
from disagg.cache.types import ChunkState
from disagg.kv.layout import KVLayout

logger = logging.getLogger(__name__)


class ChunkPool(ChunkPoolCore):
    """Per-node pool of KV chunks; see ``ChunkPoolCore`` for the write and lookup protocol.

    Thread-safe: every method takes the pool's one lock.
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
                "pins": len(self._pins),
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
        """Check the pool's invariants; raise RuntimeError naming the pool when one is broken.

        Checks that free + used + reserved slots == num_slots, that no slot is
        owned twice, that refcounts equal the live pins, that parent links
        match the child counts, that leases match chunk states, and that the
        spill tier stores exactly the spilled chunks. With
        ``verify_checksums``, it also rehashes every listed chunk, which
        reads the whole pool under the lock. Mutates nothing.
        """
        with self._lock:
            pin_counts = Counter(key for pin in self._pins.values() for key in pin.keys)
            checksum = self._buffer.checksum if verify_checksums else None
            self._index.check(self.name, pin_counts, checksum)
            self._check_leases_locked()
            spilled = {key for key, entry in self._index.entries.items() if entry.state is ChunkState.SPILLED}
            self._spill.check_integrity(self.name, spilled)

    def close(self) -> None:
        """Drop every chunk in the spill tier and delete its files; each gets an ``evict`` event.

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
            held = entry.reservation is not None and self._reservations.get(entry.reservation.reservation_id) == entry.key
            if (entry.state in writing) != held:
                raise RuntimeError(
                    f"ChunkPool {self.name!r}: chunk {key_hex(entry.key)} is {entry.state.name} "
                    f"but {'holds' if held else 'lacks'} a live reservation"
                )
            if entry.state not in writing and entry.checksum is None:
                raise RuntimeError(f"ChunkPool {self.name!r}: chunk {key_hex(entry.key)} is listed without a checksum")
            num_writing += entry.state in writing
        if num_writing != len(self._reservations):
            raise RuntimeError(
                f"ChunkPool {self.name!r}: {len(self._reservations)} live reservations "
                f"but {num_writing} reserved chunks"
            )

    def _metadata_table_locked(self, entries) -> pa.Table:
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
