"""A transformers ``Cache`` over the decode arena, for one batched decode step.

Each row of the batch is one arena slot. ``update`` writes every row's new K/V
at that row's own position and returns a view of slots ``[lo, hi)`` up to the
longest sequence in the step::

    arena[layer, k|v, lo:hi, heads, 0:max_len, dim]   <- returned view
                        row i writes position positions[i]

Rows with no running sequence (holes between ``lo`` and ``hi``) are fed a
dummy token. They write into the last position of their slot. No transfer
touches that position, because a prompt is always shorter than the slot, and
a later sequence overwrites it before reading it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's K/V in the arena, written at per-row positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, step: StepIndex) -> None:
        super().__init__()
        self._all_keys = keys
        self._all_values = values
        self._step = step
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self._step
        # key_states: [batch, kv_heads, 1, head_dim]
        self._all_keys[step.slots, :, step.write_positions] = key_states[:, :, 0]
        self._all_values[step.slots, :, step.write_positions] = value_states[:, :, 0]
        keys = self._all_keys[step.lo : step.hi, :, : step.max_len]
        values = self._all_values[step.lo : step.hi, :, : step.max_len]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._step.max_len, 0

    def get_seq_length(self) -> int:
        return self._step.max_len - 1

    def get_max_length(self) -> int:
        return self._all_keys.shape[2]


class StepIndex:
    """Read and write positions of each row of one decode step.

    ``positions[i]`` is the number of tokens row i already holds, so its new
    token goes there; dummy rows write at the slot's last position instead.
    """

    def __init__(self, lo: int, positions: list[int], active: list[bool], slot_tokens: int) -> None:
        self.lo = lo
        self.hi = lo + len(positions)
        self.slots = torch.arange(self.lo, self.hi)
        self.max_len = max(p for p, a in zip(positions, active) if a) + 1
        self.write_positions = torch.tensor(
            [p if a else slot_tokens - 1 for p, a in zip(positions, active)], dtype=torch.long
        )
        self.position_ids = torch.tensor([[p if a else 0] for p, a in zip(positions, active)], dtype=torch.long)

        # Boolean mask [batch, 1, 1, max_len]: True where a row may attend.
        key_index = torch.arange(self.max_len)
        limits = torch.tensor([p if a else 0 for p, a in zip(positions, active)])
        self.attention_mask = (key_index[None, :] <= limits[:, None])[:, None, None, :]


def make_slot_cache(arena_layers: list[tuple[torch.Tensor, torch.Tensor]], step: StepIndex) -> Cache:
    return Cache(layers=[SlotLayer(keys, values, step) for keys, values in arena_layers])
