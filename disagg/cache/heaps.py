"""Min-heaps with lazy deletion, for eviction order and deadlines.

Both heaps keep items that went stale (a chunk touched again, a pin
released early) until they reach the top or a compaction, and ask the
pool whether an item is still current before acting on it. Pushing and
popping are O(log n) either way.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import Literal

DeadlineKind = Literal["reservation", "pin"]


class EvictionQueue:
    """Chunks that may be evicted, least recently used first.

    The pool pushes ``(last_use, key)`` whenever a chunk becomes evictable or
    an evictable chunk is used again. ``pop`` skips items that
    ``is_current(key, last_use)`` rejects.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, last_use: int, key: bytes) -> None:
        heapq.heappush(self._heap, (last_use, key))

    def pop(self, is_current: Callable[[bytes, int], bool]) -> bytes | None:
        """Remove and return the least recently used current key, or None if there is none."""
        while self._heap:
            last_use, key = heapq.heappop(self._heap)
            if is_current(key, last_use):
                return key
        return None

    def rebuild(self, current: Iterable[tuple[int, bytes]]) -> None:
        """Replace the contents with ``current``, dropping every stale item."""
        self._heap = list(current)
        heapq.heapify(self._heap)


class DeadlineQueue:
    """Deadlines of reservations and pins, earliest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, DeadlineKind, int]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline_s: float, kind: DeadlineKind, ident: int) -> None:
        heapq.heappush(self._heap, (deadline_s, next(self._order), kind, ident))

    def pop_due(self, now_s: float) -> list[tuple[DeadlineKind, int]]:
        """Remove and return ``(kind, ident)`` of every deadline at or before ``now_s``, earliest first."""
        due = []
        while self._heap and self._heap[0][0] <= now_s:
            _, _, kind, ident = heapq.heappop(self._heap)
            due.append((kind, ident))
        return due

    def compact(self, is_live: Callable[[DeadlineKind, int], bool]) -> None:
        """Drop every item whose reservation or pin ``is_live`` reports as ended."""
        self._heap = [item for item in self._heap if is_live(item[2], item[3])]
        heapq.heapify(self._heap)
