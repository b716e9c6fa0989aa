"""Prefill-side KV outbox: preallocated blocks that hold KV until a decode worker reads it."""

from __future__ import annotations

import logging

import torch

from disagg.kv.layout import KVLayout, torch_dtype

logger = logging.getLogger(__name__)


class OutboxFullError(RuntimeError):
    """Raised when the outbox has too few free blocks for a request."""


class PrefillKVBuffer:
    """Fixed pool of KV blocks in one tensor, allocated once and registered for transfer once.

    Layout: ``[num_blocks, num_layers, 2, kv_heads, block_tokens, head_dim]``
    (see ``disagg.kv.layout``). Not thread-safe: one actor thread owns it.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, block_tokens: int) -> None:
        if num_blocks < 1 or block_tokens < 1:
            raise ValueError(
                f"outbox of {num_blocks} blocks x {block_tokens} tokens is invalid: both must be >= 1."
            )
        self.layout = layout
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.num_layers, 2, layout.num_kv_heads, block_tokens, layout.head_dim)
        self.tensor = torch.zeros(shape, dtype=torch_dtype(layout.dtype))
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner: dict[int, str] = {}
        logger.info(
            "prefill KV outbox: %d blocks x %d tokens, %.1f MiB",
            num_blocks,
            block_tokens,
            self.tensor.numel() * self.tensor.element_size() / 2**20,
        )

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Take blocks for ``num_tokens`` tokens; raise ``OutboxFullError`` if too few are free."""
        needed = self.blocks_needed(num_tokens)
        if needed > len(self._free):
            raise OutboxFullError(
                f"prefill outbox has {len(self._free)} free blocks, request {request_id} needs {needed}"
            )
        block_ids = [self._free.pop() for _ in range(needed)]
        for block in block_ids:
            self._owner[block] = request_id
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool; raise ``RuntimeError`` on a block that is not allocated."""
        for block in block_ids:
            if self._owner.pop(block, None) is None:
                raise RuntimeError(f"prefill outbox: block {block} freed twice or never allocated")
            self._free.append(block)

    def write(self, block_ids: list[int], layer_kv: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> None:
        """Copy each layer's ``(k, v)`` of shape ``[kv_heads, n, head_dim]`` into the blocks.

        ``start`` is the first token position to copy; positions before it are
        left as they are.
        """
        num_tokens = layer_kv[0][0].shape[1]
        for index, block in enumerate(block_ids):
            lo = max(index * self.block_tokens, start)
            hi = min((index + 1) * self.block_tokens, num_tokens)
            if lo >= hi:
                continue
            offset = index * self.block_tokens
            for layer, (keys, values) in enumerate(layer_kv):
                self.tensor[block, layer, 0, :, lo - offset : hi - offset] = keys[:, lo:hi]
                self.tensor[block, layer, 1, :, lo - offset : hi - offset] = values[:, lo:hi]

    def check_integrity(self) -> None:
        """Raise ``RuntimeError`` unless free + owned blocks == capacity with no overlap."""
        free = set(self._free)
        if len(free) != len(self._free) or free & set(self._owner) or len(free) + len(self._owner) != self.num_blocks:
            raise RuntimeError(
                f"prefill outbox inconsistent: {len(self._free)} free, {len(self._owner)} owned, "
                f"{self.num_blocks} total"
            )
