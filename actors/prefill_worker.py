"""PrefillWorker: computes a prompt's KV and first token, then holds the KV for a decode worker."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from actors.common import compat_fields, load_runner
from disagg.config import EngineConfig
from disagg.errors import OverloadedError
from disagg.sampling import SamplingParams, is_stop_token, make_sampler
from disagg.transfer.base import make_sender

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.001


class PrefillWorker:
    """Async Ray actor. One prefill runs at a time; the event loop keeps polling NIXL meanwhile."""

    def __init__(self, worker_id: str, config: dict, transport: str, threads: int) -> None:
        self.worker_id = worker_id
        self.config = EngineConfig.from_dict(config)
        self.runner = load_runner(self.config, threads)
        self.sender = make_sender(transport, worker_id, self.runner.layout, compat_fields(self.runner, self.config),
                                  self.config.prefill_outbox_tokens, self.config.prefill_block_tokens)
        self._compute_lock = asyncio.Lock()
        self._num_waiting = 0
        self._num_prefills = 0
        self._num_failed = 0
        self._prefill_tokens = 0
        self._poll_task: asyncio.Task | None = None
        logger.info("prefill worker %s ready, transport %s", worker_id, transport)

    async def start(self) -> dict[str, Any]:
        """Start the NIXL polling loop; return this worker's registration facts."""
        if self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())
        return {"worker_id": self.worker_id, "handshake": self.sender.handshake(),
                "layout": self.runner.layout.__dict__, "model": self.runner.resolved.name,
                "kv_bytes_per_token": self.runner.layout.bytes_per_token}

    async def add_peer(self, handshake: bytes) -> None:
        """Accept a decode worker's handshake; raises ``IncompatiblePeerError`` on a mismatch."""
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

        self._num_waiting += 1
        try:
            async with self._compute_lock:
                await self._wait_for_outbox(request_id, len(token_ids))
                queue_s = time.perf_counter() - queued_at
                result = await asyncio.to_thread(
                    self.runner.prefill, token_ids, None, self.config.prefill_chunk_tokens
                )
        except Exception:
            self._num_failed += 1
            raise
        finally:
            self._num_waiting -= 1

        first_token = make_sampler(params, request_id).sample(result.logits, output_index=0)
        done = params.max_tokens == 1 or is_stop_token(first_token, params, self.runner.eos_token_ids)
        handle = None if done else self.sender.export(request_id, result, self.config.timeouts.lease_s)
        self._num_prefills += 1
        self._prefill_tokens += result.num_computed_tokens
        logger.debug("prefill %s: %d tokens in %.3f s", request_id, result.num_tokens, result.forward_s)
        return {
            "first_token": first_token,
            "handle": handle,
            "queue_s": queue_s,
            "prefill_s": result.forward_s,
            "cached_tokens": result.num_tokens - result.num_computed_tokens,
        }

    async def release(self, request_id: str) -> bool:
        """Free a request's exported KV now (idempotent); return whether it was still held."""
        return self.sender.release(request_id)

    async def stats(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "waiting": self._num_waiting,
            "prefills": self._num_prefills,
            "failed": self._num_failed,
            "prefill_tokens": self._prefill_tokens,
            **self.sender.stats(),
        }

    async def shutdown(self) -> None:
        """Stop polling and release every lease and NIXL registration."""
        if self._poll_task is not None:
            self._poll_task.cancel()
        self.sender.close()

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
            await asyncio.sleep(_POLL_INTERVAL_S)
