"""One NIXL agent per worker, reading KV blocks from peers over UCX.

Threading: NIXL's default thread-sync mode is unsafe when two threads use one
agent (it can segfault). Every method of ``NixlEndpoint`` calls NIXL on the
calling thread and takes no lock, so one endpoint must be used from one
thread only, in practice the event loop of an asyncio actor.

Progress: the agent runs without NIXL's progress thread, which busy-spins a
whole core. Instead, ``read`` polls its own transfer, and the side being
read from must call ``poll_notifications`` about every millisecond or run
``progress_forever`` as a task (see ``DEFAULT_ERROR_HANDLING_MODE``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch

from disagg.transfer.protocol import PROTOCOL_VERSION, Handshake, check_compatible, compat_hash

logger = logging.getLogger(__name__)

# UCX error handling mode of the reading side. Measured between two processes
# on one host: a 2-core x86_64 VM without GPU, nixl-cu12 1.5.1, a loopback-only
# network namespace, READs of a registered torch tensor carrying a notification.
# - "peer": CMA moves the data, but a READ is DONE only after the remote side
#   progresses its agent. 4 KiB took ~1.2 ms while the remote side polled every
#   1 ms, and never finished while it did not poll. The first READ also waits
#   for the remote side to finish connection set-up (~10 ms).
# - "none": 4 KiB took ~0.05 ms without the remote side, because CMA is
#   one-sided. With UCX_TLS=tcp,self, the transport between hosts without RDMA,
#   READs again needed the remote side to progress.
# - Both: a READ from a killed peer raised nixlRemoteDisconnectError in ~1 ms,
#   256 MiB took ~50 ms (~5 GB/s), and a "none" reader worked with a "peer" owner.
# "peer" is the default because the owner of KV blocks must poll anyway, to
# receive release notifications and to serve TCP peers, and because it keeps
# UCX's handling of peer failures. A reader on the same host as a busy owner
# may pass error_handling_mode="none".
DEFAULT_ERROR_HANDLING_MODE = "peer"

_POLL_INTERVAL_S = 0.001


class KVTransferError(RuntimeError):
    """A NIXL transfer failed, or NIXL rejected a request to start one."""


def _load_nixl() -> tuple[ModuleType, tuple[type[Exception], ...]]:
    """Import NIXL's Python API and return it with NIXL's exception classes.

    The ``nixl`` meta package provides ``nixl._api``; a bare ``nixl-cu12`` or
    ``nixl-cu13`` install provides the same module under its own name.
    Raises ImportError naming the packages to install.
    """
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

    for package in ("nixl", "nixl_cu12", "nixl_cu13"):
        # Importing NIXL sets logging.raiseExceptions = False for the whole
        # process (nixl-cu12 1.5.1); keep the application's setting.
        raise_exceptions = logging.raiseExceptions
        try:
            api = importlib.import_module(f"{package}._api")
            bindings = importlib.import_module(f"{package}._bindings")
        except ImportError:
            continue
        finally:
            logging.raiseExceptions = raise_exceptions
        errors = tuple(
            value
            for name, value in vars(bindings).items()
            if name.startswith("nixl") and isinstance(value, type) and issubclass(value, Exception)
        )
        return api, errors
    raise ImportError("NIXL is not installed: pip install nixl-cu12 (or nixl) to use NixlEndpoint")


class NixlEndpoint:
    """Owner of one NIXL agent, its one registered tensor and its peers.

    Not thread-safe: use one endpoint from one thread (see the module doc).
    """

    def __init__(
        self,
        name: str,
        compat_fields: dict[str, Any],
        *,
        worker: str = "",
        error_handling_mode: str = DEFAULT_ERROR_HANDLING_MODE,
    ) -> None:
        if error_handling_mode not in ("peer", "none"):
            raise ValueError(f"error_handling_mode must be 'peer' or 'none', got {error_handling_mode!r}")
        api, self._nixl_errors = _load_nixl()
        self.name = name
        self._label = f"NIXL endpoint {name!r}"
        self._compat_fields = dict(compat_fields)
        self._compat_hash = compat_hash(self._compat_fields)
        self._worker = worker

        config = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
        self._agent: Any = api.nixl_agent(name, config)
        self._agent.create_backend("UCX", {"ucx_error_handling_mode": error_handling_mode})

        self._tensor: torch.Tensor | None = None
        self._reg_descs: Any = None
        self._region = (0, 0)  # (base address, length in bytes) of the registered tensor
        self._peers: set[str] = set()
        self._in_flight: set[Any] = set()
        self._notifications: list[tuple[str, bytes]] = []
        self._num_transfers = 0
        self._transferred_bytes = 0
        self._num_failed = 0
        logger.info(
            "NIXL endpoint %s created: UCX backend, error handling mode %s", name, error_handling_mode
        )

    def register(self, tensor: torch.Tensor) -> None:
        """Register ``tensor`` with NIXL so that peers can read from and into it.

        Keeps a reference to the tensor until ``close``. Allowed once per
        endpoint, because registering many buffers is slow, so register one
        large pool. Raises ValueError for a non-CPU or non-contiguous tensor and
        RuntimeError on a second call or after ``close``.
        """
        self._check_open()
        if self._tensor is not None:
            raise RuntimeError(f"{self._label}: a tensor is already registered; register one pool, once")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"{self._label}: register needs a contiguous CPU tensor, "
                f"got device={tensor.device}, contiguous={tensor.is_contiguous()}"
            )

        self._reg_descs = self._agent.register_memory(tensor)
        self._tensor = tensor
        self._region = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        logger.info("NIXL endpoint %s registered %d bytes", self.name, self._region[1])

    def handshake(self) -> bytes:
        """Return this endpoint's encoded ``Handshake`` for peers to ``add_peer``.

        Raises RuntimeError before ``register``, because agent metadata
        fetched earlier does not contain the registered memory.
        """
        self._check_open()
        if self._tensor is None:
            raise RuntimeError(f"{self._label}: call register() before handshake()")
        return self._local_handshake(self._agent.get_agent_metadata()).encode()

    def add_peer(self, handshake_bytes: bytes) -> str:
        """Check a peer's handshake and add its agent, returning the peer's name.

        Raises ValueError for a malformed handshake or a peer already added
        (``remove_peer`` it first), IncompatiblePeerError before adding
        anything if the protocol version or compat hash differ, and
        KVTransferError if NIXL rejects the metadata.
        """
        self._check_open()
        remote = Handshake.decode(handshake_bytes)
        check_compatible(self._local_handshake(b""), remote)
        if remote.agent_name in self._peers:
            raise ValueError(f"{self._label}: peer {remote.agent_name!r} is already added; remove_peer first")

        try:
            added_name = self._agent.add_remote_agent(remote.nixl_metadata)
        except self._nixl_errors as exc:
            raise KVTransferError(
                f"{self._label}: adding peer {remote.agent_name!r} failed: {exc!r}"
            ) from exc
        if isinstance(added_name, bytes):
            added_name = added_name.decode()
        if added_name != remote.agent_name:
            self._agent.remove_remote_agent(added_name)
            raise ValueError(
                f"{self._label}: handshake names agent {remote.agent_name!r} "
                f"but its NIXL metadata names {added_name!r}"
            )

        self._peers.add(added_name)
        logger.info(
            "NIXL endpoint %s added peer %s (%s)", self.name, added_name, remote.worker or "no description"
        )
        return added_name

    def remove_peer(self, name: str) -> None:
        """Remove peer ``name`` and disconnect from it. Does nothing for an unknown name.

        The same name may be added again afterwards, for example for a
        restarted peer.
        """
        self._check_open()
        if name not in self._peers:
            return

        self._peers.discard(name)
        try:
            self._agent.remove_remote_agent(name)
        except self._nixl_errors as exc:
            logger.warning("NIXL endpoint %s: removing peer %s failed: %r", self.name, name, exc)
        logger.info("NIXL endpoint %s removed peer %s", self.name, name)

    async def read(
        self,
        peer: str,
        local_regions: np.ndarray,
        remote_regions: np.ndarray,
        notif: bytes,
        timeout_s: float,
    ) -> int:
        """READ ``remote_regions`` of ``peer`` into ``local_regions`` and return the bytes moved.

        Each regions array has shape (N, 2): one (address, length in bytes)
        row per region, row i of one side pairing with row i of the other.
        Local regions must lie in this endpoint's registered tensor, remote
        ones in the peer's. ``notif`` is delivered to the peer when the READ
        completes. Polls every ~1 ms, progressing this endpoint's own
        notifications too. The transfer handle is released on every exit,
        unless NIXL cannot cancel it (then it stays in ``stats()`` as in flight).

        NOTE: between processes on one host UCX copies by CMA inside the post
        call, so a large READ blocks the event loop for the whole copy (~50 ms
        for 256 MiB measured). Split reads if the loop must stay responsive.

        Raises ValueError for an unknown peer or malformed regions,
        KVTransferError if NIXL rejects or fails the transfer, and
        TimeoutError if it is not done after ``timeout_s``.
        """
        self._check_open()
        local_regions = np.asarray(local_regions, dtype=np.int64)
        remote_regions = np.asarray(remote_regions, dtype=np.int64)
        num_bytes = self._check_regions(peer, local_regions, remote_regions)
        deadline_s = time.monotonic() + timeout_s

        try:
            local_descs = self._agent.get_xfer_descs(_to_descs(local_regions), "DRAM")
            remote_descs = self._agent.get_xfer_descs(_to_descs(remote_regions), "DRAM")
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, peer, notif)
        except self._nixl_errors as exc:
            self._num_failed += 1
            raise KVTransferError(
                f"{self._label}: starting a READ of {num_bytes} bytes from peer {peer!r} failed: {exc!r}"
            ) from exc

        self._in_flight.add(handle)
        try:
            await self._wait(handle, peer, num_bytes, deadline_s, timeout_s)
        except BaseException:
            self._num_failed += 1
            raise
        finally:
            self._release_handle(handle)

        self._num_transfers += 1
        self._transferred_bytes += num_bytes
        logger.debug(
            "NIXL endpoint %s read %d bytes in %d regions from %s",
            self.name,
            num_bytes,
            len(local_regions),
            peer,
        )
        return num_bytes

    def send_notification(self, peer: str, message: bytes) -> None:
        """Send ``message`` to ``peer`` outside of any transfer.

        Useful to tell an owner that a READ failed. Raises ValueError for an
        unknown peer and KVTransferError if NIXL fails to send.
        """
        self._check_open()
        self._check_peer(peer)
        try:
            self._agent.send_notif(peer, message)
        except self._nixl_errors as exc:
            raise KVTransferError(f"{self._label}: notification to {peer!r} failed: {exc!r}") from exc

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """Progress the agent and return the (peer name, message) pairs received since the last call.

        Cheap enough to call every millisecond, and must be called that
        often (or ``progress_forever`` run) on a side that others read from.
        """
        self._check_open()
        self._progress()
        notifications, self._notifications = self._notifications, []
        return notifications

    async def progress_forever(
        self,
        interval_s: float = _POLL_INTERVAL_S,
        on_notification: Callable[[str, bytes], None] | None = None,
    ) -> None:
        """Progress the agent every ``interval_s`` until ``close`` or cancellation.

        With ``on_notification``, hands each notification to it as it
        arrives. Without it, leaves them queued for ``poll_notifications``.
        """
        while self._agent is not None:
            self._progress()
            if on_notification is not None:
                notifications, self._notifications = self._notifications, []
                for peer, message in notifications:
                    on_notification(peer, message)
            await asyncio.sleep(interval_s)

    def stats(self) -> dict[str, Any]:
        """Return counters of registered bytes, peers, transfers and in-flight handles.

        ``num_failed`` counts errors, timeouts and cancellations.
        """
        return {
            "registered_bytes": self._region[1],
            "peers": sorted(self._peers),
            "num_transfers": self._num_transfers,
            "transferred_bytes": self._transferred_bytes,
            "num_failed": self._num_failed,
            "num_in_flight": len(self._in_flight),
        }

    def close(self) -> None:
        """Release transfer handles, remove peers, deregister memory and drop the agent.

        Idempotent. After it, every other method raises RuntimeError.
        """
        if self._agent is None:
            return

        for handle in list(self._in_flight):
            self._release_handle(handle)
        for peer in sorted(self._peers):
            self.remove_peer(peer)
        if self._reg_descs is not None:
            try:
                self._agent.deregister_memory(self._reg_descs)
            except self._nixl_errors as exc:
                logger.warning("NIXL endpoint %s: deregistering memory failed: %r", self.name, exc)
        self._reg_descs = None
        self._tensor = None
        self._agent = None
        logger.info("NIXL endpoint %s closed", self.name)

    def _local_handshake(self, metadata: bytes) -> Handshake:
        return Handshake(
            protocol_version=PROTOCOL_VERSION,
            agent_name=self.name,
            compat_hash=self._compat_hash,
            nixl_metadata=metadata,
            kv_layout=self._compat_fields,
            worker=self._worker,
        )

    def _check_open(self) -> None:
        if self._agent is None:
            raise RuntimeError(f"{self._label} is closed")

    def _check_peer(self, peer: str) -> None:
        if peer not in self._peers:
            raise ValueError(f"{self._label}: unknown peer {peer!r}; add_peer() its handshake first")

    def _check_regions(self, peer: str, local_regions: np.ndarray, remote_regions: np.ndarray) -> int:
        """Validate a READ's arguments and return its total length in bytes."""
        self._check_peer(peer)
        if self._tensor is None:
            raise RuntimeError(f"{self._label}: call register() before read()")
        for label, regions in (("local_regions", local_regions), ("remote_regions", remote_regions)):
            if regions.ndim != 2 or regions.shape[1] != 2 or len(regions) == 0:
                raise ValueError(f"{label} must have shape (N, 2) with N >= 1, got {regions.shape}")
            if (regions[:, 1] <= 0).any():
                raise ValueError(
                    f"{label} has a region of length <= 0: {regions[regions[:, 1] <= 0].tolist()}"
                )
        if local_regions.shape != remote_regions.shape or (local_regions[:, 1] != remote_regions[:, 1]).any():
            raise ValueError(
                "local_regions and remote_regions must pair regions of equal length, got lengths "
                f"{local_regions[:, 1].tolist()} and {remote_regions[:, 1].tolist()}"
            )

        base, length = self._region
        starts, ends = local_regions[:, 0], local_regions[:, 0] + local_regions[:, 1]
        outside = (starts < base) | (ends > base + length)
        if outside.any():
            raise ValueError(
                f"local regions {local_regions[outside].tolist()} are outside the registered tensor "
                f"[{base:#x}, {base + length:#x}) of {self._label}"
            )
        return int(local_regions[:, 1].sum())

    async def _wait(
        self, handle: Any, peer: str, num_bytes: int, deadline_s: float, timeout_s: float
    ) -> None:
        try:
            state = self._agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline_s:
                    raise TimeoutError(
                        f"{self._label}: READ of {num_bytes} bytes from peer {peer!r} "
                        f"timed out after {timeout_s} s"
                    )
                self._progress()
                await asyncio.sleep(_POLL_INTERVAL_S)
                state = self._agent.check_xfer_state(handle)
        except self._nixl_errors as exc:
            raise KVTransferError(
                f"{self._label}: READ of {num_bytes} bytes from peer {peer!r} failed: {exc!r}"
            ) from exc
        if state != "DONE":
            raise KVTransferError(
                f"{self._label}: READ of {num_bytes} bytes from peer {peer!r} ended in state {state}"
            )

    def _progress(self) -> None:
        for peer, messages in self._agent.get_new_notifs().items():
            self._notifications.extend((peer, message) for message in messages)

    def _release_handle(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except self._nixl_errors as exc:
            # NIXL could not cancel an active transfer. Keep the handle in
            # flight, so that stats() shows it and close() tries again.
            logger.error("NIXL endpoint %s: releasing a transfer handle failed: %r", self.name, exc)
            return
        self._in_flight.discard(handle)


def _to_descs(regions: np.ndarray) -> np.ndarray:
    """Turn (N, 2) (address, length) rows into NIXL's (N, 3) rows with device id 0."""
    descs = np.zeros((len(regions), 3), dtype=np.uint64)
    descs[:, :2] = regions
    return descs
