"""Ownership of a request's KV blocks as an explicit state machine.

A prefill worker computes a request's KV into blocks it owns, then keeps
them until a decode worker has read them. A lease records the state of that
hand-off, so that blocks are freed exactly once, either by an explicit
release or by expiry when no reader comes.

    RESERVED --mark_written--> WRITTEN --start_read--> READING
                                  ^                       |
                                  +------read_failed------+

    any of the three --release--> RELEASED   (terminal)
    any of the three --expire---> EXPIRED    (terminal)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)


class KVState(Enum):
    """State of a lease in the hand-off of its KV blocks."""

    RESERVED = "reserved"  # blocks allocated, KV not yet computed
    WRITTEN = "written"  # KV complete, waiting for a reader
    READING = "reading"  # a reader is copying the blocks
    RELEASED = "released"  # terminal: the owner may free the blocks
    EXPIRED = "expired"  # terminal: deadline passed, the owner frees the blocks


_TERMINAL_STATES = frozenset({KVState.RELEASED, KVState.EXPIRED})

_LEGAL_TRANSITIONS: dict[KVState, frozenset[KVState]] = {
    KVState.RESERVED: frozenset({KVState.WRITTEN, KVState.RELEASED, KVState.EXPIRED}),
    KVState.WRITTEN: frozenset({KVState.READING, KVState.RELEASED, KVState.EXPIRED}),
    KVState.READING: frozenset({KVState.WRITTEN, KVState.RELEASED, KVState.EXPIRED}),
    KVState.RELEASED: frozenset(),
    KVState.EXPIRED: frozenset(),
}


@dataclass
class KVLease:
    """One request's claim on KV blocks, with its state and deadline.

    ``deadline_s`` and ``created_s`` are on the owning table's clock
    (``time.monotonic`` unless injected). ``payload`` is whatever the owner
    needs to free the memory, typically a list of block ids.
    """

    lease_id: str
    request_id: str
    deadline_s: float
    payload: Any = None
    state: KVState = KVState.RESERVED
    created_s: float = 0.0

    @property
    def is_terminal(self) -> bool:
        """Whether the lease is RELEASED or EXPIRED."""
        return self.state in _TERMINAL_STATES

    def mark_written(self) -> None:
        """Move RESERVED -> WRITTEN once the KV is complete. Raises RuntimeError otherwise."""
        self._transition(KVState.WRITTEN, "mark_written", allowed_from=(KVState.RESERVED,))

    def start_read(self) -> None:
        """Move WRITTEN -> READING when a reader begins. Raises RuntimeError otherwise."""
        self._transition(KVState.READING, "start_read", allowed_from=(KVState.WRITTEN,))

    def read_failed(self) -> None:
        """Move READING -> WRITTEN so another reader may retry. Raises RuntimeError otherwise."""
        self._transition(KVState.WRITTEN, "read_failed", allowed_from=(KVState.READING,))

    def release(self) -> None:
        """Move any non-terminal state -> RELEASED. Raises RuntimeError from a terminal state."""
        self._transition(KVState.RELEASED, "release")

    def expire(self) -> None:
        """Move any non-terminal state -> EXPIRED. Raises RuntimeError from a terminal state."""
        self._transition(KVState.EXPIRED, "expire")

    def _transition(
        self, target: KVState, action: str, allowed_from: tuple[KVState, ...] | None = None
    ) -> None:
        legal = target in _LEGAL_TRANSITIONS[self.state]
        if allowed_from is not None:
            legal = legal and self.state in allowed_from
        if not legal:
            raise RuntimeError(
                f"KV lease {self.lease_id!r} (request {self.request_id!r}): illegal transition "
                f"{self.state.name} -> {target.name} by {action}()"
            )

        logger.debug(
            "lease %s (request %s): %s -> %s", self.lease_id, self.request_id, self.state.name, target.name
        )
        self.state = target


class LeaseTable:
    """Active leases of one KV owner, keyed by request id.

    A lease leaves the table when it is released or expires, and its payload
    is handed back to the caller at that moment, exactly once. Not
    thread-safe: use it from the owner's event loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_finished: int = 4096) -> None:
        self._clock = clock
        self._leases: dict[str, KVLease] = {}
        # Recently finished request ids, which distinguish a late second
        # release from a release of an id this table never had.
        self._finished: OrderedDict[str, KVState] = OrderedDict()
        self._max_finished = max_finished
        self._next_lease_number = 0

    @property
    def num_active(self) -> int:
        """Number of leases not yet released or expired."""
        return len(self._leases)

    def add(self, request_id: str, payload: Any, ttl_s: float) -> KVLease:
        """Create a RESERVED lease for ``request_id`` that expires ``ttl_s`` from now.

        Mutates the table. Raises ValueError if the request already has an
        active lease or ``ttl_s`` is not positive.
        """
        if request_id in self._leases:
            raise ValueError(
                f"request {request_id!r} already has an active KV lease; release it before adding another"
            )
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s} for request {request_id!r}")

        now_s = self._clock()
        lease = KVLease(
            lease_id=f"lease-{self._next_lease_number}",
            request_id=request_id,
            deadline_s=now_s + ttl_s,
            payload=payload,
            created_s=now_s,
        )
        self._next_lease_number += 1
        self._leases[request_id] = lease
        self._finished.pop(request_id, None)
        return lease

    def active_request_ids(self) -> list[str]:
        """Return the request ids of every active lease, as a new list."""
        return list(self._leases)

    def get(self, request_id: str) -> KVLease | None:
        """Return the active lease of ``request_id``, or None if it has none."""
        return self._leases.get(request_id)

    def release(self, request_id: str) -> Any:
        """Release the lease of ``request_id`` and return its payload.

        Returns the payload only on the first call. A second release, or a
        release after expiry (whose payload ``expire_due`` already returned),
        returns None. Mutates the table. Raises RuntimeError if the lease in
        the table was already moved to a terminal state behind its back.
        """
        lease = self._leases.get(request_id)
        if lease is None:
            if request_id in self._finished:
                logger.debug(
                    "release of request %s ignored: lease already %s",
                    request_id,
                    self._finished[request_id].name,
                )
            else:
                logger.warning("release of request %s ignored: no lease with that request id", request_id)
            return None

        lease.release()
        self._finish(lease)
        return lease.payload

    def expire_due(self, now_s: float | None = None) -> list[KVLease]:
        """Expire every lease whose deadline is at or before ``now_s`` (default: the clock).

        Returns the expired leases ordered by deadline, so that the owner
        frees their payloads. They leave the table. Mutates the table.

        NOTE: a lease in READING expires too, so a reader's READ timeout must
        end before the lease deadline, or the READ may copy reused blocks.
        """
        if now_s is None:
            now_s = self._clock()

        due = sorted(
            (lease for lease in self._leases.values() if lease.deadline_s <= now_s),
            key=lambda lease: lease.deadline_s,
        )
        for lease in due:
            logger.warning(
                "KV lease %s for request %s expired in state %s, %.3f s after its creation",
                lease.lease_id,
                lease.request_id,
                lease.state.name,
                now_s - lease.created_s,
            )
            lease.expire()
            self._finish(lease)
        return due

    def check_integrity(self) -> None:
        """Check the table's invariants. Mutates nothing.

        Raises RuntimeError if an active lease is terminal, is filed under
        another request id, shares a lease id, or has a deadline before its
        creation time.
        """
        lease_ids: set[str] = set()
        for request_id, lease in self._leases.items():
            if lease.is_terminal:
                raise RuntimeError(
                    f"LeaseTable: lease {lease.lease_id!r} is {lease.state.name} but still active"
                )
            if lease.request_id != request_id:
                raise RuntimeError(
                    f"LeaseTable: lease {lease.lease_id!r} of request {lease.request_id!r} filed under {request_id!r}"
                )
            if lease.lease_id in lease_ids:
                raise RuntimeError(f"LeaseTable: lease id {lease.lease_id!r} used twice")
            if lease.deadline_s < lease.created_s:
                raise RuntimeError(
                    f"LeaseTable: lease {lease.lease_id!r} deadline {lease.deadline_s} is before "
                    f"its creation {lease.created_s}"
                )
            lease_ids.add(lease.lease_id)

    def _finish(self, lease: KVLease) -> None:
        del self._leases[lease.request_id]
        self._finished[lease.request_id] = lease.state
        while len(self._finished) > self._max_finished:
            self._finished.popitem(last=False)
