"""Replica scaling, autoscaling and cluster-wide stats of ``Cluster`` (a mixin).

Its methods run on the cluster's private event loop and use the cluster's
fleet, coordinator and pools.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import ray

from disagg.autoscale import AutoscalePolicy, Autoscaler, LoadSignals

logger = logging.getLogger(__name__)


class ScalingAndStats:
    """Scaling, autoscaling and stats of ``Cluster`` (a mixin)."""

    def enable_autoscaling(self, policy: AutoscalePolicy | None = None) -> None:
        """Start adjusting replica counts from recent load (see ``AutoscalePolicy``); idempotent."""
        policy = policy or AutoscalePolicy()

        async def start() -> None:
            if self._autoscale_task is None or self._autoscale_task.done():
                self._recent = collections.deque(self._recent, maxlen=policy.window)
                self._autoscale_task = asyncio.get_running_loop().create_task(self._autoscale(policy))

        self._call(start())
        logger.info("autoscaling on: %s", policy)

    def disable_autoscaling(self) -> None:
        """Stop the autoscaler; replicas stay as they are."""
        async def stop() -> None:
            if self._autoscale_task is not None:
                self._autoscale_task.cancel()
                self._autoscale_task = None

        self._call(stop())

    async def _autoscale(self, policy: AutoscalePolicy) -> None:
        scaler = Autoscaler(policy)
        while True:
            await asyncio.sleep(policy.interval_s)
            try:
                targets = scaler.decide(await self._load_signals())
                if any(t is not None for t in targets.values()):
                    logger.info("autoscaler: scaling to %s", targets)
                    await self._scale(targets, wait=False, drain_timeout_s=self.config.timeouts.admission_s)
            except Exception:
                logger.exception("autoscaler step failed; trying again in %.1f s", policy.interval_s)

    async def _load_signals(self) -> LoadSignals:
        stats = await self._stats()
        recent = list(self._recent)

        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        decode = stats["decode"]
        return LoadSignals(
            num_prefill=stats["prefill"]["replicas"], num_decode=decode["replicas"],
            pending_prefill=stats["prefill"]["pending_replicas"], pending_decode=decode["pending_replicas"],
            prefill_queue_s=mean([m.queue_s for m in recent]), ttft_s=mean([m.ttft_s for m in recent]),
            decode_occupancy=(decode["running"] + decode["waiting"]) / max(1, decode["kv_blocks_total"]),
            tpot_s=mean([m.tpot_s for m in recent if m.tpot_s > 0]),
        )

    async def _forget_worker(self, worker_id: str) -> None:
        await self.fleet.forget(worker_id)

    def scale(self, prefill: int | None = None, decode: int | None = None, *, wait: bool = True,
              drain_timeout_s: float = 120.0) -> dict[str, Any]:
        """Grow or shrink the prefill and decode replicas while requests keep flowing.

        New replicas are placed by the kind's ``WorkerResources``; with
        ``wait=True`` this returns once they serve, otherwise they count as
        ``pending_replicas`` in ``stats()`` until Ray places them. Removed
        replicas stop getting requests, finish what they hold, then release
        their KV and NIXL registrations and exit. Returns, per removed
        worker, what it held at exit. Raises ``ValueError`` for a target < 1.
        """
        targets = {"prefill": prefill, "decode": decode}
        for kind, target in targets.items():
            if target is not None and (not isinstance(target, int) or target < 1):
                raise ValueError(f"{kind}={target!r} is invalid: keep at least 1 replica of each kind.")
        return self._call(self._scale(targets, wait, drain_timeout_s))

    async def _scale(self, targets: dict[str, int | None], wait: bool, drain_timeout_s: float) -> dict[str, Any]:
        removed: dict[str, Any] = {}
        loads = (await self._coordinator.stats.remote())["load"]
        for kind, target in targets.items():
            if target is None:
                continue
            have = self.fleet.count(kind) + self.fleet.num_pending(kind)
            if target > have and wait:
                created = [self.fleet.create(kind) for _ in range(target - have)]
                await asyncio.gather(*(self.fleet.start(w, h, self.config.timeouts.actor_start_s)
                                       for w, h in created))
            elif target > have:
                for _ in range(target - have):
                    self.fleet.start_in_background(kind)
            elif target < self.fleet.count(kind):
                requests = {w: load["requests"] for w, load in loads.items()}
                victims = self.fleet.pick_for_removal(kind, requests, self.fleet.count(kind) - target)
                results = await asyncio.gather(*(self.fleet.drain_and_remove(w, drain_timeout_s) for w in victims))
                removed.update(zip(victims, results))
        logger.info("scaled to %d prefill and %d decode replicas (%d and %d pending)", self.fleet.count("prefill"),
                    self.fleet.count("decode"), self.fleet.num_pending("prefill"), self.fleet.num_pending("decode"))
        return {"removed": removed}

    async def _stats(self) -> dict[str, Any]:
        ids = list(self._workers)
        kinds = dict(self._kinds)
        results = await asyncio.gather(*(self._workers[i].stats.remote() for i in ids), return_exceptions=True)
        pools = await asyncio.gather(*(handle.stats.remote() for handle in self._pools.values()))
        per_kind: dict[str, list[dict]] = {"prefill": [], "decode": []}
        for worker_id, result in zip(ids, results):
            if isinstance(result, ray.exceptions.RayActorError):
                logger.warning("worker %s is dead; leaving it out of stats and routing", worker_id)
                await self._forget_worker(worker_id)
                continue
            if isinstance(result, BaseException):
                raise result
            per_kind[kinds[worker_id]].append(result)
        prefill, decode = per_kind["prefill"], per_kind["decode"]
        return {
            "transport": self.transport,
            "prefill": {
                "replicas": len(prefill),
                "pending_replicas": self.fleet.num_pending("prefill"),
                "waiting": sum(w["waiting"] for w in prefill),
                "prefills": sum(w["prefills"] for w in prefill),
                "outbox_blocks_used": sum(w.get("outbox_blocks_used", 0) for w in prefill),
                "workers": prefill,
            },
            "decode": {
                "replicas": len(decode),
                "pending_replicas": self.fleet.num_pending("decode"),
                "running": sum(w["running"] for w in decode),
                "waiting": sum(w["waiting"] for w in decode),
                "kv_blocks_used": sum(w["kv_blocks_used"] for w in decode),
                "kv_blocks_total": sum(w["kv_blocks_total"] for w in decode),
                "workers": decode,
            },
            "leases_active": sum(w["leases_active"] for w in prefill),
            "nixl_transfers_in_flight": sum(w.get("nixl", {}).get("num_in_flight", 0) for w in prefill + decode),
            "transfers": {
                "count": sum(w["transfers"] for w in decode),
                "bytes": sum(w["transfer_bytes"] for w in decode),
            },
            "coordinator": await self._coordinator.stats.remote(),
            "cache": _cache_stats(pools, prefill, self.config.prefill_block_tokens),
        }



def _cache_stats(pools: list[dict], prefill: list[dict], chunk_tokens: int) -> dict[str, Any]:
    """Pool occupancy from the pools; hits and misses (in chunks) as the prefill workers saw them."""
    def total(name: str) -> int:
        return sum(p.get(name, 0) for p in pools)

    return {
        "chunk_tokens": chunk_tokens,
        "pools": len(pools),
        "pool_bytes_used": total("bytes_used"),
        "pool_bytes_total": total("bytes_total"),
        "chunks": total("chunks"),
        "pinned": total("pinned"),
        "reserved": total("reserved"),
        "hits": sum(w.get("cache_hits", 0) for w in prefill),
        "misses": sum(w.get("cache_misses", 0) for w in prefill),
        "evictions": total("evictions"),
        "spilled_chunks": total("spilled_chunks"),
    }
