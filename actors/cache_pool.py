"""CachePool: one node's shared CPU KV chunk pool, reachable by every prefill worker over NIXL."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import ray
from transformers import AutoConfig

from actors.common import configure_process
from disagg.cache import CacheNamespace, ChunkPool
from disagg.cache.types import Pin
from disagg.config import EngineConfig
from disagg.model.runner import kv_layout_of
from disagg.model.sources import resolve_model
from disagg.transfer.nixl_agent import NixlEndpoint
from disagg.transfer.protocol import ReleaseNotice

logger = logging.getLogger(__name__)

# NIXL progress every millisecond for a while after a pin or store (a peer
# may be reading or being read), else rarely, to leave idle CPU to workers.
_POLL_INTERVAL_S = 0.001
_IDLE_POLL_INTERVAL_S = 0.02
_BUSY_WINDOW_S = 2.0
_EXPIRE_INTERVAL_S = 0.1
_REPORT_INTERVAL_S = 0.05


class CachePool:
    """Async Ray actor over ``ChunkPool``.

    Prefill workers READ pinned chunk slots from this pool's registered buffer
    and the pool READs new chunks from their outbox blocks, so chunk bytes
    never pass through the driver or the coordinator. Puts and evictions are
    reported to the coordinator as sequenced events.
    """

    def __init__(self, pool_id: str, config: dict, capacity_bytes: int, spill_dir: str | None = None,
                 spill_capacity_bytes: int = 0) -> None:
        configure_process(1)
        self.pool_id = pool_id
        self.config = EngineConfig.from_dict(config)
        resolved = resolve_model(self.config.model)
        layout = kv_layout_of(AutoConfig.from_pretrained(str(resolved.path)), self.config.dtype)
        self.namespace = CacheNamespace.for_model(resolved.name, resolved.weights_digest, layout,
                                                  self.config.prefill_block_tokens)
        self.pool = ChunkPool(self.namespace, layout, capacity_bytes, spill_dir=spill_dir,
                              spill_capacity_bytes=spill_capacity_bytes, name=pool_id)
        compat = layout.compat_fields(resolved.name, resolved.weights_digest, self.config.prefill_block_tokens)
        self.endpoint = NixlEndpoint(f"{pool_id}-nixl", compat, worker=pool_id)
        self.endpoint.register(self.pool.buffer_tensor())
        self.node_id = ray.get_runtime_context().get_node_id()
        self._coordinator = None
        self._reported_seq = 0
        self._tasks: list[asyncio.Task] = []
        self._last_activity_s = 0.0

    async def start(self, coordinator=None) -> dict[str, Any]:
        """Start polling, expiry and event reporting; return the registration facts."""
        self._coordinator = coordinator
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_forever()), loop.create_task(self._maintain_forever())]
        return await self.registration()

    async def registration(self) -> dict[str, Any]:
        """Return what the coordinator needs to (re-)register this pool."""
        return {"pool_id": self.pool_id, "kind": "pool", "handshake": self.endpoint.handshake(),
                "node_id": self.node_id, "agent": self.endpoint.name,
                "bytes_total": self.pool.num_slots * self.pool.chunk_bytes}

    async def remove_peer(self, agent: str) -> None:
        """Forget a departed peer's NIXL agent."""
        if agent in self.endpoint.stats()["peers"]:
            self.endpoint.remove_peer(agent)

    async def add_peer(self, handshake: bytes) -> None:
        self.endpoint.add_peer(handshake)

    async def pin(self, keys: list[bytes], owner: str, ttl_s: float) -> dict[str, Any]:
        """Pin the leading cached run of ``keys``; return the pin and each chunk's slot region."""
        self._last_activity_s = time.monotonic()
        self.pool.match_prefix(keys)  # counts hits and misses, promotes nothing
        pin = self.pool.pin(keys, owner, ttl_s)
        regions = np.asarray([self._slot_region(slot) for slot in pin.slots], dtype=np.int64).reshape(-1, 2)
        return {"pin": pin, "regions": regions.tobytes(), "agent": self.endpoint.name}

    async def unpin(self, pin: Pin) -> bool:
        return self.pool.unpin(pin)

    async def store(self, request_id: str, keys: list[bytes], parents: list[bytes | None], agent: str,
                    regions: bytes, salt: str | None, timeout_s: float) -> int:
        """READ new chunks from a prefill worker's outbox and list them; return how many were read.

        Keys already cached or being written by someone else are skipped. When
        at least one chunk is read, the READ's notification releases the
        prefill worker's hold on its blocks; otherwise the caller releases it.
        A failed READ lists nothing.
        """
        self._last_activity_s = time.monotonic()
        namespace = self._namespace(salt)
        remote = np.frombuffer(regions, dtype=np.int64).reshape(-1, 2)
        reservations, rows = [], []
        for index, (key, parent) in enumerate(zip(keys, parents)):
            reservation = self.pool.reserve(key, request_id, timeout_s * 2, parent=parent, namespace=namespace)
            if reservation is not None:
                reservations.append(reservation)
                rows.append(index)
        if not reservations:
            return 0

        local = np.asarray([self._slot_region(r.slot) for r in reservations], dtype=np.int64)
        notice = ReleaseNotice(request_id=request_id, ok=True).encode()
        try:
            await self.endpoint.read(agent, local, remote[rows], notice, timeout_s)
        except BaseException:
            for reservation in reservations:
                self.pool.abort(reservation)
            raise
        for reservation in reservations:
            self.pool.commit_written(reservation)
        return len(reservations)

    async def listed_keys(self) -> tuple[list[bytes], int]:
        """Return every key this pool can serve and the event sequence number it is current to."""
        seq = self.pool.last_seq
        return self.pool.listed_keys(), seq

    async def events_since(self, seq: int) -> list[tuple[int, str, bytes]]:
        return [tuple(event) for event in self.pool.events_since(seq)]

    async def stats(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "node_id": self.node_id, **self.pool.stats(),
                "nixl": self.endpoint.stats()}

    async def check_integrity(self) -> None:
        self.pool.check_integrity()

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.endpoint.close()
        self.pool.close()

    def _slot_region(self, slot: int) -> tuple[int, int]:
        tensor = self.pool.buffer_tensor()
        return tensor.data_ptr() + slot * self.pool.chunk_bytes, self.pool.chunk_bytes

    def _namespace(self, salt: str | None) -> CacheNamespace:
        if salt == self.namespace.salt:
            return self.namespace
        return CacheNamespace(self.namespace.model_name, self.namespace.weights_digest, self.namespace.kv_dtype,
                              self.namespace.kv_layout, self.namespace.chunk_tokens, salt)

    async def _poll_forever(self) -> None:
        while True:
            self.endpoint.poll_notifications()
            busy = time.monotonic() - self._last_activity_s < _BUSY_WINDOW_S
            await asyncio.sleep(_POLL_INTERVAL_S if busy else _IDLE_POLL_INTERVAL_S)

    async def _maintain_forever(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(_REPORT_INTERVAL_S)
            ticks += 1
            if ticks * _REPORT_INTERVAL_S >= _EXPIRE_INTERVAL_S:
                self.pool.expire()
                ticks = 0
            await self._report_events()

    async def _report_events(self) -> None:
        if self._coordinator is None or self.pool.last_seq == self._reported_seq:
            return
        events = [tuple(event) for event in self.pool.events_since(self._reported_seq)]
        try:
            await asyncio.wait_for(self._coordinator.report_events.remote(self.pool_id, events), 5.0)
            self._reported_seq = events[-1][0] if events else self._reported_seq
        except Exception as exc:  # noqa: BLE001 - the coordinator may be restarting; retry next tick
            logger.warning("pool %s: reporting %d events failed (%r); retrying", self.pool_id, len(events), exc)
