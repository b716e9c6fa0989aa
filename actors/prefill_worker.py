"""PrefillWorker: computes a prompt's KV and first token, then holds the KV for a decode worker.

With the chunk cache on, it first loads the longest cached prefix from a node
pool straight into the request's outbox blocks, computes only the rest, and
afterwards has its own node's pool READ the new full chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import ray

from actors.common import compat_fields, load_runner
from disagg.config import EngineConfig
from disagg.errors import OverloadedError
from disagg.sampling import SamplingParams, is_stop_token, make_sampler
from disagg.transfer.base import make_sender
from disagg.transfer.nixl import NixlSender

logger = logging.getLogger(__name__)

# NIXL progress runs every millisecond while peers may be reading our KV, and
# rarely otherwise, so an idle worker does not take CPU from decode. Polling at
# 1 ms cost about 7% of a core (per-process CPU counters, 2-core VM).
_POLL_INTERVAL_S = 0.001
_IDLE_POLL_INTERVAL_S = 0.02


class PrefillWorker:
    """Async Ray actor. One prefill runs at a time; the event loop keeps polling NIXL meanwhile."""

    def __init__(self, worker_id: str, config: dict, transport: str, threads: int) -> None:
        self.worker_id = worker_id
        self.config = EngineConfig.from_dict(config)
        self.runner = load_runner(self.config, threads)
        self.sender = make_sender(transport, worker_id, self.runner.layout, compat_fields(self.runner, self.config),
                                  self.config.prefill_outbox_tokens, self.config.prefill_block_tokens)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._coordinator = None
        self._compute_lock = asyncio.Lock()
        self._num_waiting = 0
        self._num_prefills = 0
        self._num_failed = 0
        self._prefill_tokens = 0
        self._cached_tokens = 0
        self._cache_hits = 0  # chunks loaded from a pool
        self._cache_misses = 0  # usable chunks of prompts that no pool had (or lost before the read)
        self._poll_task: asyncio.Task | None = None
        self._store_tasks: set[asyncio.Task] = set()
        self._in_progress: set[str] = set()
        self._cancelled: set[str] = set()
        logger.info("prefill worker %s ready, transport %s", worker_id, transport)

    async def start(self, coordinator=None) -> dict[str, Any]:
        """Start the NIXL polling loop; return this worker's registration facts."""
        self._coordinator = coordinator
        if self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())
        return await self.registration()

    async def registration(self) -> dict[str, Any]:
        """Return what the coordinator needs to (re-)register this worker."""
        return {"worker_id": self.worker_id, "kind": "prefill", "handshake": self.sender.handshake(),
                "node_id": self.node_id, "layout": self.runner.layout.__dict__, "model": self.runner.resolved.name,
                "kv_bytes_per_token": self.runner.layout.bytes_per_token}

    async def remove_peer(self, agent: str) -> None:
        """Forget a departed peer's NIXL agent."""
        self.sender.remove_peer(agent)

    async def add_peer(self, handshake: bytes) -> None:
        """Accept a decode worker's or pool's handshake; raises ``IncompatiblePeerError`` on a mismatch."""
        self.sender.add_peer(handshake)

    async def prefill(self, request: dict) -> dict[str, Any]:
        """Run one prompt and export its KV; return the first token, the KV handle and timings.

        Raises ``OverloadedError`` when the outbox has no room within the
        admission timeout. The KV stays leased until a decode worker reads
        it, ``release`` is called, or the lease expires.
        """
        request_id = request["request_id"]
        token_ids = request["prompt_token_ids"]
        params = SamplingParams.from_dict(request["params"])
        queued_at = time.perf_counter()
        if self._num_waiting >= self.config.max_queued_requests:
            raise OverloadedError(
                f"prefill worker {self.worker_id}: {self._num_waiting} requests already queued "
                f"(max_queued_requests={self.config.max_queued_requests}); retry later or add prefill replicas"
            )

        self._num_waiting += 1
        self._in_progress.add(request_id)
        try:
            async with self._compute_lock:
                await self._wait_for_outbox(request_id, len(token_ids))
                queue_s = time.perf_counter() - queued_at
                result, num_cached = await self._compute(request)
        except BaseException:  # cancellation too: reserved blocks must not leak
            self._num_failed += 1
            self._abandon(request_id)
            raise
        finally:
            self._num_waiting -= 1
            self._in_progress.discard(request_id)

        first_token = make_sampler(params, request_id).sample(result.logits, output_index=0)
        done = params.max_tokens == 1 or is_stop_token(first_token, params, self.runner.eos_token_ids)
        handle = None
        if request_id in self._cancelled:
            self._cancelled.discard(request_id)
            self._abandon(request_id)
            raise asyncio.CancelledError(f"request {request_id} was released before its prefill finished")
        if not done or self._cache_enabled(request):
            handle = self.sender.export(request_id, result, self.config.timeouts.lease_s, start=num_cached)
            self._store_new_chunks(request, num_cached, len(token_ids))
        if done and handle is not None:
            self.sender.release(request_id)  # no decode reader will come
            handle = None
        self._num_prefills += 1
        self._prefill_tokens += result.num_computed_tokens
        self._cached_tokens += num_cached
        logger.debug("prefill %s: %d tokens (%d cached) in %.3f s", request_id, result.num_tokens, num_cached,
                     result.forward_s)
        return {"first_token": first_token, "handle": handle, "queue_s": queue_s, "prefill_s": result.forward_s,
                "cached_tokens": num_cached}

    async def release(self, request_id: str) -> bool:
        """Mark the decode reader of a request's KV done (idempotent); return whether the KV was freed.

        A release that arrives while the request is still being prefilled
        cancels it: its KV is dropped instead of exported.
        """
        if self.sender.release(request_id):
            return True
        if request_id in self._in_progress:
            self._cancelled.add(request_id)
        return False

    async def stats(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "waiting": self._num_waiting,
            "prefills": self._num_prefills,
            "failed": self._num_failed,
            "prefill_tokens": self._prefill_tokens,
            "cached_tokens": self._cached_tokens,
            "cache_hits": self._cache_hits,
            "cache_misses": self._cache_misses,
            **self.sender.stats(),
        }

    async def shutdown(self) -> dict[str, int]:
        """Stop polling and release every lease and NIXL registration; return what was still held."""
        stats = self.sender.stats()
        held = {"waiting": self._num_waiting, "leases": stats["leases_active"],
                "outbox_blocks": stats.get("outbox_blocks_used", 0)}
        for task in list(self._store_tasks):
            task.cancel()
        if self._poll_task is not None:
            self._poll_task.cancel()
        self.sender.close()
        return held

    # ----- cache ----------------------------------------------------------

    def _cache_enabled(self, request: dict) -> bool:
        return bool(request.get("chunk_keys")) and isinstance(self.sender, NixlSender) and self._coordinator is not None

    async def _compute(self, request: dict):
        """Load the cached prefix (if any) into the outbox blocks, then run the rest of the prompt."""
        token_ids = request["prompt_token_ids"]
        num_cached = 0
        block_ids = None
        if self._cache_enabled(request):
            # The reservation must outlive the forward pass; export restarts its clock for the reader.
            ttl_s = self.config.timeouts.prefill_s + self.config.timeouts.lease_s
            block_ids = self.sender.reserve(request["request_id"], len(token_ids), ttl_s)
            num_cached = await self._load_prefix(request, block_ids)

        def forward():
            # Off the event loop: copying a long cached prefix out of the blocks takes a while too.
            prefix = self.sender.prefix_kv(block_ids, num_cached) if num_cached else None
            return self.runner.prefill(token_ids, prefix, self.config.prefill_chunk_tokens)

        result = await asyncio.to_thread(forward)
        return result, num_cached

    async def _load_prefix(self, request: dict, block_ids: list[int]) -> int:
        """READ the longest cached run of the prompt's chunks into its first blocks; return tokens loaded.

        Only chunks that end before the last prompt token count, because that
        token is always recomputed. Any failure falls back to computing.
        """
        request_id = request["request_id"]
        chunk_tokens = self.config.prefill_block_tokens
        usable = (len(request["prompt_token_ids"]) - 1) // chunk_tokens
        keys = request["chunk_keys"][:usable]
        timeouts = self.config.timeouts
        try:
            # Called even with no usable key, because the result also names this node's pool for storing.
            found = await asyncio.wait_for(self._coordinator.lookup.remote(keys, self.node_id), timeouts.route_s)
        except Exception as exc:  # noqa: BLE001 - a lookup that fails is a miss
            logger.warning("prefill %s: cache lookup failed (%r); computing the whole prompt", request_id, exc)
            return 0
        request["_local_pool"] = found["local_pool"]
        self._cache_misses += len(keys) - found["num_chunks"]
        if not found["num_chunks"]:
            return 0

        pool = found["pool"]
        pinned = await asyncio.wait_for(pool.pin.remote(keys[: found["num_chunks"]], request_id, timeouts.transfer_s),
                                        timeouts.route_s)
        num_chunks = pinned["pin"].num_chunks  # fewer than promised if chunks were evicted meanwhile
        try:
            if num_chunks == 0:
                return 0
            remote = np.frombuffer(pinned["regions"], dtype=np.int64).reshape(-1, 2)
            local = self.sender.block_regions(block_ids[:num_chunks])
            await self.sender.endpoint.read(pinned["agent"], local, remote, b"", timeouts.transfer_s)
            self._cache_hits += num_chunks
            self._cache_misses += found["num_chunks"] - num_chunks
            return num_chunks * chunk_tokens
        except Exception as exc:  # noqa: BLE001 - fall back to computing; partial KV is overwritten
            logger.warning("prefill %s: loading %d cached chunks failed (%r); computing them", request_id,
                           num_chunks, exc)
            return 0
        finally:
            pool.unpin.remote(pinned["pin"])

    def _store_new_chunks(self, request: dict, num_cached: int, num_tokens: int) -> None:
        """Have this node's pool READ the prompt's new full chunks, without delaying the first token."""
        pool = request.get("_local_pool")
        chunk_tokens = self.config.prefill_block_tokens
        first, end = num_cached // chunk_tokens, num_tokens // chunk_tokens
        if pool is None or end <= first or not self.sender.add_reader(request["request_id"]):
            return
        task = asyncio.get_running_loop().create_task(self._store(pool, request, first, end))
        self._store_tasks.add(task)
        task.add_done_callback(self._store_tasks.discard)

    async def _store(self, pool, request: dict, first: int, end: int) -> None:
        request_id = request["request_id"]
        keys = request["chunk_keys"]
        parents = [keys[i - 1] if i > 0 else None for i in range(first, end)]
        timeout_s = self.config.timeouts.transfer_s
        num_read = 0
        try:
            block_ids = self.sender.block_ids(request_id)
            regions = self.sender.block_regions(block_ids[first:end]).tobytes()
            num_read = await asyncio.wait_for(
                pool.store.remote(request_id, keys[first:end], parents, self.sender.endpoint.name, regions,
                                  request.get("cache_salt"), timeout_s), timeout_s * 2)
        except Exception as exc:  # noqa: BLE001 - the prompt is served anyway; only reuse is lost
            logger.warning("prefill %s: storing chunks %d..%d failed: %r", request_id, first, end - 1, exc)
        finally:
            if num_read == 0:  # no READ happened, so no notification will release our hold
                self.sender.release(request_id, reader="pool")

    def _abandon(self, request_id: str) -> None:
        if isinstance(self.sender, NixlSender):
            self.sender.abandon(request_id)

    # ----- loops ----------------------------------------------------------

    async def _wait_for_outbox(self, request_id: str, num_tokens: int) -> None:
        deadline = time.monotonic() + self.config.timeouts.admission_s
        while not self.sender.can_export(num_tokens):
            if time.monotonic() > deadline:
                raise OverloadedError(
                    f"prefill worker {self.worker_id}: no outbox room for request {request_id} "
                    f"({num_tokens} tokens) within {self.config.timeouts.admission_s} s"
                )
            await asyncio.sleep(0.005)

    async def _poll_forever(self) -> None:
        while True:
            try:
                self.sender.poll()
            except Exception:
                logger.exception("prefill worker %s: transport poll failed", self.worker_id)
            busy = self._num_waiting or self.sender.stats()["leases_active"]
            await asyncio.sleep(_POLL_INTERVAL_S if busy else _IDLE_POLL_INTERVAL_S)
