"""Snapshot file of a chunk pool: metadata rows plus each chunk's bytes, as Arrow IPC.

The file has ``METADATA_SCHEMA`` plus a ``data`` column, one record batch
per chunk so that each batch can point at the pool's memory without a copy.
The schema metadata stores a header (format version, namespace, KV layout)
that ``open_snapshot`` returns for the pool to check against its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pyarrow as pa

from disagg.cache.metadata import METADATA_SCHEMA

SNAPSHOT_FORMAT = "disagg-chunk-pool-snapshot/v1"
_HEADER_KEY = b"disagg.cache.snapshot"

SNAPSHOT_SCHEMA = METADATA_SCHEMA.append(pa.field("data", pa.large_binary(), nullable=False))


def write_snapshot(path: str | os.PathLike, header: dict, rows: pa.Table, data: list[pa.Buffer]) -> None:
    """Write ``rows`` with ``data[i]`` as row ``i``'s bytes to ``path``, atomically by rename."""
    schema = SNAPSHOT_SCHEMA.with_metadata({_HEADER_KEY: msgpack.packb(header, use_bin_type=True)})
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")

    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for index, chunk_data in enumerate(data):
            columns = rows.slice(index, 1).columns
            columns.append(pa.chunked_array([_binary_array(chunk_data)]))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    os.replace(temporary, path)


@contextmanager
def open_snapshot(path: str | os.PathLike) -> Iterator[tuple[dict, Iterator[dict]]]:
    """Open a snapshot and yield its header and an iterator over its rows.

    Each row is a dict of the metadata columns plus ``data``, a ``pa.Buffer``
    of the chunk bytes mapped from the file and valid only inside the
    ``with`` block. Raises ValueError if the file is not a pool snapshot,
    and OSError or ``pa.ArrowInvalid`` if it is unreadable.
    """
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        metadata = reader.schema.metadata or {}
        if _HEADER_KEY not in metadata:
            raise ValueError(f"{path} is not a chunk pool snapshot: its schema has no {_HEADER_KEY.decode()} header.")
        header = msgpack.unpackb(metadata[_HEADER_KEY], raw=False)
        if header.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(
                f"{path} has snapshot format {header.get('format')!r}, but this version reads only {SNAPSHOT_FORMAT!r}."
            )
        yield header, _rows(reader)


def _rows(reader: pa.ipc.RecordBatchFileReader) -> Iterator[dict]:
    names = [name for name in reader.schema.names if name != "data"]
    for index in range(reader.num_record_batches):
        batch = reader.get_batch(index)
        data = batch.column("data")
        for row in range(batch.num_rows):
            values = {name: batch.column(name)[row].as_py() for name in names}
            values["data"] = data[row].as_buffer()
            yield values


def _binary_array(data: pa.Buffer) -> pa.Array:
    offsets = pa.array([0, data.size], pa.int64()).buffers()[1]
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])
