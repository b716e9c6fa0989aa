"""The cluster-wide chunk directory: which node's pool holds which chunk key.

Pools report puts and evictions as sequenced events; the coordinator applies
them here and answers prefix lookups. The directory is rebuildable: after a
coordinator restart it starts empty (lookups miss) and ``rebuild`` refills it
from each pool's listed keys.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

logger = logging.getLogger(__name__)


class PrefixLocation(NamedTuple):
    pool_id: str | None  # None: no chunk of the prefix is cached
    num_chunks: int


@dataclass
class _PoolView:
    node_id: str
    keys: set[bytes] = field(default_factory=set)
    last_seq: int = -1


class ChunkDirectory:
    """Maps chunk keys to the pools that list them. Not thread-safe: the coordinator loop owns it."""

    def __init__(self) -> None:
        self._pools: dict[str, _PoolView] = {}

    def add_pool(self, pool_id: str, node_id: str) -> None:
        self._pools.setdefault(pool_id, _PoolView(node_id))

    def remove_pool(self, pool_id: str) -> None:
        self._pools.pop(pool_id, None)

    @property
    def pool_ids(self) -> list[str]:
        return sorted(self._pools)

    def node_of(self, pool_id: str) -> str | None:
        view = self._pools.get(pool_id)
        return None if view is None else view.node_id

    def apply(self, pool_id: str, events: Iterable[tuple[int, str, bytes]]) -> int:
        """Apply ``(seq, kind, key)`` events in order, skipping ones already seen; return the last seq.

        Raises ``RuntimeError`` on a sequence gap, because the pool's view can
        no longer be trusted; the caller then rebuilds that pool.
        """
        view = self._pools[pool_id]
        for seq, kind, key in events:
            if seq <= view.last_seq:
                continue
            if seq != view.last_seq + 1 and view.last_seq >= 0:
                raise RuntimeError(f"chunk directory: pool {pool_id} skipped events {view.last_seq + 1}..{seq - 1}")
            if kind == "put":
                view.keys.add(key)
            elif kind == "evict":
                view.keys.discard(key)
            view.last_seq = seq
        return view.last_seq

    def rebuild(self, pool_id: str, keys: Iterable[bytes], last_seq: int) -> None:
        """Replace a pool's view with its full key list as of event ``last_seq``."""
        view = self._pools[pool_id]
        view.keys = set(keys)
        view.last_seq = last_seq
        logger.info("chunk directory: rebuilt pool %s with %d chunks", pool_id, len(view.keys))

    def lookup(self, keys: Sequence[bytes], prefer_node: str | None = None) -> PrefixLocation:
        """Return the pool holding the longest run of leading ``keys``; ties go to ``prefer_node``."""
        best = PrefixLocation(None, 0)
        best_local = False
        for pool_id in sorted(self._pools):
            view = self._pools[pool_id]
            length = 0
            while length < len(keys) and keys[length] in view.keys:
                length += 1
            local = view.node_id == prefer_node
            if length > best.num_chunks or (length == best.num_chunks and length > 0 and local and not best_local):
                best, best_local = PrefixLocation(pool_id, length), local
        return best

    def num_chunks(self) -> int:
        return sum(len(view.keys) for view in self._pools.values())
