"""CacheCoordinator: the registry of workers and the router of requests."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from disagg.routing import Router, WorkerEntry

logger = logging.getLogger(__name__)


class CacheCoordinator:
    """Async Ray actor. Registers workers, wires their NIXL peers, and routes by load.

    State lives in ``Router``; every mutation happens on the actor's event loop.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.router = Router()
        self.timeout_s = timeout_s
        self._num_routed = 0

    async def register(self, worker_id: str, kind: str, handle: Any, handshake: bytes | None) -> None:
        """Add a worker and connect it with every worker of the other kind.

        Raises ``IncompatiblePeerError`` (from the peers) when the handshakes
        do not match; the worker is then not registered.
        """
        other = "decode" if kind == "prefill" else "prefill"
        peers = self.router.of_kind(other)
        if handshake is not None:
            calls = [peer.handle.add_peer.remote(handshake) for peer in peers]
            calls += [handle.add_peer.remote(peer.handshake) for peer in peers if peer.handshake is not None]
            await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        self.router.add(WorkerEntry(worker_id, kind, handle, handshake))
        logger.info("registered %s worker %s (%d %s peers)", kind, worker_id, len(peers), other)

    async def route(self, request_id: str, num_tokens: int) -> dict[str, Any]:
        """Pick a prefill and a decode worker for a request; return their ids and handles."""
        prefill, decode = self.router.route(request_id, num_tokens)
        self._num_routed += 1
        return {"prefill_id": prefill.worker_id, "prefill": prefill.handle,
                "decode_id": decode.worker_id, "decode": decode.handle}

    async def prefill_done(self, request_id: str) -> None:
        self.router.prefill_done(request_id)

    async def finish(self, request_id: str) -> None:
        self.router.finish(request_id)

    async def workers(self) -> dict[str, list[str]]:
        return {kind: sorted(w.worker_id for w in self.router.of_kind(kind)) for kind in ("prefill", "decode")}

    async def stats(self) -> dict[str, Any]:
        return {
            "routed": self._num_routed,
            "in_flight": len(self.router.assignments),
            "load": {w.worker_id: {"requests": w.num_requests, "tokens": w.num_tokens}
                     for w in self.router.workers.values()},
        }
