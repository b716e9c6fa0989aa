"""CacheCoordinator: the worker registry, the cluster-wide chunk directory, and routing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from disagg.cache.directory import ChunkDirectory
from disagg.routing import Router, WorkerEntry

logger = logging.getLogger(__name__)


class CacheCoordinator:
    """Async Ray actor. Registers workers and pools, wires their NIXL peers, and routes requests.

    State lives in ``Router`` and ``ChunkDirectory``; every mutation happens on
    the actor's event loop. After a restart (``max_restarts``) the state is
    rebuilt from the named actors of this cluster; until that finishes,
    lookups miss instead of failing.
    """

    def __init__(self, cluster_name: str, chunk_tokens: int, timeout_s: float = 60.0) -> None:
        self.cluster_name = cluster_name
        self.chunk_tokens = chunk_tokens
        self.router = Router()
        self.directory = ChunkDirectory()
        self.pools: dict[str, dict[str, Any]] = {}  # pool id -> {"handle", "handshake", "node_id", "agent"}
        self.nodes: dict[str, str] = {}  # worker id -> node id
        self.timeout_s = timeout_s
        self._num_routed = 0
        self._rebuilt = not ray.get_runtime_context().was_current_actor_reconstructed
        self._rebuild_task: asyncio.Task | None = None

    # ----- registration -------------------------------------------------

    async def register(self, worker_id: str, kind: str, handle: Any, handshake: bytes | None,
                       node_id: str = "", wire: bool = True) -> dict[str, Any]:
        """Add a prefill or decode worker and connect it with its NIXL peers.

        Prefill workers are wired to every decode worker and every pool;
        decode workers to every prefill worker. Returns the handles of the
        pools (the same node's first). Raises ``IncompatiblePeerError`` (from
        a peer) on mismatched handshakes; the worker is then not registered.
        """
        if wire and handshake is not None:
            peers = self._peer_handshakes(kind)
            calls = [h.add_peer.remote(handshake) for h, _ in peers]
            calls += [handle.add_peer.remote(hs) for _, hs in peers if hs is not None]
            await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        self.router.add(WorkerEntry(worker_id, kind, handle, handshake))
        self.nodes[worker_id] = node_id
        logger.info("registered %s worker %s on node %s", kind, worker_id, node_id[:8])
        return {"pools": self._pools_near(node_id)}

    async def register_pool(self, pool_id: str, handle: Any, info: dict[str, Any], wire: bool = True) -> None:
        """Add a node's cache pool, wire it with every prefill worker, and load its keys."""
        if wire:
            prefills = self.router.of_kind("prefill")
            calls = [w.handle.add_peer.remote(info["handshake"]) for w in prefills]
            calls += [handle.add_peer.remote(w.handshake) for w in prefills if w.handshake is not None]
            await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        self.pools[pool_id] = {"handle": handle, **info}
        self.directory.add_pool(pool_id, info["node_id"])
        keys, seq = await asyncio.wait_for(handle.listed_keys.remote(), self.timeout_s)
        self.directory.rebuild(pool_id, keys, seq)

    async def report_events(self, pool_id: str, events: list[tuple[int, str, bytes]]) -> None:
        """Apply a pool's put and evict events; an unknown pool or a gap triggers a rebuild of that pool."""
        await self._ensure_rebuilt()
        if pool_id not in self.pools:
            return
        try:
            self.directory.apply(pool_id, events)
        except RuntimeError as exc:
            logger.warning("%s; rebuilding that pool's view", exc)
            keys, seq = await asyncio.wait_for(self.pools[pool_id]["handle"].listed_keys.remote(), self.timeout_s)
            self.directory.rebuild(pool_id, keys, seq)

    # ----- requests -----------------------------------------------------

    async def route(self, request_id: str, num_tokens: int, chunk_keys: list[bytes] | None = None) -> dict[str, Any]:
        """Pick a prefill and a decode worker; return their ids and handles.

        A prefill worker's cost is its queued prompt tokens plus the tokens of
        this prompt it would compute, counting chunks in its own node's pool
        as cached; so a hot prefix draws requests to its node only while that
        node's queue stays shorter than the compute it saves.
        """
        await self._ensure_rebuilt()
        keys = chunk_keys or []

        def saved_tokens(worker: WorkerEntry) -> int:
            node = self.nodes.get(worker.worker_id)
            location = self.directory.lookup(keys, prefer_node=node)
            local = location.pool_id is not None and self.directory.node_of(location.pool_id) == node
            return location.num_chunks * self.chunk_tokens if local else 0

        prefill, decode = self.router.route(request_id, num_tokens, prefill_saving=saved_tokens if keys else None)
        self._num_routed += 1
        return {"prefill_id": prefill.worker_id, "prefill": prefill.handle,
                "decode_id": decode.worker_id, "decode": decode.handle}

    async def lookup(self, chunk_keys: list[bytes], node_id: str = "") -> dict[str, Any]:
        """Return the pool with the longest cached run of ``chunk_keys`` (same node preferred).

        Also returns ``node_id``'s own pool, where a prefill worker stores new
        chunks. While a restarted coordinator is still rebuilding, every
        lookup misses.
        """
        if not self._rebuilt:
            self._start_rebuild()
            return {"pool_id": None, "num_chunks": 0, "pool": None, "local_pool_id": None, "local_pool": None}
        location = self.directory.lookup(chunk_keys, prefer_node=node_id)
        near = self._pools_near(node_id)
        local = near[0] if near and self.pools[near[0][0]]["node_id"] == node_id else (None, None)
        result = {"pool_id": location.pool_id, "num_chunks": location.num_chunks, "pool": None,
                  "local_pool_id": local[0], "local_pool": local[1]}
        if location.pool_id is not None:
            result["pool"] = self.pools[location.pool_id]["handle"]
        return result

    async def drain(self, worker_id: str) -> None:
        """Stop routing new requests to a worker; requests it already has continue."""
        entry = self.router.workers.get(worker_id)
        if entry is not None:
            entry.draining = True

    async def load(self, worker_id: str) -> int:
        """Return the requests routed to a worker and not finished (0 for an unknown worker)."""
        entry = self.router.workers.get(worker_id)
        return 0 if entry is None else entry.num_requests

    async def remove_worker(self, worker_id: str) -> bool:
        """Stop routing to a worker (it died or is leaving); return whether it was registered."""
        entry = self.router.remove(worker_id)
        self.nodes.pop(worker_id, None)
        if entry is None:
            return False
        logger.info("removed %s worker %s from routing", entry.kind, worker_id)
        peers = [h for h, _ in self._peer_handshakes(entry.kind)]
        for peer in peers:
            peer.remove_peer.remote(f"{worker_id}-nixl")  # best effort: a dead peer ignores it
        return True

    async def prefill_done(self, request_id: str) -> None:
        self.router.prefill_done(request_id)

    async def finish(self, request_id: str) -> None:
        self.router.finish(request_id)

    # ----- introspection ------------------------------------------------

    async def workers(self) -> dict[str, list[str]]:
        await self._ensure_rebuilt()
        return {kind: sorted(w.worker_id for w in self.router.of_kind(kind)) for kind in ("prefill", "decode")}

    async def stats(self) -> dict[str, Any]:
        return {
            "routed": self._num_routed,
            "in_flight": len(self.router.assignments),
            "indexed_chunks": self.directory.num_chunks(),
            "load": {w.worker_id: {"requests": w.num_requests, "tokens": w.num_tokens}
                     for w in self.router.workers.values()},
        }

    # ----- helpers ------------------------------------------------------

    def _peer_handshakes(self, kind: str) -> list[tuple[Any, bytes | None]]:
        other = "decode" if kind == "prefill" else "prefill"
        peers = [(w.handle, w.handshake) for w in self.router.of_kind(other)]
        if kind == "prefill":
            peers += [(p["handle"], p["handshake"]) for p in self.pools.values()]
        return peers

    def _pools_near(self, node_id: str) -> list[tuple[str, Any]]:
        ordered = sorted(self.pools.items(), key=lambda item: (item[1]["node_id"] != node_id, item[0]))
        return [(pool_id, pool["handle"]) for pool_id, pool in ordered]

    async def _ensure_rebuilt(self) -> None:
        if not self._rebuilt:
            await asyncio.shield(self._start_rebuild())

    def _start_rebuild(self) -> asyncio.Task:
        if self._rebuild_task is None or (self._rebuild_task.done() and not self._rebuilt):
            self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild())
        return self._rebuild_task

    async def _rebuild(self) -> None:
        """Re-register this cluster's named workers and pools after a restart, without re-wiring NIXL."""
        names = [name for name in ray.util.list_named_actors(all_namespaces=False)
                 if name.startswith(self.cluster_name + "-") and not name.endswith("-coordinator")]
        logger.warning("coordinator restarted: rebuilding from %d named actors", len(names))
        for name in sorted(names):
            try:
                handle = ray.get_actor(name)
                info = await asyncio.wait_for(handle.registration.remote(), self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - a dead actor is simply not re-registered
                logger.warning("coordinator rebuild: skipping %s (%r)", name, exc)
                continue
            if info["kind"] == "pool":
                await self.register_pool(info["pool_id"], handle, info, wire=False)
            else:
                await self.register(info["worker_id"], info["kind"], handle, info["handshake"], info["node_id"],
                                    wire=False)
        self._rebuilt = True
