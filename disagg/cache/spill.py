"""Spill tier: where chunks evicted from pool memory go instead of being dropped.

``make_spill_tier`` returns ``NoSpillTier`` when no spill directory is set,
so the pool never branches on a flag. ``DiskSpillTier`` writes one Arrow IPC
file per chunk and drops its least recently used files when they exceed
``capacity_bytes``. The pool keeps each spilled chunk's metadata, and this
tier stores only bytes, file sizes and recency.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from disagg.cache.keys import KEY_BYTES, key_hex

logger = logging.getLogger(__name__)

_SUFFIX = ".chunk.arrow"
_TEMPORARY_SUFFIX = ".chunk.tmp"
_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary(KEY_BYTES), nullable=False),
        pa.field("checksum", pa.uint64(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ]
)


class SpillTier(ABC):
    """Bytes of chunks evicted from memory, bounded by ``capacity_bytes``. Not thread-safe."""

    capacity_bytes: int = 0

    @property
    @abstractmethod
    def num_chunks(self) -> int: ...

    @property
    @abstractmethod
    def num_bytes(self) -> int:
        """Bytes the tier uses on its medium, framing included."""

    @abstractmethod
    def put(self, key: bytes, data: pa.Buffer, checksum: int) -> list[bytes]:
        """Store ``data`` under ``key`` and return every key that left the tier to make room.

        The returned list contains ``key`` itself when the chunk could not be
        stored. Mutates the tier.
        """

    @abstractmethod
    def take(self, key: bytes, load: Callable[[pa.Buffer], None]) -> bool:
        """Pass the bytes of ``key`` to ``load``, then remove the chunk from the tier.

        Returns False, removing whatever was left, when the chunk is missing
        or unreadable. Mutates the tier.
        """

    @abstractmethod
    def touch(self, key: bytes) -> None:
        """Mark ``key`` as most recently used."""

    @abstractmethod
    def discard_all(self) -> None:
        """Remove every stored chunk."""

    @abstractmethod
    def check_integrity(self, pool_name: str, keys: set[bytes]) -> None:
        """Raise RuntimeError naming ``pool_name`` unless the tier stores exactly ``keys``."""


class NoSpillTier(SpillTier):
    """A spill tier that stores nothing: evicted chunks are dropped."""

    num_chunks = 0
    num_bytes = 0

    def put(self, key: bytes, data: pa.Buffer, checksum: int) -> list[bytes]:
        return [key]

    def take(self, key: bytes, load: Callable[[pa.Buffer], None]) -> bool:
        return False

    def touch(self, key: bytes) -> None:
        pass

    def discard_all(self) -> None:
        pass

    def check_integrity(self, pool_name: str, keys: set[bytes]) -> None:
        if keys:
            raise RuntimeError(f"ChunkPool {pool_name!r}: {len(keys)} chunks are SPILLED but no spill tier is set")


class DiskSpillTier(SpillTier):
    """One Arrow IPC file per chunk under ``spill_dir``, least recently used dropped first.

    NOTE: the directory belongs to one pool, because start-up removes every
    ``*.chunk.arrow`` and ``*.chunk.tmp`` file left in it.
    """

    def __init__(self, spill_dir: str | os.PathLike, capacity_bytes: int) -> None:
        self.spill_dir = Path(spill_dir)
        self.capacity_bytes = capacity_bytes
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._file_bytes: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._num_bytes = 0

        stale = [*self.spill_dir.glob(f"*{_SUFFIX}"), *self.spill_dir.glob(f"*{_TEMPORARY_SUFFIX}")]
        for path in stale:
            path.unlink()
        logger.info(
            "chunk spill tier: %s, capacity %.1f MiB, removed %d stale chunk files",
            self.spill_dir,
            capacity_bytes / 2**20,
            len(stale),
        )

    @property
    def num_chunks(self) -> int:
        return len(self._file_bytes)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def put(self, key: bytes, data: pa.Buffer, checksum: int) -> list[bytes]:
        self._remove(key)
        path = self._path(key)
        temporary = self.spill_dir / f"{key_hex(key)}{_TEMPORARY_SUFFIX}"
        batch = pa.record_batch(
            [
                pa.array([key], pa.binary(KEY_BYTES)),
                pa.array([checksum], pa.uint64()),
                pa.Array.from_buffers(pa.large_binary(), 1, [None, _offsets(data.size), data]),
            ],
            schema=_SCHEMA,
        )
        try:
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
                writer.write_batch(batch)
            os.replace(temporary, path)
        except OSError as error:
            logger.warning("spilling chunk %s to %s failed, so it was dropped: %s", key_hex(key), path, error)
            temporary.unlink(missing_ok=True)
            return [key]

        self._file_bytes[key] = path.stat().st_size
        self._num_bytes += self._file_bytes[key]

        dropped = []
        while self._num_bytes > self.capacity_bytes:
            oldest = next(iter(self._file_bytes))
            self._remove(oldest)
            dropped.append(oldest)
        return dropped

    def take(self, key: bytes, load: Callable[[pa.Buffer], None]) -> bool:
        if key not in self._file_bytes:
            return False
        try:
            with pa.memory_map(str(self._path(key))) as source:
                batch = pa.ipc.open_file(source).get_batch(0)
                if batch.column("key")[0].as_py() != key:
                    raise ValueError("file contains another key")
                load(batch.column("data")[0].as_buffer())
        except (OSError, ValueError, pa.ArrowException) as error:
            logger.warning("spilled chunk %s is unreadable and was dropped: %s", key_hex(key), error)
            self._remove(key)
            return False

        self._remove(key)
        return True

    def touch(self, key: bytes) -> None:
        if key in self._file_bytes:
            self._file_bytes.move_to_end(key)

    def discard_all(self) -> None:
        for key in list(self._file_bytes):
            self._remove(key)

    def check_integrity(self, pool_name: str, keys: set[bytes]) -> None:
        if set(self._file_bytes) != keys:
            raise RuntimeError(
                f"ChunkPool {pool_name!r}: spill tier stores {len(self._file_bytes)} chunks "
                f"but the pool lists {len(keys)} as SPILLED"
            )
        if self._num_bytes != sum(self._file_bytes.values()) or self._num_bytes > self.capacity_bytes:
            raise RuntimeError(
                f"ChunkPool {pool_name!r}: spill tier counts {self._num_bytes} bytes, "
                f"files sum to {sum(self._file_bytes.values())}, capacity {self.capacity_bytes}"
            )
        missing = [key for key in self._file_bytes if not self._path(key).is_file()]
        if missing:
            raise RuntimeError(f"ChunkPool {pool_name!r}: spill file of chunk {key_hex(missing[0])} is missing")

    def _path(self, key: bytes) -> Path:
        return self.spill_dir / f"{key_hex(key)}{_SUFFIX}"

    def _remove(self, key: bytes) -> None:
        size = self._file_bytes.pop(key, None)
        if size is None:
            return
        self._num_bytes -= size
        self._path(key).unlink(missing_ok=True)


def make_spill_tier(spill_dir: str | os.PathLike | None, capacity_bytes: int) -> SpillTier:
    """Return the spill tier for these settings. Raises ValueError when they contradict each other."""
    if spill_dir is None:
        if capacity_bytes:
            raise ValueError(
                f"spill_capacity_bytes={capacity_bytes} is set without spill_dir: set spill_dir or drop the capacity."
            )
        return NoSpillTier()
    if capacity_bytes <= 0:
        raise ValueError(
            f"spill_dir={str(spill_dir)!r} needs spill_capacity_bytes > 0, got {capacity_bytes}."
        )
    return DiskSpillTier(spill_dir, capacity_bytes)


def _offsets(size: int) -> pa.Buffer:
    return pa.array([0, size], pa.int64()).buffers()[1]
