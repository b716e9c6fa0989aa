"""The driver API: ``launch`` a cluster, then ``generate``, ``stream`` or ``generate_async``.

This module sits above both ``disagg`` and ``actors``: it starts the actors and
drives each request through them (route, prefill, decode stream).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from transformers import AutoConfig

from disagg.cache.keys import CacheNamespace, chunk_keys
from disagg.config import EngineConfig, Timeouts, WorkerResources
from disagg.fleet import Fleet
from disagg.model.runner import kv_layout_of, load_tokenizer
from disagg.model.sources import resolve_model
from disagg.outputs import RequestMetrics, RequestOutput
from disagg.prompts import Prompt, check_length, encode_prompt
from disagg.request_driver import RequestDriver
from disagg.sampling import SamplingParams
from disagg.scaling import ScalingAndStats
from disagg.transfer.base import choose_transport

logger = logging.getLogger(__name__)

_STREAM_END = object()


def launch(
    model: str = "smollm2-135m-instruct",
    prefill_replicas: int = 1,
    decode_replicas: int = 1,
    *,
    address: str | None = None,
    transport: str = "nixl",
    dtype: str = "float32",
    max_seq_len: int = 2048,
    max_batch: int = 16,
    prefill_resources: WorkerResources | None = None,
    decode_resources: WorkerResources | None = None,
    timeouts: Timeouts | None = None,
    object_store_memory: int = 512 * 2**20,
    cache_pool_bytes: int = 512 * 2**20,
    cache_spill_dir: str | None = None,
    cache_spill_bytes: int = 0,
    **engine_options: Any,
) -> Cluster:
    """Start (or join) Ray, start the coordinator and workers, and return a ``Cluster``.

    ``address`` (or ``RAY_ADDRESS``) joins a running Ray cluster; without
    either, a local Ray instance is started. ``cache_pool_bytes`` sizes the
    shared KV chunk pool started on every node (0 turns the cache off);
    chunks are ``prefill_block_tokens`` long. Raises ``ValueError`` for an
    unknown model or invalid settings before any actor starts.
    """
    for name, count in (("prefill_replicas", prefill_replicas), ("decode_replicas", decode_replicas)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name}={count!r} is invalid: start at least 1 replica.")
    config = EngineConfig(model=model, dtype=dtype, transport=transport, max_seq_len=max_seq_len,
                          max_batch=max_batch, timeouts=timeouts or Timeouts(), **engine_options)
    prefill_resources = prefill_resources or WorkerResources()
    decode_resources = decode_resources or WorkerResources()

    resolved = resolve_model(model, None if config.cache_dir is None else Path(config.cache_dir))
    tokenizer = load_tokenizer(resolved)
    # Prompt length is checked against the model and max_seq_len by disagg; this stops
    # the tokenizer's own warning about sequences longer than its default maximum.
    tokenizer.model_max_length = int(1e30)
    max_model_len = _max_model_len(resolved.path)
    if max_seq_len > max_model_len:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context of {max_model_len}: lower it.")
    transport = choose_transport(config.transport)
    if cache_pool_bytes < 0:
        raise ValueError(f"cache_pool_bytes={cache_pool_bytes} is invalid: use 0 to turn the cache off, or a size.")
    if cache_pool_bytes and transport != "nixl":
        logger.warning("the KV chunk cache needs the NIXL transport; running with the cache off")
        cache_pool_bytes = 0

    started_ray = _init_ray(address, prefill_replicas * prefill_resources.num_cpus
                            + decode_replicas * decode_resources.num_cpus, object_store_memory)
    cluster = Cluster(config, resolved, tokenizer, max_model_len, transport, started_ray)
    try:
        cluster._start_coordinator()
        if cache_pool_bytes:
            cluster._start_pools(cache_pool_bytes, cache_spill_dir, cache_spill_bytes)
        cluster._start_workers(prefill_replicas, decode_replicas, prefill_resources, decode_resources)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _max_model_len(path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(path)).max_position_embeddings)


def _init_ray(address: str | None, num_cpus_needed: float, object_store_memory: int) -> bool:
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        logger.info("joined Ray cluster at %s", address)
        return True
    num_cpus = max(os.cpu_count() or 1, int(num_cpus_needed + 0.999))
    # Pinning the node IP keeps Ray from probing outside addresses to guess it.
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    logger.info("started a local Ray instance with %d logical CPUs", num_cpus)
    return True


class Cluster(RequestDriver, ScalingAndStats):
    """Handle to a running disagg deployment. Thread-safe; requests run on a private event loop."""

    def __init__(self, config: EngineConfig, resolved, tokenizer, max_model_len: int, transport: str,
                 started_ray: bool) -> None:
        self.config = config
        self.model = resolved
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.transport = transport
        self._started_ray = started_ray
        self._name = f"disagg-{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count()
        self._coordinator = None
        self._workers: dict[str, Any] = {}  # worker id -> actor handle
        self._kinds: dict[str, str] = {}
        self._pools: dict[str, Any] = {}  # pool id -> actor handle
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> its task on the private loop
        self._recent: collections.deque[RequestMetrics] = collections.deque(maxlen=32)
        self._autoscale_task: asyncio.Task | None = None
        self._aborting: set[str] = set()
        layout = kv_layout_of(AutoConfig.from_pretrained(str(resolved.path)), config.dtype)
        self._namespace = CacheNamespace.for_model(resolved.name, resolved.weights_digest, layout,
                                                   config.prefill_block_tokens)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="disagg-driver", daemon=True)
        self._thread.start()
        self._closed = False

    # ----- start-up -------------------------------------------------------

    def _start_coordinator(self) -> None:
        from actors.coordinator import CacheCoordinator

        # Restarted by Ray if it dies; it then rebuilds its state from the named actors.
        self._coordinator = ray.remote(CacheCoordinator).options(
            name=f"{self._name}-coordinator", num_cpus=0, max_concurrency=1000, max_restarts=-1,
            max_task_retries=3,
        ).remote(self._name, self.config.prefill_block_tokens, self.config.timeouts.route_s)

    def _start_pools(self, capacity_bytes: int, spill_dir: str | None, spill_bytes: int) -> None:
        """Start one chunk pool on every alive node and register it with the coordinator."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from actors.cache_pool import CachePool

        nodes = sorted((n["NodeID"], n.get("Resources", {})) for n in ray.nodes() if n["Alive"])
        for node_id, resources in nodes:
            pool_id = f"{self._name}-pool-{node_id[:8]}"
            # A node type may size its own pool with the custom resource kv_pool_gib (see cluster.yaml).
            node_bytes = int(resources.get("kv_pool_gib", 0) * 2**30) or capacity_bytes
            handle = ray.remote(CachePool).options(
                name=pool_id, num_cpus=0, max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(pool_id, self.config.to_dict(), node_bytes,
                     None if spill_dir is None else f"{spill_dir}/{pool_id}", spill_bytes)
            info = ray.get(handle.start.remote(self._coordinator), timeout=self.config.timeouts.actor_start_s)
            ray.get(self._coordinator.register_pool.remote(pool_id, handle, info),
                    timeout=self.config.timeouts.actor_start_s)
            self._pools[pool_id] = handle
            logger.info("%s: KV chunk pool of %.1f MiB on node %s (%d tokens per chunk)", pool_id,
                        info["bytes_total"] / 2**20, node_id[:8], self.config.prefill_block_tokens)

    def _start_workers(self, num_prefill: int, num_decode: int, prefill_res: WorkerResources,
                       decode_res: WorkerResources) -> None:
        self.fleet = Fleet(self._name, self.config, self.transport, self._coordinator,
                           {"prefill": prefill_res, "decode": decode_res})
        self._workers, self._kinds = self.fleet.workers, self.fleet.kinds
        created = [self.fleet.create(kind) for kind in ["prefill"] * num_prefill + ["decode"] * num_decode]
        for worker_id, handle in created:
            info = self._call(self.fleet.start(worker_id, handle, self.config.timeouts.actor_start_s))
            _log_worker_facts(worker_id, info)
        logger.info(
            "disagg cluster %s ready: model %s, prefill replicas %d, decode replicas %d, transport %s",
            self._name, self.model.name, num_prefill, num_decode, self.transport,
        )

    # ----- public API -----------------------------------------------------

    def generate(self, prompts, params: SamplingParams | None = None, cache_salt: str | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion and return their outputs in order.

        ``prompts`` is one prompt or a list of prompts; a prompt is a str, a
        list of token ids, or a list of chat messages. Requests share cached
        KV chunks only with requests of the same ``cache_salt``. Raises
        ``ValueError`` for any invalid prompt or parameter before any request
        starts.
        """
        return self._call(self.generate_async(prompts, params, cache_salt=cache_salt))

    async def generate_async(self, prompts, params: SamplingParams | None = None,
                             request_id: str | None = None, cache_salt: str | None = None) -> list[RequestOutput]:
        """Async form of ``generate``. ``request_id`` names a single prompt's request."""
        params = params or SamplingParams()
        batch = self._encode_batch(prompts, params)
        if request_id is not None and len(batch) != 1:
            raise ValueError("request_id= names one request: pass one prompt with it, or no request_id.")
        ids = [request_id or self._new_request_id() for _ in batch]
        _check_salt(cache_salt)
        coros = [self._run(token_ids, params, rid, None, cache_salt) for token_ids, rid in zip(batch, ids)]
        future = asyncio.run_coroutine_threadsafe(_gather(coros), self._loop)
        return await asyncio.wrap_future(future)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None, cache_salt: str | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as they are generated (whole UTF-8 characters only).

        Closing the iterator early aborts the request and frees its KV.
        """
        params = params or SamplingParams()
        token_ids = self._encode_one(prompt, params)
        _check_salt(cache_salt)
        request_id = request_id or self._new_request_id()
        deltas: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            try:
                await self._run(token_ids, params, request_id, deltas.put_nowait, cache_salt)
            finally:
                deltas.put_nowait(_STREAM_END)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            while True:
                item = self._call(deltas.get())
                if item is _STREAM_END:
                    break
                yield item
            future.result()
        finally:
            if not future.done():
                future.cancel()

    def abort(self, request_id: str) -> bool:
        """End a running request wherever it is; its KV is released on both sides. Return whether it was running.

        The request's caller gets its output so far with ``finish_reason="abort"``.
        """
        async def cancel() -> bool:
            task = self._tasks.get(request_id)
            if task is None or task.done():
                return False
            self._aborting.add(request_id)
            task.cancel()
            return True

        return self._call(cancel())

    def stats(self) -> dict[str, Any]:
        """Return counters of every worker, summed per kind (see the README for the keys)."""
        return self._call(self._stats())

    def shutdown(self) -> None:
        """Release every worker's KV and NIXL registrations, stop the actors, and Ray if we started it."""
        if self._closed:
            return
        self._closed = True
        if self._autoscale_task is not None:
            self._loop.call_soon_threadsafe(self._autoscale_task.cancel)
        if hasattr(self, "fleet"):
            self.fleet.cancel_background()
            for worker_id in list(self.fleet.pending):
                with contextlib.suppress(ValueError):  # ValueError: the actor was never created
                    ray.kill(ray.get_actor(worker_id), no_restart=True)
        handles = list(self._workers.values()) + list(self._pools.values())
        try:
            ray.get([h.shutdown.remote() for h in handles], timeout=30)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            logger.warning("worker shutdown did not finish cleanly: %r", exc)
        for handle in handles + ([self._coordinator] if self._coordinator is not None else []):
            ray.kill(handle, no_restart=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ----- helpers --------------------------------------------------------

    @property
    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (eos,)

    def _chunk_keys(self, token_ids: list[int], salt: str | None) -> list[bytes]:
        if not self._pools:
            return []
        namespace = self._namespace if salt is None else dataclasses.replace(self._namespace, salt=salt)
        return chunk_keys(token_ids, namespace)

    def _new_request_id(self) -> str:
        return f"req-{uuid.uuid4().hex[:12]}"

    def _encode_one(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a disagg.SamplingParams, got {type(params).__name__}.")
        token_ids = encode_prompt(prompt, self.tokenizer)
        check_length(len(token_ids), params.max_tokens, self.config.max_seq_len, self.max_model_len)
        return token_ids

    def _encode_batch(self, prompts, params: SamplingParams) -> list[list[int]]:
        return [self._encode_one(p, params) for p in _as_batch(prompts)]

    def _call(self, coro):
        if self._closed:
            raise RuntimeError("this cluster was shut down: launch a new one.")
        future: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

def _check_salt(salt) -> None:
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt={salt!r} is invalid: pass a non-empty str, or None to share the cache.")


def _log_worker_facts(worker_id: str, info: dict) -> None:
    if "slots" in info:
        logger.info("%s: decode KV arena of %d slots x %d tokens (%.1f MiB, %d KV bytes per token)",
                    worker_id, info["slots"], info["slot_tokens"], info["arena_bytes"] / 2**20,
                    info["kv_bytes_per_token"])
    else:
        logger.info("%s: model %s, %d layers, %d KV heads, head_dim %d, %s, %d KV bytes per token",
                    worker_id, info["model"], info["layout"]["num_layers"], info["layout"]["num_kv_heads"],
                    info["layout"]["head_dim"], info["layout"]["dtype"], info["kv_bytes_per_token"])


def _as_batch(prompts) -> list[Prompt]:
    """Treat a str, a token-id list or a chat-message list as one prompt; anything else as a batch."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and any(isinstance(p, (int, dict)) for p in prompts):
        return [prompts]
    if isinstance(prompts, Sequence) and not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts of type {type(prompts).__name__} is not supported: pass a str or a list.")
    return list(prompts)


async def _gather(coros) -> list:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


