"""The KV transport interface and its factory.

A prefill worker owns a ``KVSender``: it exports each request's KV as a small,
msgpack-friendly handle and keeps the bytes until the reader releases them or
the lease expires. A decode worker owns a ``KVReceiver``: it pulls the bytes
named by a handle into a reserved arena slot. Both are driven from one actor
event loop and are not thread-safe.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from disagg.kv.arena import DecodeKVArena
from disagg.kv.layout import KVLayout
from disagg.model.runner import PrefillResult

logger = logging.getLogger(__name__)

KVHandle = dict[str, Any]


class KVSender(ABC):
    """Prefill side: holds exported KV until it is read or its lease expires."""

    name: str

    def handshake(self) -> bytes | None:
        """Return this side's connection handshake; None (the default) when the transport needs none."""
        return None

    def add_peer(self, handshake: bytes) -> None:
        """Accept a peer's handshake; raise ``IncompatiblePeerError`` on a mismatch. A no-op by default."""
        return None

    def remove_peer(self, agent: str) -> None:
        """Forget a departed peer; a no-op for transports without peers."""
        return None

    @abstractmethod
    def can_export(self, num_tokens: int) -> bool:
        """Return whether ``export`` of ``num_tokens`` tokens would find room now."""

    @abstractmethod
    def export(self, request_id: str, result: PrefillResult, ttl_s: float, start: int = 0) -> KVHandle:
        """Keep the request's KV under a lease of ``ttl_s`` seconds and return a handle to it.

        Positions before ``start`` are already in place (loaded from the cache).
        """

    @abstractmethod
    def release(self, request_id: str, reader: str = "decode") -> bool:
        """Mark ``reader`` done with the request's KV; free it when no reader is left. Idempotent."""

    @abstractmethod
    def poll(self) -> list[str]:
        """Progress the transport, free read and expired KV; return the request ids freed."""

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None:
        """Release every lease and transport resource. Idempotent."""


class KVReceiver(ABC):
    """Decode side: pulls a handle's KV into an arena slot."""

    name: str

    def handshake(self) -> bytes | None:
        """Return this side's connection handshake; None (the default) when the transport needs none."""
        return None

    def add_peer(self, handshake: bytes) -> None:
        """Accept a peer's handshake; raise ``IncompatiblePeerError`` on a mismatch. A no-op by default."""
        return None

    def remove_peer(self, agent: str) -> None:
        """Forget a departed peer; a no-op for transports without peers."""
        return None

    @abstractmethod
    async def pull(self, request_id: str, handle: KVHandle, slot: int, timeout_s: float) -> int:
        """Copy the handle's KV into positions ``[0, n)`` of ``slot``; return the bytes moved.

        Raises ``TimeoutError`` past ``timeout_s`` and ``KVTransferError`` on
        failure; the slot then holds partial KV and must not be used.
        """

    def poll(self) -> None:
        """Progress the transport between steps; a no-op by default."""
        return None

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None: ...


def nixl_available() -> tuple[bool, str]:
    """Return whether NIXL imports here, and the reason when it does not."""
    try:
        from disagg.transfer.nixl_agent import _load_nixl

        _load_nixl()
    except Exception as exc:  # noqa: BLE001 - any import failure means fall back
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def choose_transport(requested: str) -> str:
    """Return the transport to use, falling back to the object store with a WARNING."""
    if requested != "nixl":
        return requested
    ok, reason = nixl_available()
    if ok:
        return "nixl"
    logger.warning("NIXL cannot load (%s); falling back to the Ray object store transport", reason)
    return "object_store"


def make_sender(transport: str, worker_id: str, layout: KVLayout, compat: dict, outbox_tokens: int,
                block_tokens: int) -> KVSender:
    if transport == "nixl":
        from disagg.transfer.nixl import NixlSender

        return NixlSender(worker_id, layout, compat, outbox_tokens, block_tokens)
    from disagg.transfer.object_store import ObjectStoreSender

    return ObjectStoreSender(worker_id)


def make_receiver(transport: str, worker_id: str, arena: DecodeKVArena, compat: dict, block_tokens: int) -> KVReceiver:
    if transport == "nixl":
        from disagg.transfer.nixl import NixlReceiver

        return NixlReceiver(worker_id, arena, compat, block_tokens)
    from disagg.transfer.object_store import ObjectStoreReceiver

    return ObjectStoreReceiver(worker_id, arena)
