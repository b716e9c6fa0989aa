"""Decode-side KV arena: one preallocated slot per running sequence."""

from __future__ import annotations

import logging

import torch

from disagg.kv.layout import KVLayout, torch_dtype

logger = logging.getLogger(__name__)


class DecodeKVArena:
    """All decode KV memory in one tensor, allocated once and registered for transfer once.

    Layout: ``[num_layers, 2, num_slots, kv_heads, slot_tokens, head_dim]`` (see
    ``disagg.kv.layout``). A sequence owns one slot from reservation until it
    leaves; ``slot_tokens`` bounds prompt plus output length. Free slots are
    handed out lowest first so running sequences stay packed at the front.
    Not thread-safe: one actor thread owns it.
    """

    def __init__(self, layout: KVLayout, num_slots: int, slot_tokens: int) -> None:
        if num_slots < 1 or slot_tokens < 2:
            raise ValueError(
                f"decode arena of {num_slots} slots x {slot_tokens} tokens is invalid: "
                "need >= 1 slot of >= 2 tokens."
            )
        self.layout = layout
        self.num_slots = num_slots
        self.slot_tokens = slot_tokens
        shape = (layout.num_layers, 2, num_slots, layout.num_kv_heads, slot_tokens, layout.head_dim)
        # Zeroed: unused positions must hold finite numbers, because masked
        # attention still multiplies them by zero.
        self.tensor = torch.zeros(shape, dtype=torch_dtype(layout.dtype))
        self._owner: dict[int, str] = {}
        logger.info(
            "decode KV arena: %d slots x %d tokens, %.1f MiB (%d bytes per token)",
            num_slots,
            slot_tokens,
            self.tensor.numel() * self.tensor.element_size() / 2**20,
            layout.bytes_per_token,
        )

    @classmethod
    def from_budget(
        cls, layout: KVLayout, slot_tokens: int, kv_bytes: int | None = None, kv_tokens: int | None = None
    ) -> DecodeKVArena:
        """Size the arena by a byte or token budget; raise ``ValueError`` if it holds no slot."""
        if (kv_bytes is None) == (kv_tokens is None):
            raise ValueError("size the decode KV arena by exactly one of kv_bytes or kv_tokens.")
        budget_tokens = kv_tokens if kv_tokens is not None else kv_bytes // layout.bytes_per_token
        num_slots = budget_tokens // slot_tokens
        if num_slots < 1:
            raise ValueError(
                f"decode KV budget of {budget_tokens} tokens is below one slot of max_seq_len={slot_tokens}: "
                "raise the decode KV budget or lower max_seq_len."
            )
        return cls(layout, num_slots, slot_tokens)

    @property
    def num_used_slots(self) -> int:
        return len(self._owner)

    @property
    def num_free_slots(self) -> int:
        return self.num_slots - len(self._owner)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return layer ``layer``'s ``[num_slots, kv_heads, slot_tokens, head_dim]`` K and V views."""
        return self.tensor[layer, 0], self.tensor[layer, 1]

    def allocate(self, request_id: str) -> int | None:
        """Reserve the lowest free slot for ``request_id``; return None when all are taken."""
        for slot in range(self.num_slots):
            if slot not in self._owner:
                self._owner[slot] = request_id
                return slot
        return None

    def free(self, slot: int) -> None:
        """Release a slot; raise ``RuntimeError`` if it was not reserved."""
        if self._owner.pop(slot, None) is None:
            raise RuntimeError(f"decode arena: slot {slot} freed twice or never reserved")

    def owner(self, slot: int) -> str | None:
        return self._owner.get(slot)

    def write(self, slot: int, kv: torch.Tensor) -> None:
        """Copy a ``[num_layers, 2, kv_heads, n, head_dim]`` KV tensor into positions ``[0, n)`` of ``slot``."""
        num_tokens = kv.shape[3]
        self.tensor[:, :, slot, :, :num_tokens] = kv

    def read(self, slot: int, num_tokens: int) -> torch.Tensor:
        """Return a copy of a slot's first ``num_tokens`` positions as ``[num_layers, 2, kv_heads, n, head_dim]``."""
        return self.tensor[:, :, slot, :, :num_tokens].clone()

    def check_integrity(self) -> None:
        """Raise ``RuntimeError`` if a slot id is out of range."""
        bad = [slot for slot in self._owner if not 0 <= slot < self.num_slots]
        if bad:
            raise RuntimeError(f"decode arena: slots {bad} out of range 0..{self.num_slots - 1}")
