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
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from transformers import AutoConfig

from disagg.autoscale import AutoscalePolicy, Autoscaler, LoadSignals
from disagg.cache.keys import CacheNamespace, chunk_keys
from disagg.config import EngineConfig, Timeouts, WorkerResources
from disagg.detokenizer import IncrementalDetokenizer
from disagg.errors import OverloadedError, RequestFailedError, WorkerDiedError
from disagg.fleet import Fleet
from disagg.model.runner import kv_layout_of, load_tokenizer
from disagg.model.sources import resolve_model
from disagg.outputs import FinishReason, RequestMetrics, RequestOutput
from disagg.prompts import Prompt, check_length, encode_prompt
from disagg.sampling import SamplingParams, is_stop_token
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


class Cluster:
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

    # ----- one request ----------------------------------------------------

    async def _run(self, token_ids: list[int], params: SamplingParams, request_id: str,
                   on_text, cache_salt: str | None = None) -> RequestOutput:
        """Drive one request through route, prefill and decode; always leaves nothing held behind.

        An ``abort(request_id)`` ends it with ``finish_reason="abort"`` and
        the text so far; a cancelled caller gets ``CancelledError`` after the
        same clean-up.
        """
        if request_id in self._tasks:
            raise ValueError(f"request_id={request_id!r} is already in flight: use a unique request_id.")
        self._tasks[request_id] = asyncio.current_task()
        submitted = time.perf_counter()
        keys = self._chunk_keys(token_ids, cache_salt)
        request = {"request_id": request_id, "prompt_token_ids": token_ids, "params": params.to_dict(),
                   "chunk_keys": keys, "cache_salt": cache_salt}
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, _hidden_ids(params, self))
        state = _RequestState(detokenizer, on_text)
        metrics = RequestMetrics(transport=self.transport)
        try:
            await self._run_stages(request, params, state, metrics, submitted)
            self._recent.append(metrics)
        except asyncio.CancelledError:
            if request_id not in self._aborting:
                raise
            state.finish = FinishReason.ABORT
        finally:
            del self._tasks[request_id]
            self._aborting.discard(request_id)
            self._coordinator.finish.remote(request_id)
        return RequestOutput(request_id, token_ids, detokenizer.text, state.token_ids, state.finish, metrics)

    async def _run_stages(self, request: dict, params: SamplingParams, state: _RequestState,
                          metrics: RequestMetrics, submitted: float) -> None:
        route, prefilled = await self._prefill_with_retry(request, metrics)
        handle = prefilled["handle"]
        try:
            metrics.queue_s, metrics.prefill_s = prefilled["queue_s"], prefilled["prefill_s"]
            metrics.cached_tokens = prefilled["cached_tokens"]
            first_at = time.perf_counter()
            metrics.ttft_s = first_at - submitted
            state.add(prefilled["first_token"])

            if state.finish is None and handle is None:
                state.finish = FinishReason.STOP if is_stop_token(
                    state.token_ids[0], params, self._eos_ids) else FinishReason.LENGTH
            if state.finish is None:
                await self._decode(route, request, handle, state, metrics)
                handle = None  # the decode worker has read it and notified the prefill worker
            if not state.detokenizer.stopped:
                state.emit(state.detokenizer.flush())
            if len(state.token_ids) > 1:
                metrics.tpot_s = (time.perf_counter() - first_at) / (len(state.token_ids) - 1)
        finally:
            if handle is not None:  # unread KV: tell the prefill worker no decode reader is coming
                route["prefill"].release.remote(request["request_id"])

    async def _prefill_with_retry(self, request: dict, metrics: RequestMetrics) -> tuple[dict, dict]:
        """Route and prefill; if the prefill worker dies, retry once on another one."""
        request_id = request["request_id"]
        timeouts = self.config.timeouts
        for attempt in range(2):
            route = await self._remote(
                self._coordinator.route.remote(request_id, len(request["prompt_token_ids"]), request["chunk_keys"]),
                timeouts.route_s, "coordinator", request_id)
            metrics.prefill_worker, metrics.decode_worker = route["prefill_id"], route["decode_id"]
            ref = route["prefill"].prefill.remote(request)
            try:
                prefilled = await self._remote(ref, timeouts.prefill_s, route["prefill_id"], request_id)
            except WorkerDiedError as exc:
                await self._forget_worker(exc.worker_id)
                self._coordinator.finish.remote(request_id)
                if attempt == 1:
                    raise
                logger.warning("request %s: prefill worker %s died; retrying on another worker",
                               request_id, exc.worker_id)
                continue
            except BaseException:
                ray.cancel(ref)
                route["prefill"].release.remote(request_id)  # drops KV the worker may still export
                raise
            self._coordinator.prefill_done.remote(request_id)
            if request_id in self._aborting:
                route["prefill"].release.remote(request_id)
                raise asyncio.CancelledError(f"request {request_id} aborted")
            return route, prefilled
        raise AssertionError("unreachable")

    async def _decode(self, route, request, handle, state: _RequestState, metrics: RequestMetrics) -> None:
        timeouts = self.config.timeouts
        request_id = request["request_id"]
        stream = route["decode"].generate.options(num_returns="streaming").remote(
            request, state.token_ids[0], handle)
        finished = False
        try:
            first = True
            while True:
                ref = await self._next_ref(stream, timeouts.first_token_s if first else timeouts.token_s,
                                           route["decode_id"], request_id)
                if ref is None:
                    break
                item = await self._remote(ref, timeouts.token_s, route["decode_id"], request_id)
                if request_id in self._aborting:
                    raise asyncio.CancelledError(f"request {request_id} aborted")
                if first:
                    first = False
                    metrics.queue_s += item.get("queue_s", 0.0)
                    metrics.transfer_s = item.get("transfer_s", 0.0)
                    metrics.transfer_bytes = item.get("transfer_bytes", 0)
                for token_id in item["token_ids"]:
                    state.add(token_id)
                    if state.finish is not None:
                        break
                if state.finish is None and item["finish_reason"] is not None:
                    state.finish = FinishReason(item["finish_reason"])
                if state.finish is not None:
                    finished = item["finish_reason"] is not None
                    break
        except WorkerDiedError as exc:
            await self._forget_worker(exc.worker_id)
            raise
        finally:
            if not finished:
                route["decode"].abort.remote(request_id)
                ray.cancel(stream)

    async def _next_ref(self, stream, timeout_s: float, worker_id: str, request_id: str):
        """Return the stream's next object ref, or None at its end."""
        try:
            return await _bounded(stream.__anext__(), timeout_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise TimeoutError(f"request {request_id}: worker {worker_id} sent no token within {timeout_s} s") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerDiedError(worker_id, f"request {request_id}: worker {worker_id} died: {exc}") from exc

    async def _remote(self, ref, timeout_s: float, worker_id: str, request_id: str):
        try:
            return await _bounded(ref, timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"request {request_id}: worker {worker_id} did not respond within {timeout_s} s"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, (ValueError, OverloadedError)):
                raise cause from None
            raise RequestFailedError(f"request {request_id} failed on worker {worker_id}: {cause}") from exc
        except ray.exceptions.RayActorError as exc:
            raise WorkerDiedError(worker_id, f"request {request_id}: worker {worker_id} died: {exc}") from exc

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


class _RequestState:
    """Output tokens and text of one request as seen by the driver."""

    def __init__(self, detokenizer: IncrementalDetokenizer, on_text) -> None:
        self.detokenizer = detokenizer
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.finish: FinishReason | None = None

    def add(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        delta = self.detokenizer.add(token_id)
        self.emit(delta.text)
        if delta.stopped:
            self.finish = FinishReason.STOP

    def emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)


def _hidden_ids(params: SamplingParams, cluster: Cluster) -> tuple[int, ...]:
    return tuple(params.stop_token_ids) + cluster._eos_ids


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


async def _bounded(awaitable, timeout_s: float):
    """Await with a timeout, like ``asyncio.wait_for``, but never swallow a cancellation.

    On Python 3.11 ``wait_for`` can drop a ``cancel()`` that lands as the
    inner future completes, which made ``abort`` miss now and then.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


async def _gather(coros) -> list:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


