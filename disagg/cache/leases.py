"""Live reservations and pins of a chunk pool, and the deadlines that end them.

A reservation is a writer's claim on one key and slot, and a pin is a reader's
hold on chunks. Both end explicitly (commit, abort, unpin) or when their
deadline passes and the pool next calls ``pop_due``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

from disagg.cache.heaps import DeadlineQueue
from disagg.cache.types import Pin, Reservation


class LeaseBook:
    """Reservations and pins by id, with their deadlines. Not thread-safe: the pool locks."""

    def __init__(self) -> None:
        self._reservations: dict[int, Reservation] = {}
        self._pins: dict[int, Pin] = {}
        self._deadlines = DeadlineQueue()
        self._ids = itertools.count(1)

    @property
    def num_reservations(self) -> int:
        return len(self._reservations)

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    def next_id(self) -> int:
        """Return a new id, unique among the reservations and pins of this book."""
        return next(self._ids)

    def add_reservation(self, reservation: Reservation) -> None:
        self._reservations[reservation.reservation_id] = reservation
        self._deadlines.push(reservation.deadline_s, "reservation", reservation.reservation_id)

    def is_live(self, reservation: Reservation) -> bool:
        """Return whether ``reservation`` (or an equal copy of it) has not ended."""
        return self._reservations.get(reservation.reservation_id) == reservation

    def end_reservation(self, reservation: Reservation) -> None:
        del self._reservations[reservation.reservation_id]

    def add_pin(self, pin: Pin) -> None:
        self._pins[pin.pin_id] = pin
        self._deadlines.push(pin.deadline_s, "pin", pin.pin_id)

    def pop_pin(self, pin_id: int) -> Pin | None:
        """Remove and return the live pin ``pin_id``, or None when it already ended."""
        return self._pins.pop(pin_id, None)

    def pin_counts(self) -> Counter[bytes]:
        """Return the number of live pins on each key."""
        return Counter(key for pin in self._pins.values() for key in pin.keys)

    def pop_due(
        self, now_s: float, may_expire: Callable[[Reservation], bool]
    ) -> tuple[list[Reservation], list[Pin]]:
        """End and return the reservations and pins whose deadline is at or before ``now_s``.

        A due reservation that ``may_expire`` rejects stays live, without a
        deadline: its writer is mid-commit and ends it.
        """
        reservations, pins = [], []
        for kind, ident in self._deadlines.pop_due(now_s):
            if kind == "pin":
                pin = self._pins.pop(ident, None)
                if pin is not None:
                    pins.append(pin)
                continue
            reservation = self._reservations.get(ident)
            if reservation is not None and may_expire(reservation):
                del self._reservations[ident]
                reservations.append(reservation)

        if len(self._deadlines) > 4 * (len(self._pins) + len(self._reservations)) + 1024:
            self._deadlines.compact(self._is_live_id)
        return reservations, pins

    def _is_live_id(self, kind: str, ident: int) -> bool:
        return ident in (self._pins if kind == "pin" else self._reservations)


def check_ttl(ttl_s: float) -> None:
    """Raise ValueError unless ``ttl_s`` is a positive number of seconds."""
    if not ttl_s > 0:
        raise ValueError(f"ttl_s={ttl_s} is invalid: use a positive number of seconds.")
