"""Outbox blocks, arena slots, and the byte regions a transfer copies between them."""

from __future__ import annotations

import ctypes

import pytest
import torch

from disagg.kv.arena import DecodeKVArena
from disagg.kv.layout import KVLayout, arena_regions, outbox_regions
from disagg.kv.outbox import OutboxFullError, PrefillKVBuffer

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32")


def random_kv(num_tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYOUT.num_kv_heads, num_tokens, LAYOUT.head_dim)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(LAYOUT.num_layers)]


def test_bytes_per_token():
    assert LAYOUT.bytes_per_token == 3 * 2 * 2 * 4 * 4
    smol = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32")
    assert smol.bytes_per_token == 46080
    assert KVLayout(30, 3, 64, "bfloat16").bytes_per_token == 23040


def test_outbox_allocates_exact_blocks_and_frees():
    outbox = PrefillKVBuffer(LAYOUT, num_blocks=4, block_tokens=8)
    assert outbox.allocate("a", 9) == [0, 1]
    assert outbox.allocate("b", 8) == [2]
    assert not outbox.can_allocate(9)
    with pytest.raises(OutboxFullError, match="needs 2"):
        outbox.allocate("c", 16)
    outbox.free([0, 1])
    assert outbox.allocate("c", 16) == [1, 0]
    outbox.check_integrity()
    with pytest.raises(RuntimeError, match="freed twice"):
        outbox.free([3])


def test_arena_hands_out_lowest_slot():
    arena = DecodeKVArena(LAYOUT, num_slots=3, slot_tokens=16)
    assert [arena.allocate(r) for r in "abc"] == [0, 1, 2]
    assert arena.allocate("d") is None
    arena.free(1)
    assert arena.allocate("e") == 1
    assert arena.owner(1) == "e"
    with pytest.raises(RuntimeError, match="freed twice"):
        arena.free(1) or arena.free(1)


def test_arena_budget_sizing():
    arena = DecodeKVArena.from_budget(LAYOUT, slot_tokens=10, kv_tokens=35)
    assert arena.num_slots == 3
    arena = DecodeKVArena.from_budget(LAYOUT, slot_tokens=10, kv_bytes=LAYOUT.bytes_per_token * 20)
    assert arena.num_slots == 2
    with pytest.raises(ValueError, match="below one slot"):
        DecodeKVArena.from_budget(LAYOUT, slot_tokens=10, kv_tokens=9)


@pytest.mark.parametrize("num_tokens", [1, 7, 8, 9, 16, 17, 23])
def test_regions_copy_outbox_into_arena_exactly(num_tokens):
    """Copying region i of the outbox into region i of the arena moves the KV intact."""
    outbox = PrefillKVBuffer(LAYOUT, num_blocks=6, block_tokens=8)
    outbox.allocate("filler", 8)  # so the request's blocks are not block 0
    block_ids = outbox.allocate("r", num_tokens)
    kv = random_kv(num_tokens)
    outbox.write(block_ids, kv)

    arena = DecodeKVArena(LAYOUT, num_slots=3, slot_tokens=32)
    src = outbox_regions(outbox.tensor, block_ids, num_tokens)
    dst = arena_regions(arena.tensor, 2, num_tokens, block_tokens=8)
    assert src.shape == dst.shape == (-(-num_tokens // 8) * 3 * 2 * 2, 2)
    assert (src[:, 1] == dst[:, 1]).all()
    for (src_addr, length), (dst_addr, _) in zip(src, dst):
        ctypes.memmove(int(dst_addr), int(src_addr), int(length))

    expected = torch.stack([torch.stack([k, v]) for k, v in kv])
    assert torch.equal(arena.read(2, num_tokens), expected)
    assert arena.tensor[:, :, 2, :, num_tokens:].abs().sum() == 0
    assert arena.tensor[:, :, :2].abs().sum() == 0
