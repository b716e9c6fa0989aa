"""Load-based routing of requests to prefill and decode workers (pure, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

WorkerKind = Literal["prefill", "decode"]


@dataclass
class WorkerEntry:
    """One registered worker and the load the router has sent it."""

    worker_id: str
    kind: WorkerKind
    handle: Any  # the Ray actor handle
    handshake: bytes | None
    num_requests: int = 0  # routed and not yet finished
    num_tokens: int = 0  # prompt tokens of those requests
    draining: bool = False


@dataclass
class Router:
    """Picks the least-loaded worker of each kind; ties go round-robin."""

    workers: dict[str, WorkerEntry] = field(default_factory=dict)
    assignments: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # request -> (prefill, decode, n)
    _turn: int = 0

    def add(self, entry: WorkerEntry) -> None:
        self.workers[entry.worker_id] = entry

    def remove(self, worker_id: str) -> WorkerEntry | None:
        return self.workers.pop(worker_id, None)

    def of_kind(self, kind: WorkerKind) -> list[WorkerEntry]:
        return [w for w in self.workers.values() if w.kind == kind]

    def route(self, request_id: str, num_tokens: int, prefill_saving=None) -> tuple[WorkerEntry, WorkerEntry]:
        """Assign the request to a prefill and a decode worker; raise ``RuntimeError`` if a kind has none.

        ``prefill_saving(worker)`` returns the prompt tokens that worker would
        not compute (cached near it); the prefill worker with the least queued
        plus new compute wins.
        """
        if request_id in self.assignments:
            raise ValueError(f"request_id={request_id!r} is already in flight: use a unique request_id.")
        self._turn += 1
        saving = prefill_saving or (lambda worker: 0)
        prefill = self._pick("prefill", lambda w: (w.num_tokens + num_tokens - saving(w), w.num_requests))
        decode = self._pick("decode", lambda w: (w.num_requests, w.num_tokens))
        for worker in (prefill, decode):
            worker.num_requests += 1
            worker.num_tokens += num_tokens
        self.assignments[request_id] = (prefill.worker_id, decode.worker_id, num_tokens)
        return prefill, decode

    def prefill_done(self, request_id: str) -> None:
        """Stop counting the request's prompt tokens against its prefill worker."""
        prefill_id, decode_id, num_tokens = self.assignments.get(request_id, (None, None, 0))
        worker = self.workers.get(prefill_id)
        if worker is not None and num_tokens:
            worker.num_tokens -= num_tokens
            worker.num_requests -= 1
            self.assignments[request_id] = (None, decode_id, num_tokens)

    def finish(self, request_id: str) -> None:
        """Forget the request; unknown ids are ignored."""
        self.prefill_done(request_id)
        _, decode_id, num_tokens = self.assignments.pop(request_id, (None, None, 0))
        worker = self.workers.get(decode_id)
        if worker is not None:
            worker.num_requests -= 1
            worker.num_tokens -= num_tokens

    def _pick(self, kind: WorkerKind, load) -> WorkerEntry:
        candidates = [w for w in self.of_kind(kind) if not w.draining]
        if not candidates:
            raise RuntimeError(
                f"no {kind} worker is available (all died or are draining): "
                f"add one with cluster.scale({kind}=1)"
            )
        lowest = min(load(w) for w in candidates)
        tied = sorted((w for w in candidates if load(w) == lowest), key=lambda w: w.worker_id)
        return tied[self._turn % len(tied)]
