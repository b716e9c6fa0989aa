"""The chunk pool's memory: one host buffer carved into equal chunk slots.

The buffer is allocated once through pyarrow and viewed as one tensor::

    pool[num_slots, num_layers, 2 (k, v), kv_heads, chunk_tokens, head_dim]
          |                              |
          one chunk per slot             for one (layer, k/v, head), the chunk's
                                         chunk_tokens * head_dim values are contiguous

A slot is ``chunk_bytes`` contiguous bytes, so its bytes can be hashed,
copied to disk or handed to Arrow without an extra copy.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import torch

from disagg.kv.layout import KVLayout, torch_dtype

logger = logging.getLogger(__name__)

# Integer numpy type of each element size: numpy has no bfloat16, so the
# buffer is read as integers of the same width and reinterpreted by torch.
_STORAGE_DTYPES = {2: np.int16, 4: np.int32}


def checksum_bytes(data: object) -> int:
    """Return the 64-bit blake2b checksum of a bytes-like object as an unsigned int."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class SlotBuffer:
    """Preallocated, zero-filled host memory for ``num_slots`` chunks. Not thread-safe by itself."""

    def __init__(self, layout: KVLayout, chunk_tokens: int, capacity_bytes: int) -> None:
        self.chunk_shape = (layout.num_layers, 2, layout.num_kv_heads, chunk_tokens, layout.head_dim)
        self.dtype = torch_dtype(layout.dtype)
        itemsize = layout.itemsize
        self.chunk_bytes = int(np.prod(self.chunk_shape)) * itemsize
        self.num_slots = capacity_bytes // self.chunk_bytes
        if self.num_slots < 1:
            raise ValueError(
                f"capacity_bytes={capacity_bytes} is smaller than one chunk of {self.chunk_bytes} bytes "
                f"({chunk_tokens} tokens): raise capacity_bytes or lower chunk_tokens."
            )

        self.arrow_buffer = pa.allocate_buffer(self.num_slots * self.chunk_bytes, resizable=False)
        raw = np.frombuffer(self.arrow_buffer, dtype=np.uint8)
        raw.fill(0)
        self._slot_bytes = raw.reshape(self.num_slots, self.chunk_bytes)
        storage = torch.from_numpy(np.frombuffer(self.arrow_buffer, dtype=_STORAGE_DTYPES[itemsize]))
        self.tensor = storage.view(self.dtype).view(self.num_slots, *self.chunk_shape)

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.chunk_bytes

    def write(self, slot: int, kv: torch.Tensor) -> None:
        """Copy ``kv`` (shape ``chunk_shape``, pool dtype) into ``slot``."""
        self.tensor[slot].copy_(kv)

    def read(self, slot: int) -> torch.Tensor:
        """Return a copy of ``slot`` as a ``chunk_shape`` tensor."""
        return self.tensor[slot].clone()

    def checksum(self, slot: int) -> int:
        """Return the 64-bit checksum of the slot's bytes."""
        return checksum_bytes(self._slot_bytes[slot])

    def view_bytes(self, slot: int) -> pa.Buffer:
        """Return the slot's bytes as an Arrow buffer that shares the pool's memory."""
        return self.arrow_buffer.slice(slot * self.chunk_bytes, self.chunk_bytes)

    def load(self, slot: int, data: pa.Buffer) -> None:
        """Copy ``chunk_bytes`` raw bytes into ``slot``. Raises ValueError for any other size."""
        if data.size != self.chunk_bytes:
            raise ValueError(f"chunk data of {data.size} bytes does not fill a {self.chunk_bytes}-byte slot.")
        self._slot_bytes[slot] = np.frombuffer(data, dtype=np.uint8)

    def regions(self, slot: int) -> np.ndarray:
        """Return ``(address, num_bytes)`` rows of ``slot``, ordered by (layer, k/v, head)."""
        num_layers, _, num_heads, chunk_tokens, head_dim = self.chunk_shape
        itemsize = self.tensor.element_size()
        strides = np.asarray(self.tensor.stride()[:4], dtype=np.int64) * itemsize

        layer, kv, head = (index.reshape(-1) for index in np.indices((num_layers, 2, num_heads)))
        addresses = (
            self.tensor.data_ptr() + slot * strides[0] + layer * strides[1] + kv * strides[2] + head * strides[3]
        )
        sizes = np.full_like(addresses, chunk_tokens * head_dim * itemsize)
        return np.stack([addresses, sizes], axis=1).astype(np.int64)
