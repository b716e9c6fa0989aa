"""Per-chunk metadata of the pool: the in-memory record and its Arrow schema."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from disagg.cache.keys import KEY_BYTES
from disagg.cache.types import ChunkState, Reservation

METADATA_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary(KEY_BYTES), nullable=False),
        pa.field("namespace", pa.binary(), nullable=False),  # CacheNamespace.digest()
        pa.field("parent", pa.binary(KEY_BYTES)),  # key of the previous chunk, null for a first chunk
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("slot", pa.int32()),  # null while SPILLED
        pa.field("checksum", pa.uint64()),  # blake2b-64 of the slot bytes, null until committed
        pa.field("last_use", pa.int64(), nullable=False),  # the pool's logical clock
        pa.field("state", pa.string(), nullable=False),  # ChunkState value
        pa.field("refcount", pa.int32(), nullable=False),  # live pins on the chunk
    ]
)


@dataclass
class ChunkEntry:
    """The pool's record of one chunk, in memory or in the spill tier."""

    key: bytes
    namespace: bytes
    parent: bytes | None
    state: ChunkState
    last_use: int
    slot: int | None
    checksum: int | None = None
    refcount: int = 0
    reservation: Reservation | None = None

    @property
    def in_memory(self) -> bool:
        return self.state is not ChunkState.SPILLED


def metadata_table(
    entries: Iterable[ChunkEntry], num_tokens: int, dtype: str, shape: tuple[int, ...]
) -> pa.Table:
    """Return one ``METADATA_SCHEMA`` row per entry, in the given order."""
    entries = list(entries)
    columns = {
        "key": [entry.key for entry in entries],
        "namespace": [entry.namespace for entry in entries],
        "parent": [entry.parent for entry in entries],
        "num_tokens": [num_tokens] * len(entries),
        "dtype": [dtype] * len(entries),
        "shape": [list(shape)] * len(entries),
        "slot": [entry.slot for entry in entries],
        "checksum": [entry.checksum for entry in entries],
        "last_use": [entry.last_use for entry in entries],
        "state": [entry.state.value for entry in entries],
        "refcount": [entry.refcount for entry in entries],
    }
    return pa.Table.from_pydict(columns, schema=METADATA_SCHEMA)
