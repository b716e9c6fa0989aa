"""KV transfer through Ray's object store: the fallback when NIXL cannot load.

The prefill worker ``ray.put``s a ``[num_layers, 2, kv_heads, n, head_dim]``
array and keeps the reference under a lease; the decode worker fetches it,
copies it into its slot and calls the prefill worker's ``release``. It costs a
serialisation copy and a store round trip that NIXL avoids.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import ray
import torch

from disagg.kv.arena import DecodeKVArena
from disagg.kv.lease import LeaseTable
from disagg.model.runner import PrefillResult
from disagg.transfer.base import KVHandle, KVReceiver, KVSender


def stack_kv(result: PrefillResult) -> torch.Tensor:
    return torch.stack([torch.stack([keys, values]) for keys, values in result.layer_kv])


class ObjectStoreSender(KVSender):
    name = "object_store"

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._leases = LeaseTable()
        self._num_exported = 0
        self._exported_bytes = 0

    def can_export(self, num_tokens: int) -> bool:
        return True

    def export(self, request_id: str, result: PrefillResult, ttl_s: float, start: int = 0) -> KVHandle:
        kv = stack_kv(result).contiguous()
        dtype = str(kv.dtype).removeprefix("torch.")
        # numpy has no bfloat16: ship its bits as int16 and reinterpret on arrival.
        array = kv.view(torch.int16).numpy() if kv.dtype == torch.bfloat16 else kv.numpy()
        ref = ray.put(array)
        lease = self._leases.add(request_id, ref, ttl_s)
        lease.mark_written()
        self._num_exported += 1
        self._exported_bytes += array.nbytes
        # The reader calls the owner's ``release`` once it has the bytes.
        owner = ray.get_runtime_context().current_actor
        return {"kind": self.name, "ref": ref, "dtype": dtype, "num_tokens": result.num_tokens, "owner": owner}

    def release(self, request_id: str, reader: str = "decode") -> bool:
        return self._leases.release(request_id) is not None

    def poll(self) -> list[str]:
        return [lease.request_id for lease in self._leases.expire_due()]

    def stats(self) -> dict[str, Any]:
        return {"leases_active": self._leases.num_active, "exported": self._num_exported,
                "exported_bytes": self._exported_bytes}

    def close(self) -> None:
        for request_id in self._leases.active_request_ids():
            self._leases.release(request_id)


class ObjectStoreReceiver(KVReceiver):
    name = "object_store"

    def __init__(self, worker_id: str, arena: DecodeKVArena) -> None:
        self.worker_id = worker_id
        self.arena = arena
        self._num_pulls = 0
        self._pulled_bytes = 0

    async def pull(self, request_id: str, handle: KVHandle, slot: int, timeout_s: float) -> int:
        array: np.ndarray = await asyncio.wait_for(handle["ref"], timeout=timeout_s)
        kv = torch.from_numpy(np.ascontiguousarray(array))
        if handle["dtype"] == "bfloat16":
            kv = kv.view(torch.bfloat16)
        self.arena.write(slot, kv)
        handle["owner"].release.remote(request_id)
        self._num_pulls += 1
        self._pulled_bytes += array.nbytes
        return array.nbytes

    def stats(self) -> dict[str, Any]:
        return {"pulls": self._num_pulls, "pulled_bytes": self._pulled_bytes}

    def close(self) -> None:
        return None
