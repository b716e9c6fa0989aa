"""KV cache layouts and the byte regions a transfer copies.

Two layouts exist, each backed by one tensor registered for transfer once:

Prefill outbox (``PrefillKVBuffer``), paged in blocks of ``block_tokens``::

    outbox[num_blocks, num_layers, 2 (k, v), kv_heads, block_tokens, head_dim]
            |                                          |
            a request owns ceil(n / block_tokens)      token t of the request sits in
            blocks, in prompt order                    block t // block_tokens, row t % block_tokens

Decode arena (``DecodeKVArena``), one slot per running sequence::

    arena[num_layers, 2 (k, v), num_slots, kv_heads, slot_tokens, head_dim]
                                |                     |
                                arena[l, 0] is layer  positions [0, length) hold the
                                l's K for all slots   sequence's history

For one (layer, k/v, head) and one prompt block, both sides hold the block's
tokens as one contiguous run of ``tokens * head_dim`` elements, so a transfer is
``num_blocks * num_layers * 2 * kv_heads`` region pairs, listed in the same
order on both sides by ``outbox_regions`` and ``arena_regions``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

LAYOUT_VERSION = "outbox-blocks/arena-slots/v1"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name to ``torch.dtype``; raise ``ValueError`` for an unknown one."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype={name!r} is not supported: use one of {sorted(_DTYPES)}.") from None


@dataclass(frozen=True)
class KVLayout:
    """Model-side shape of the KV cache, shared by every worker of one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" or "bfloat16"

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=torch_dtype(self.dtype)).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def compat_fields(self, model_name: str, weights_digest: str, block_tokens: int) -> dict:
        """Fields two workers must agree on before KV bytes may flow between them."""
        fields = asdict(self)
        fields.update(
            model=model_name,
            weights_digest=weights_digest,
            block_tokens=block_tokens,
            layout_version=LAYOUT_VERSION,
        )
        return fields


def outbox_regions(buffer: torch.Tensor, block_ids: list[int], num_tokens: int) -> np.ndarray:
    """Return ``(address, num_bytes)`` rows of a request's KV in a prefill outbox."""
    num_blocks, num_layers, _, num_heads, block_tokens, head_dim = buffer.shape
    itemsize = buffer.element_size()
    strides = [s * itemsize for s in buffer.stride()]
    base = buffer.data_ptr()

    rows = []
    for index, block in enumerate(block_ids):
        tokens = min(block_tokens, num_tokens - index * block_tokens)
        for layer in range(num_layers):
            for kv in range(2):
                for head in range(num_heads):
                    address = base + block * strides[0] + layer * strides[1] + kv * strides[2] + head * strides[3]
                    rows.append((address, tokens * head_dim * itemsize))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def arena_regions(arena: torch.Tensor, slot: int, num_tokens: int, block_tokens: int) -> np.ndarray:
    """Return ``(address, num_bytes)`` rows of a slot's first ``num_tokens`` positions.

    Rows follow the order of ``outbox_regions`` for the same tokens.
    """
    num_layers, _, _, num_heads, _, head_dim = arena.shape
    itemsize = arena.element_size()
    strides = [s * itemsize for s in arena.stride()]
    base = arena.data_ptr() + slot * strides[2]

    rows = []
    num_blocks = -(-num_tokens // block_tokens)
    for index in range(num_blocks):
        start = index * block_tokens
        tokens = min(block_tokens, num_tokens - start)
        for layer in range(num_layers):
            for kv in range(2):
                for head in range(num_heads):
                    address = base + layer * strides[0] + kv * strides[1] + head * strides[3] + start * strides[4]
                    rows.append((address, tokens * head_dim * itemsize))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)
