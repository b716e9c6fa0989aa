"""The worker actors of one cluster: start, register, drain and remove them.

Workers are added without blocking the caller when asked: a replica whose
resources Ray cannot grant yet stays *pending* (and Ray's autoscaler sees the
resource request) instead of hanging ``scale``. A removed worker first stops
receiving requests, finishes what it holds, and only then releases its KV and
NIXL registrations and exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Literal

import ray

from disagg.config import EngineConfig, WorkerResources

logger = logging.getLogger(__name__)

WorkerKind = Literal["prefill", "decode"]

_DRAIN_POLL_S = 0.05


class Fleet:
    """Owns a cluster's prefill and decode actors. Its async methods run on the driver's private loop."""

    def __init__(self, name: str, config: EngineConfig, transport: str, coordinator: Any,
                 resources: dict[str, WorkerResources]) -> None:
        self.name = name
        self.config = config
        self.transport = transport
        self.coordinator = coordinator
        self.resources = resources
        self.workers: dict[str, Any] = {}  # registered worker id -> actor handle
        self.kinds: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # worker id -> kind, created but not registered yet
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()

    def count(self, kind: str) -> int:
        return sum(1 for k in self.kinds.values() if k == kind)

    def num_pending(self, kind: str) -> int:
        return sum(1 for k in self.pending.values() if k == kind)

    def create(self, kind: str) -> tuple[str, Any]:
        """Create one worker actor (Ray places it when its resources are free); it is pending until registered."""
        from actors.decode_worker import DecodeWorker
        from actors.prefill_worker import PrefillWorker

        res = self.resources[kind]
        worker_id = f"{self.name}-{kind}-{next(self._ids)}"
        cls = PrefillWorker if kind == "prefill" else DecodeWorker
        handle = ray.remote(cls).options(
            name=worker_id, num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.resources or None,
            max_concurrency=1000,
        ).remote(worker_id, self.config.to_dict(), self.transport, res.threads)
        self.pending[worker_id] = kind
        return worker_id, handle

    async def start(self, worker_id: str, handle: Any, timeout_s: float | None) -> dict[str, Any]:
        """Wait for a created worker to load, then register it; return its start-up facts."""
        kind = self.pending[worker_id]
        try:
            try:
                info = await asyncio.wait_for(handle.start.remote(self.coordinator), timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"{kind} worker {worker_id} did not start within {timeout_s} s: Ray may have no node with "
                    f"free {self.resources[kind]}; check ray.available_resources(), use smaller WorkerResources, "
                    "or scale with wait=False to leave it pending"
                ) from None
            await asyncio.wait_for(
                self.coordinator.register.remote(worker_id, kind, handle, info["handshake"], info["node_id"]),
                self.config.timeouts.actor_start_s)
        except BaseException:
            self.pending.pop(worker_id, None)
            ray.kill(handle, no_restart=True)
            raise
        self.pending.pop(worker_id, None)
        self.workers[worker_id] = handle
        self.kinds[worker_id] = kind
        return info

    def start_in_background(self, kind: str) -> str:
        """Create a worker and register it whenever Ray places it; return its id at once."""
        worker_id, handle = self.create(kind)

        async def run() -> None:
            try:
                await self.start(worker_id, handle, None)
                logger.info("%s worker %s joined", kind, worker_id)
            except Exception as exc:  # noqa: BLE001 - logged; the replica simply does not join
                logger.error("%s worker %s failed to start: %r", kind, worker_id, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker_id

    async def drain_and_remove(self, worker_id: str, timeout_s: float) -> dict[str, Any]:
        """Stop routing to a worker, wait until it holds nothing, then shut it down and kill it.

        Returns what it held when it exited (all zero after a clean drain).
        A worker still busy after ``timeout_s`` is shut down anyway, with a
        WARNING naming what it still held.
        """
        handle = self.workers[worker_id]
        await self.coordinator.drain.remote(worker_id)
        deadline = time.monotonic() + timeout_s
        while True:
            routed = await self.coordinator.load.remote(worker_id)
            held = _held(self.kinds[worker_id], await handle.stats.remote())
            if routed == 0 and not any(held.values()):
                break
            if time.monotonic() > deadline:
                logger.warning("worker %s still held %s after %.0f s of draining; removing it anyway",
                               worker_id, held, timeout_s)
                break
            await asyncio.sleep(_DRAIN_POLL_S)

        await self.coordinator.remove_worker.remote(worker_id)
        final = await handle.shutdown.remote()
        ray.kill(handle, no_restart=True)
        self.workers.pop(worker_id, None)
        self.kinds.pop(worker_id, None)
        logger.info("removed worker %s; it held %s at exit", worker_id, final)
        return final

    async def forget(self, worker_id: str) -> None:
        """Stop routing to a dead worker and drop it from the fleet."""
        self.workers.pop(worker_id, None)
        self.kinds.pop(worker_id, None)
        try:
            await asyncio.wait_for(self.coordinator.remove_worker.remote(worker_id), self.config.timeouts.route_s)
        except Exception as exc:  # noqa: BLE001 - routing may still pick it; the next failure retries this
            logger.warning("could not remove dead worker %s from routing: %r", worker_id, exc)

    def pick_for_removal(self, kind: str, loads: dict[str, int], count: int) -> list[str]:
        """Choose ``count`` workers of a kind to remove: least loaded first, newest first on ties."""
        candidates = [w for w, k in self.kinds.items() if k == kind]
        candidates.sort(key=lambda w: (loads.get(w, 0), -int(w.rsplit("-", 1)[1])))
        return candidates[:count]

    def cancel_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _held(kind: str, stats: dict[str, Any]) -> dict[str, int]:
    if kind == "prefill":
        return {"waiting": stats["waiting"], "leases": stats["leases_active"],
                "outbox_blocks": stats.get("outbox_blocks_used", 0)}
    return {"waiting": stats["waiting"], "running": stats["running"], "kv_blocks": stats["kv_blocks_used"]}
