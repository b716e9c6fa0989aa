"""Shared CPU KV cache: prompt chunks keyed by prefix hash in a per-node pool.

``keys`` names chunks, ``pool.ChunkPool`` stores them. The remaining modules
are the pool's parts (slot memory, index and eviction order, spill tier,
snapshot file, metadata schema).
"""

from disagg.cache.keys import CacheNamespace, chunk_keys, chunk_layout_name, key_hex
from disagg.cache.metadata import METADATA_SCHEMA
from disagg.cache.pool import ChunkPool
from disagg.cache.types import CacheEvent, ChunkState, ExpireCounts, MatchResult, Pin, Reservation

__all__ = [
    "METADATA_SCHEMA",
    "CacheEvent",
    "CacheNamespace",
    "ChunkPool",
    "ChunkState",
    "ExpireCounts",
    "MatchResult",
    "Pin",
    "Reservation",
    "chunk_keys",
    "chunk_layout_name",
    "key_hex",
]
