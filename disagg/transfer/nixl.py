"""KV transfer by NIXL READ: the decode worker pulls from the prefill worker's outbox.

1. The prefill worker writes a request's KV into outbox blocks registered with
   NIXL at start-up, takes a lease, and returns a handle listing the byte
   regions of those blocks.
2. The decode worker reserves a slot, READs the regions into it (its arena is
   registered at start-up too), with a ``ReleaseNotice`` as the READ's
   notification.
3. The prefill worker polls notifications every millisecond; the notice frees
   the blocks. A lease that no reader takes expires and frees them too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
import numpy as np
import torch

from disagg.kv.arena import DecodeKVArena
from disagg.kv.layout import KVLayout, arena_regions, outbox_regions
from disagg.kv.lease import LeaseTable
from disagg.kv.outbox import PrefillKVBuffer
from disagg.model.runner import PrefillResult
from disagg.transfer.base import KVHandle, KVReceiver, KVSender
from disagg.transfer.nixl_agent import NixlEndpoint
from disagg.transfer.protocol import ReleaseNotice

logger = logging.getLogger(__name__)


class _NixlPeers:
    """Peer handling shared by both sides: each owns one ``NixlEndpoint`` as ``self.endpoint``."""

    endpoint: NixlEndpoint

    def handshake(self) -> bytes:
        return self.endpoint.handshake()

    def add_peer(self, handshake: bytes) -> None:
        self.endpoint.add_peer(handshake)

    def remove_peer(self, agent: str) -> None:
        if agent in self.endpoint.stats()["peers"]:
            self.endpoint.remove_peer(agent)


class NixlSender(_NixlPeers, KVSender):
    name = "nixl"

    def __init__(self, worker_id: str, layout: KVLayout, compat: dict, outbox_tokens: int, block_tokens: int) -> None:
        self.outbox = PrefillKVBuffer(layout, -(-outbox_tokens // block_tokens), block_tokens)
        self.endpoint = NixlEndpoint(f"{worker_id}-nixl", compat, worker=worker_id)
        self.endpoint.register(self.outbox.tensor)
        self._leases = LeaseTable()
        # request id -> readers ("decode", "pool") that have not released yet
        self._readers: dict[str, set[str]] = {}

    def can_export(self, num_tokens: int) -> bool:
        return self.outbox.can_allocate(num_tokens)

    def reserve(self, request_id: str, num_tokens: int, ttl_s: float) -> list[int]:
        """Allocate outbox blocks for a prompt before it is computed, under a RESERVED lease.

        Lets cached prefix chunks be read straight into the request's first
        blocks. Raises ``OutboxFullError`` when too few blocks are free.
        """
        block_ids = self.outbox.allocate(request_id, num_tokens)
        self._leases.add(request_id, block_ids, ttl_s)
        return block_ids

    def export(self, request_id: str, result: PrefillResult, ttl_s: float, start: int = 0) -> KVHandle:
        """Write positions ``[start, n)`` of the KV into the request's blocks and hand it to one reader.

        Uses the blocks of an earlier ``reserve`` when there is one.
        """
        lease = self._leases.get(request_id)
        if lease is None and start > 0:
            raise RuntimeError(
                f"prefill outbox: the reservation of request {request_id} expired before its KV was exported; "
                "its cached prefix is gone (raise Timeouts.prefill_s)"
            )
        if lease is None:
            lease = self._leases.add(request_id, self.outbox.allocate(request_id, result.num_tokens), ttl_s)
        lease.deadline_s = time.monotonic() + ttl_s  # the reader's time starts now, not at reservation
        block_ids = lease.payload
        self.outbox.write(block_ids, result.layer_kv, start=start)
        lease.mark_written()
        self._readers[request_id] = {"decode"}
        regions = outbox_regions(self.outbox.tensor, block_ids, result.num_tokens)
        descriptor = {
            "agent": self.endpoint.name,
            "num_tokens": result.num_tokens,
            "block_tokens": self.outbox.block_tokens,
            "regions": regions.tobytes(),
        }
        return {"kind": self.name, "descriptor": msgpack.packb(descriptor, use_bin_type=True)}

    def add_reader(self, request_id: str, reader: str = "pool") -> bool:
        """Hold the blocks for one more reader (a cache pool storing chunks); False if the KV is gone."""
        if request_id not in self._readers:
            return False
        self._readers[request_id].add(reader)
        return True

    def release(self, request_id: str, reader: str = "decode") -> bool:
        """Mark ``reader`` done (idempotent); free the blocks when no reader is left. Return whether they were."""
        remaining = self._readers.get(request_id)
        if remaining is not None:
            remaining.discard(reader)
            if remaining:
                return False
        self._readers.pop(request_id, None)
        block_ids = self._leases.release(request_id)
        if block_ids is None:
            return False
        self.outbox.free(block_ids)
        return True

    def abandon(self, request_id: str) -> None:
        """Free a request's blocks at once, whatever readers remain (its prefill failed)."""
        self._readers.pop(request_id, None)
        block_ids = self._leases.release(request_id)
        if block_ids is not None:
            self.outbox.free(block_ids)

    def block_ids(self, request_id: str) -> list[int]:
        """Return the outbox blocks of a request; raise ``KeyError`` when its lease is gone."""
        lease = self._leases.get(request_id)
        if lease is None:
            raise KeyError(f"no KV lease for request {request_id}")
        return lease.payload

    def block_regions(self, block_ids: list[int]) -> np.ndarray:
        """Return one ``(address, num_bytes)`` row per whole block; a block is one cache chunk."""
        block_bytes = self.outbox.tensor[0].numel() * self.outbox.tensor.element_size()
        base = self.outbox.tensor.data_ptr()
        return np.asarray([(base + block * block_bytes, block_bytes) for block in block_ids], dtype=np.int64)

    def prefix_kv(self, block_ids: list[int], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return each layer's ``(k, v)`` of the first ``num_tokens`` positions, copied out of the blocks."""
        # One copy per layer and k/v: concatenating the blocks' [heads, block_tokens, dim] runs.
        num_blocks = -(-num_tokens // self.outbox.block_tokens)
        tensor = self.outbox.tensor
        layer_kv = []
        for layer in range(tensor.shape[1]):
            keys = torch.cat([tensor[b, layer, 0] for b in block_ids[:num_blocks]], dim=1)[:, :num_tokens]
            values = torch.cat([tensor[b, layer, 1] for b in block_ids[:num_blocks]], dim=1)[:, :num_tokens]
            layer_kv.append((keys, values))
        return layer_kv

    def poll(self) -> list[str]:
        freed = []
        for peer, message in self.endpoint.poll_notifications():
            try:
                notice = ReleaseNotice.decode(message)
            except ValueError:
                logger.warning("ignoring an unreadable NIXL notification from %s", peer)
                continue
            if self.release(notice.request_id, reader=_reader_role(peer)):
                freed.append(notice.request_id)
        for lease in self._leases.expire_due():
            self._readers.pop(lease.request_id, None)
            self.outbox.free(lease.payload)
            freed.append(lease.request_id)
        return freed

    def stats(self) -> dict[str, Any]:
        return {
            "leases_active": self._leases.num_active,
            "outbox_blocks_used": self.outbox.num_used_blocks,
            "outbox_blocks_total": self.outbox.num_blocks,
            "nixl": self.endpoint.stats(),
        }

    def close(self) -> None:
        for lease in self._leases.expire_due(now_s=float("inf")):
            self.outbox.free(lease.payload)
        self.endpoint.close()


def _reader_role(peer: str) -> str:
    """Tell a cache pool's agent from a decode worker's by its name (``<cluster>-pool-<node>-nixl``)."""
    return "pool" if "-pool-" in peer else "decode"


class NixlReceiver(_NixlPeers, KVReceiver):
    name = "nixl"

    def __init__(self, worker_id: str, arena: DecodeKVArena, compat: dict, block_tokens: int) -> None:
        self.arena = arena
        self.block_tokens = block_tokens
        self.endpoint = NixlEndpoint(f"{worker_id}-nixl", compat, worker=worker_id)
        self.endpoint.register(arena.tensor)

    async def pull(self, request_id: str, handle: KVHandle, slot: int, timeout_s: float) -> int:
        descriptor = msgpack.unpackb(handle["descriptor"], raw=False)
        remote = np.frombuffer(descriptor["regions"], dtype=np.int64).reshape(-1, 2)
        local = arena_regions(self.arena.tensor, slot, descriptor["num_tokens"], descriptor["block_tokens"])
        notice = ReleaseNotice(request_id=request_id, ok=True).encode()
        return await self.endpoint.read(descriptor["agent"], local, remote, notice, timeout_s)

    def poll(self) -> None:
        self.endpoint.poll_notifications()

    def stats(self) -> dict[str, Any]:
        return {"nixl": self.endpoint.stats()}

    def close(self) -> None:
        self.endpoint.close()
