"""DecodeWorker: pulls prompt KV into its arena and generates with continuous batching."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.common import compat_fields, load_runner
from disagg.config import EngineConfig
from disagg.engine.decode import DecodeEngine, TokenEvent
from disagg.errors import OverloadedError
from disagg.kv.arena import DecodeKVArena
from disagg.sampling import SamplingParams, make_sampler
from disagg.transfer.base import make_receiver

logger = logging.getLogger(__name__)

_ADMISSION_POLL_S = 0.005


class _Aborted:
    """Queue marker: the request was aborted by the caller."""


class DecodeWorker:
    """Async Ray actor. The decode loop runs as a task; forwards run in a thread off the loop."""

    def __init__(self, worker_id: str, config: dict, transport: str, threads: int) -> None:
        self.worker_id = worker_id
        self.config = EngineConfig.from_dict(config)
        self.runner = load_runner(self.config, threads)
        self.arena = self._make_arena()
        self.engine = DecodeEngine(self.runner, self.arena, self.config.max_batch)
        self.receiver = make_receiver(transport, worker_id, self.arena, compat_fields(self.runner, self.config),
                                      self.config.prefill_block_tokens)
        self._streams: dict[str, asyncio.Queue] = {}
        self._aborted: set[str] = set()
        self._pending: set[str] = set()  # requests between arrival and joining the batch
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._num_waiting = 0
        self._num_failed = 0
        self._num_transfers = 0
        self._transfer_bytes = 0
        logger.info("decode worker %s ready, transport %s", worker_id, transport)

    def _make_arena(self) -> DecodeKVArena:
        config = self.config
        if config.decode_kv_tokens is None and config.decode_kv_bytes is None:
            return DecodeKVArena(self.runner.layout, config.max_batch, config.max_seq_len)
        arena = DecodeKVArena.from_budget(self.runner.layout, config.max_seq_len, config.decode_kv_bytes,
                                          config.decode_kv_tokens)
        if arena.num_slots > config.max_batch:
            logger.warning("decode KV budget fits %d sequences but max_batch=%d; using %d slots",
                           arena.num_slots, config.max_batch, config.max_batch)
            arena = DecodeKVArena(self.runner.layout, config.max_batch, config.max_seq_len)
        return arena

    async def start(self, coordinator=None) -> dict[str, Any]:
        """Start the decode loop; return this worker's registration facts."""
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_forever())
        return await self.registration()

    async def registration(self) -> dict[str, Any]:
        """Return what the coordinator needs to (re-)register this worker."""
        return {"worker_id": self.worker_id, "kind": "decode", "handshake": self.receiver.handshake(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "slots": self.arena.num_slots, "slot_tokens": self.arena.slot_tokens,
                "arena_bytes": self.arena.tensor.numel() * self.arena.tensor.element_size(),
                "kv_bytes_per_token": self.runner.layout.bytes_per_token}

    async def remove_peer(self, agent: str) -> None:
        """Forget a departed peer's NIXL agent."""
        self.receiver.remove_peer(agent)

    async def add_peer(self, handshake: bytes) -> None:
        """Accept a prefill worker's handshake; raises ``IncompatiblePeerError`` on a mismatch."""
        self.receiver.add_peer(handshake)

    async def generate(self, request: dict, first_token: int, handle: dict) -> AsyncIterator[dict]:
        """Reserve a slot, pull the prompt KV, then stream output token ids as they are sampled.

        The first item carries the admission and transfer metrics; later items
        carry ``token_ids`` and, on the last, ``finish_reason``. The slot is
        released on every exit: finish, error, abort or cancellation.
        """
        request_id = request["request_id"]
        params = SamplingParams.from_dict(request["params"])
        num_prompt_tokens = len(request["prompt_token_ids"])

        queued_at = time.perf_counter()
        self._pending.add(request_id)
        try:
            slot = await self._reserve(request_id)
        except BaseException:
            self._pending.discard(request_id)
            raise
        queue_s = time.perf_counter() - queued_at
        joined = False
        try:
            transfer_started = time.perf_counter()
            num_bytes = await self.receiver.pull(request_id, handle, slot, self.config.timeouts.transfer_s)
            transfer_s = time.perf_counter() - transfer_started
            self._num_transfers += 1
            self._transfer_bytes += num_bytes
            if request_id in self._aborted:
                yield {"token_ids": [], "finish_reason": "abort"}
                return

            queue: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = queue
            self.engine.add(request_id, slot, num_prompt_tokens, first_token, params,
                            make_sampler(params, request_id))
            joined = True
            self._wake.set()
            yield {"token_ids": [], "finish_reason": None, "queue_s": queue_s, "transfer_s": transfer_s,
                   "transfer_bytes": num_bytes, "decode_worker": self.worker_id}

            async for item in self._drain(queue):
                yield item
        except Exception:  # a cancelled or closed stream is not a failure
            self._num_failed += 1
            raise
        finally:
            self._streams.pop(request_id, None)
            self._aborted.discard(request_id)
            self._pending.discard(request_id)
            if joined:
                self.engine.abort(request_id)  # no-op when the sequence already finished
            elif self.arena.owner(slot) == request_id:
                self.arena.free(slot)

    async def abort(self, request_id: str) -> bool:
        """End a request wherever it is here; its slot is freed. Return whether it was known."""
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(_Aborted())
            return True
        if request_id in self._pending:  # still waiting for a slot or its KV: checked once the pull ends
            self._aborted.add(request_id)
            return True
        return False

    async def stats(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "running": self.engine.num_running,
            "waiting": self._num_waiting,
            "kv_blocks_used": self.arena.num_used_slots,
            "kv_blocks_total": self.arena.num_slots,
            "slot_tokens": self.arena.slot_tokens,
            "kv_bytes_per_token": self.runner.layout.bytes_per_token,
            "steps": self.engine.num_steps,
            "tokens": self.engine.num_tokens,
            "failed": self._num_failed,
            "transfers": self._num_transfers,
            "transfer_bytes": self._transfer_bytes,
            **self.receiver.stats(),
        }

    async def shutdown(self) -> dict[str, int]:
        """Stop the decode loop and release the NIXL registration; return what was still held."""
        held = {"waiting": self._num_waiting, "running": self.engine.num_running,
                "kv_blocks": self.arena.num_used_slots}
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.receiver.close()
        return held

    async def _reserve(self, request_id: str) -> int:
        if self.arena.num_free_slots == 0 and self._num_waiting >= self.config.max_queued_requests:
            raise OverloadedError(
                f"decode worker {self.worker_id}: {self._num_waiting} requests already wait for a KV slot "
                f"(max_queued_requests={self.config.max_queued_requests}); retry later or add decode replicas"
            )
        deadline = time.monotonic() + self.config.timeouts.admission_s
        self._num_waiting += 1
        try:
            while (slot := self.arena.allocate(request_id)) is None:
                if time.monotonic() > deadline:
                    raise OverloadedError(
                        f"decode worker {self.worker_id}: no free KV slot for request {request_id} within "
                        f"{self.config.timeouts.admission_s} s ({self.arena.num_slots} slots, all busy)"
                    )
                await asyncio.sleep(_ADMISSION_POLL_S)
            return slot
        finally:
            self._num_waiting -= 1

    async def _drain(self, queue: asyncio.Queue) -> AsyncIterator[dict]:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            token_ids, finish_reason = [], None
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Aborted):
                    finish_reason = "abort"
                    break
                token_ids.append(item.token_id)
                if item.finish_reason is not None:
                    finish_reason = item.finish_reason.value
                    break
            yield {"token_ids": token_ids, "finish_reason": finish_reason}
            if finish_reason is not None:
                return

    async def _decode_forever(self) -> None:
        while True:
            plan = self.engine.plan_step()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                logits = await asyncio.to_thread(self.engine.run_step, plan)
                events = self.engine.finish_step(plan, logits)
            except Exception as exc:
                logger.exception("decode worker %s: step failed", self.worker_id)
                self._fail_plan(plan, exc)
                continue
            self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            queue = self._streams.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)

    def _fail_plan(self, plan, exc: Exception) -> None:
        for sequence in plan.sequences:
            if sequence is None:
                continue
            error = RuntimeError(f"decode worker {self.worker_id}: step failed for {sequence.request_id}: {exc!r}")
            queue = self._streams.get(sequence.request_id)
            if queue is not None:
                queue.put_nowait(error)
            self.engine.abort(sequence.request_id)
        self.engine.abandon_step(plan)
