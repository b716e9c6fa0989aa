"""Driving one request through the cluster: route, prefill (with one retry), decode stream.

``RequestDriver`` is a mixin of ``Cluster``; its methods run on the cluster's
private event loop and use the cluster's coordinator, config and tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from disagg.detokenizer import IncrementalDetokenizer
from disagg.errors import OverloadedError, RequestFailedError, WorkerDiedError
from disagg.outputs import FinishReason, RequestMetrics, RequestOutput
from disagg.sampling import SamplingParams, is_stop_token

logger = logging.getLogger(__name__)


class RequestDriver:
    """Per-request logic of ``Cluster`` (a mixin)."""

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
        # NOTE: if the prefill worker dies after handing off its KV but before this READ,
        # the request fails with an error naming the lost peer. It is not re-run.
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




def _hidden_ids(params: SamplingParams, cluster) -> tuple[int, ...]:
    return tuple(params.stop_token_ids) + cluster._eos_ids


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
