"""Value types that cross the boundary between the chunk pool and its callers.

A chunk in the pool moves through these states::

    reserve ---> RESERVED --commit--> WRITING --checksum--> LISTED --evict--> SPILLED (or dropped)
                    |                                          ^                 |
                    +--abort / deadline passes--> slot freed   +----promote------+

Only LISTED and SPILLED chunks are visible to lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, NamedTuple


class ChunkState(Enum):
    """State of one chunk in the pool."""

    RESERVED = "reserved"  # a writer owns the slot, and the bytes are incomplete
    WRITING = "writing"  # commit in progress, exempt from expiry until it ends
    LISTED = "listed"  # bytes complete and checksummed, visible to lookups
    SPILLED = "spilled"  # bytes only in the spill tier, until promote() loads them


# States a lookup matches: the chunks this node can serve.
MATCHABLE_STATES = frozenset({ChunkState.LISTED, ChunkState.SPILLED})


@dataclass(frozen=True)
class Reservation:
    """A writer's exclusive claim on one key and one slot until ``deadline_s``.

    ``deadline_s`` is on the pool's clock. Compared by value, so a copy that
    travelled through Ray still identifies the claim.
    """

    reservation_id: int
    key: bytes
    slot: int
    owner: str
    deadline_s: float
    parent: bytes | None = None


@dataclass(frozen=True)
class Pin:
    """A reader's hold on the chunks of ``keys``, which are not evicted until unpin or ``deadline_s``.

    ``keys`` is the leading run of the requested keys that was in memory, and
    ``slots`` contains their slots in the same order.
    """

    pin_id: int
    owner: str
    keys: tuple[bytes, ...]
    slots: tuple[int, ...]
    deadline_s: float

    @property
    def num_chunks(self) -> int:
        """Number of chunks this pin keeps in memory."""
        return len(self.keys)


class MatchResult(NamedTuple):
    """Longest run of leading keys cached on this node.

    ``slots[i]`` is the memory slot of chunk ``i``, or None when that chunk
    is in the spill tier and needs ``promote`` before it can be read.
    """

    num_chunks: int
    slots: list[int | None]

    @property
    def num_spilled(self) -> int:
        """Number of matched chunks that are in the spill tier."""
        return sum(slot is None for slot in self.slots)


class CacheEvent(NamedTuple):
    """One change to the set of keys this node can serve, for a global index.

    ``put``: the key became available (a commit or a restore). ``evict``: the
    key left the node (dropped from memory with no spill tier, or dropped
    from the spill tier). A move between memory and spill tier is no event.
    """

    seq: int
    kind: Literal["put", "evict"]
    key: bytes


class ExpireCounts(NamedTuple):
    """Number of reservations and pins that one ``expire`` call ended."""

    reservations: int
    pins: int
