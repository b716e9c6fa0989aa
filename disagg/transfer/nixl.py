"""KV transfer by NIXL READ: the decode worker pulls from the prefill worker's outbox.

1. The prefill worker writes a request's KV into outbox blocks registered with
   NIXL at start-up, takes a lease, and returns a handle listing the byte
   regions of those blocks.
2. The decode worker reserves a slot, READs the regions into it (its arena is
   registered at start-up too), with a ``ReleaseNotice`` as the READ's
   notification.
3. The prefill worker polls notifications every millisecond; the notice frees
   the blocks. A lease nobody reads expires and frees them too.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import numpy as np

from disagg.kv.arena import DecodeKVArena
from disagg.kv.layout import KVLayout, arena_regions, outbox_regions
from disagg.kv.lease import LeaseTable
from disagg.kv.outbox import PrefillKVBuffer
from disagg.model.runner import PrefillResult
from disagg.transfer.base import KVHandle, KVReceiver, KVSender
from disagg.transfer.nixl_agent import NixlEndpoint
from disagg.transfer.protocol import ReleaseNotice

logger = logging.getLogger(__name__)


class NixlSender(KVSender):
    name = "nixl"

    def __init__(self, worker_id: str, layout: KVLayout, compat: dict, outbox_tokens: int, block_tokens: int) -> None:
        self.outbox = PrefillKVBuffer(layout, -(-outbox_tokens // block_tokens), block_tokens)
        self.endpoint = NixlEndpoint(f"{worker_id}-nixl", compat, worker=worker_id)
        self.endpoint.register(self.outbox.tensor)
        self._leases = LeaseTable()

    def handshake(self) -> bytes:
        return self.endpoint.handshake()

    def add_peer(self, handshake: bytes) -> None:
        self.endpoint.add_peer(handshake)

    def can_export(self, num_tokens: int) -> bool:
        return self.outbox.can_allocate(num_tokens)

    def export(self, request_id: str, result: PrefillResult, ttl_s: float) -> KVHandle:
        block_ids = self.outbox.allocate(request_id, result.num_tokens)
        lease = self._leases.add(request_id, block_ids, ttl_s)
        self.outbox.write(block_ids, result.layer_kv)
        lease.mark_written()
        regions = outbox_regions(self.outbox.tensor, block_ids, result.num_tokens)
        descriptor = {
            "agent": self.endpoint.name,
            "num_tokens": result.num_tokens,
            "block_tokens": self.outbox.block_tokens,
            "regions": regions.tobytes(),
        }
        return {"kind": self.name, "descriptor": msgpack.packb(descriptor, use_bin_type=True)}

    def release(self, request_id: str) -> bool:
        block_ids = self._leases.release(request_id)
        if block_ids is None:
            return False
        self.outbox.free(block_ids)
        return True

    def poll(self) -> list[str]:
        freed = []
        for peer, message in self.endpoint.poll_notifications():
            try:
                notice = ReleaseNotice.decode(message)
            except ValueError:
                logger.warning("ignoring an unreadable NIXL notification from %s", peer)
                continue
            if self.release(notice.request_id):
                freed.append(notice.request_id)
        for lease in self._leases.expire_due():
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


class NixlReceiver(KVReceiver):
    name = "nixl"

    def __init__(self, worker_id: str, arena: DecodeKVArena, compat: dict, block_tokens: int) -> None:
        self.arena = arena
        self.block_tokens = block_tokens
        self.endpoint = NixlEndpoint(f"{worker_id}-nixl", compat, worker=worker_id)
        self.endpoint.register(arena.tensor)

    def handshake(self) -> bytes:
        return self.endpoint.handshake()

    def add_peer(self, handshake: bytes) -> None:
        self.endpoint.add_peer(handshake)

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
