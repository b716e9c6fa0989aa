"""NixlEndpoint against a real NIXL agent in another process.

One NIXL agent must be used from one thread, so the remote side runs in a
spawned process. It registers a tensor filled with a known byte pattern,
sends its handshake through a pipe, polls notifications about every
millisecond and forwards each one back through the pipe.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import pytest
import torch

from disagg.transfer.nixl_agent import KVTransferError, NixlEndpoint, _load_nixl
from disagg.transfer.protocol import IncompatiblePeerError, ReleaseNotice

try:
    _load_nixl()
except ImportError as exc:
    pytest.skip(f"NIXL is not importable: {exc}", allow_module_level=True)

pytestmark = pytest.mark.timeout(60)

COMPAT = {"model": "tiny-llama", "dtype": "float32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
REMOTE_BYTES = 1 << 20
LOCAL_BYTES = 1 << 20
PIPE_TIMEOUT_S = 30.0

_names = itertools.count()


def unique_name(role: str) -> str:
    return f"test-{role}-{os.getpid()}-{next(_names)}"


def pattern(num_bytes: int) -> torch.Tensor:
    return ((torch.arange(num_bytes, dtype=torch.int64) * 7 + 3) % 251).to(torch.uint8)


def _remote_main(conn: Any, name: str) -> None:
    """Serve one registered pattern tensor until the parent sends "stop" (runs in the child)."""
    endpoint = NixlEndpoint(name, COMPAT, worker="test remote process")
    tensor = pattern(REMOTE_BYTES)
    endpoint.register(tensor)
    conn.send(("ready", endpoint.handshake(), tensor.data_ptr()))

    while True:
        for peer, message in endpoint.poll_notifications():
            conn.send(("notification", peer, message))
        if not conn.poll(0.001):
            continue

        command, *args = conn.recv()
        if command == "pause":  # stop progressing, as a worker busy in a long forward pass would
            time.sleep(args[0])
            conn.send(("resumed",))
        elif command == "add_peer":
            conn.send(("added", endpoint.add_peer(args[0])))
        elif command == "notify":
            endpoint.send_notification(args[0], args[1])
            conn.send(("notified",))
        elif command == "stop":
            endpoint.close()
            conn.send(("stopped",))
            return


class RemotePeer:
    """Parent-side handle on the remote process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.name = unique_name("remote")
        self.process = context.Process(target=_remote_main, args=(child_conn, self.name), daemon=True)
        self.process.start()
        self.notifications: list[tuple[str, bytes]] = []
        _, self.handshake, self.base = self.expect("ready", PIPE_TIMEOUT_S)

    def expect(self, kind: str, timeout_s: float) -> tuple:
        """Return the next pipe message of ``kind``, collecting notifications on the way."""
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            if not self.conn.poll(0.01):
                continue
            message = self.conn.recv()
            if message[0] == "notification":
                self.notifications.append(message[1:])
            if message[0] == kind:
                return message
        raise AssertionError(f"remote process sent no {kind!r} message within {timeout_s} s")

    def send(self, *command: Any) -> None:
        self.conn.send(command)

    def stop(self) -> None:
        if self.process.is_alive():
            self.send("stop")
            self.expect("stopped", 10.0)
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@pytest.fixture(scope="module")
def remote():
    peer = RemotePeer()
    yield peer
    peer.stop()


@pytest.fixture
def local():
    endpoint = NixlEndpoint(unique_name("local"), COMPAT, worker="test local")
    tensor = torch.zeros(LOCAL_BYTES, dtype=torch.uint8)
    endpoint.register(tensor)
    yield endpoint, tensor
    endpoint.close()


def regions(base: int, offsets_and_lengths: list[tuple[int, int]]) -> np.ndarray:
    return np.array([(base + offset, length) for offset, length in offsets_and_lengths], dtype=np.int64)


def read_sync(
    endpoint: NixlEndpoint,
    tensor: torch.Tensor,
    remote: RemotePeer,
    local_spec: list[tuple[int, int]],
    remote_spec: list[tuple[int, int]],
    notif: bytes = b"",
    timeout_s: float = 10.0,
) -> int:
    """READ ``remote_spec`` (offset, length) regions of ``remote`` into ``local_spec`` regions of ``tensor``."""
    local_regions = regions(tensor.data_ptr(), local_spec)
    remote_regions = regions(remote.base, remote_spec)
    return asyncio.run(endpoint.read(remote.name, local_regions, remote_regions, notif, timeout_s))


# Non-contiguous, odd-length regions: (remote offset, local offset, length).
READ_PLAN = [
    (3, 10, 1),
    (100, 500, 17),
    (4097, 9000, 333),
    (70001, 20001, 4099),
    (REMOTE_BYTES - 7, 65536, 7),
]


def test_read_copies_exact_bytes(remote: RemotePeer, local) -> None:
    endpoint, tensor = local
    peer = endpoint.add_peer(remote.handshake)
    remote_regions = regions(remote.base, [(offset, length) for offset, _, length in READ_PLAN])
    local_regions = regions(tensor.data_ptr(), [(offset, length) for _, offset, length in READ_PLAN])

    num_bytes = asyncio.run(endpoint.read(peer, local_regions, remote_regions, b"", timeout_s=10.0))

    source = pattern(REMOTE_BYTES)
    expected = torch.zeros(LOCAL_BYTES, dtype=torch.uint8)
    for remote_offset, local_offset, length in READ_PLAN:
        expected[local_offset : local_offset + length] = source[remote_offset : remote_offset + length]
    assert num_bytes == sum(length for _, _, length in READ_PLAN)
    assert torch.equal(tensor, expected)
    stats = endpoint.stats()
    assert stats["num_transfers"] == 1
    assert stats["transferred_bytes"] == num_bytes
    assert stats["num_in_flight"] == 0
    assert stats["peers"] == [remote.name]


def test_read_notification_reaches_remote(remote: RemotePeer, local) -> None:
    endpoint, tensor = local
    endpoint.add_peer(remote.handshake)
    notice = ReleaseNotice(request_id=f"req-{endpoint.name}", ok=True).encode()

    read_sync(endpoint, tensor, remote, [(0, 64)], [(0, 64)], notice)

    _, sender, message = remote.expect("notification", 5.0)
    assert sender == endpoint.name
    assert ReleaseNotice.decode(message) == ReleaseNotice(request_id=f"req-{endpoint.name}", ok=True)


def test_add_peer_rejects_compat_mismatch(remote: RemotePeer) -> None:
    endpoint = NixlEndpoint(unique_name("mismatch"), dict(COMPAT, dtype="bfloat16"))
    try:
        endpoint.register(torch.zeros(4096, dtype=torch.uint8))

        with pytest.raises(IncompatiblePeerError) as excinfo:
            endpoint.add_peer(remote.handshake)

        assert remote.name in str(excinfo.value)
        assert endpoint.name in str(excinfo.value)
        assert "['dtype']" in str(excinfo.value)
        assert endpoint.stats()["peers"] == []
    finally:
        endpoint.close()


def test_add_peer_twice_raises(remote: RemotePeer, local) -> None:
    endpoint, _ = local
    endpoint.add_peer(remote.handshake)

    with pytest.raises(ValueError, match="already added"):
        endpoint.add_peer(remote.handshake)


def test_peer_readded_after_remove(remote: RemotePeer, local) -> None:
    endpoint, tensor = local
    peer = endpoint.add_peer(remote.handshake)
    endpoint.remove_peer(peer)
    assert endpoint.stats()["peers"] == []

    assert endpoint.add_peer(remote.handshake) == peer
    read_sync(endpoint, tensor, remote, [(0, 8)], [(8, 8)])

    assert torch.equal(tensor[:8], pattern(16)[8:])


def test_timeout_releases_handle(remote: RemotePeer, local) -> None:
    endpoint, tensor = local
    peer = endpoint.add_peer(remote.handshake)
    remote.send("pause", 1.0)
    time.sleep(0.05)

    with pytest.raises(TimeoutError) as excinfo:
        read_sync(endpoint, tensor, remote, [(0, 4096)], [(0, 4096)], b"n", timeout_s=0.2)

    assert peer in str(excinfo.value)
    assert "4096 bytes" in str(excinfo.value)
    assert endpoint.stats()["num_in_flight"] == 0
    assert endpoint.stats()["num_failed"] == 1
    remote.expect("resumed", 10.0)
    # The endpoint still works once the remote side progresses again.
    read_sync(endpoint, tensor, remote, [(0, 16)], [(0, 16)])
    assert torch.equal(tensor[:16], pattern(16))


def test_cancelled_read_releases_handle(remote: RemotePeer, local) -> None:
    endpoint, tensor = local
    peer = endpoint.add_peer(remote.handshake)
    remote.send("pause", 1.0)
    time.sleep(0.05)

    async def read_then_cancel() -> None:
        task = asyncio.ensure_future(
            endpoint.read(
                peer, regions(tensor.data_ptr(), [(0, 64)]), regions(remote.base, [(0, 64)]), b"n", 10.0
            )
        )
        await asyncio.sleep(0.1)
        assert endpoint.stats()["num_in_flight"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(read_then_cancel())

    assert endpoint.stats()["num_in_flight"] == 0
    remote.expect("resumed", 10.0)


def test_read_outside_remote_registration_raises(remote: RemotePeer, local) -> None:
    endpoint, tensor = local
    peer = endpoint.add_peer(remote.handshake)

    with pytest.raises(KVTransferError, match=peer):
        read_sync(endpoint, tensor, remote, [(0, 16)], [(REMOTE_BYTES - 8, 16)])

    assert endpoint.stats()["num_in_flight"] == 0


@pytest.mark.parametrize(
    "local_spec,remote_spec,match",
    [
        ([(LOCAL_BYTES - 4, 8)], [(0, 8)], "outside the registered tensor"),
        ([(0, 8)], [(0, 9)], "equal length"),
        ([(0, 0)], [(0, 0)], "length <= 0"),
        ([(0, 8), (8, 8)], [(0, 8)], "equal length"),
    ],
)
def test_read_rejects_bad_regions(remote: RemotePeer, local, local_spec, remote_spec, match: str) -> None:
    endpoint, tensor = local
    endpoint.add_peer(remote.handshake)

    with pytest.raises(ValueError, match=match):
        read_sync(endpoint, tensor, remote, local_spec, remote_spec)


def test_read_unknown_peer_raises(local) -> None:
    endpoint, tensor = local

    with pytest.raises(ValueError, match="unknown peer"):
        asyncio.run(
            endpoint.read("nobody", regions(tensor.data_ptr(), [(0, 8)]), regions(0, [(0, 8)]), b"", 1.0)
        )


def test_progress_forever_delivers_notifications(remote: RemotePeer, local) -> None:
    endpoint, _ = local
    remote.send("add_peer", endpoint.handshake())
    remote.expect("added", 10.0)
    received: list[tuple[str, bytes]] = []

    async def run() -> None:
        task = asyncio.ensure_future(
            endpoint.progress_forever(on_notification=lambda *item: received.append(item))
        )
        remote.send("notify", endpoint.name, b"hello")
        deadline_s = time.monotonic() + 5.0
        while not received and time.monotonic() < deadline_s:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())

    assert received == [(remote.name, b"hello")]
    remote.expect("notified", 5.0)


def test_read_from_killed_peer_raises() -> None:
    remote = RemotePeer()
    endpoint = NixlEndpoint(unique_name("local"), COMPAT)
    try:
        tensor = torch.zeros(4096, dtype=torch.uint8)
        endpoint.register(tensor)
        peer = endpoint.add_peer(remote.handshake)
        local_regions, remote_regions = regions(tensor.data_ptr(), [(0, 64)]), regions(remote.base, [(0, 64)])
        asyncio.run(endpoint.read(peer, local_regions, remote_regions, b"", 10.0))
        remote.process.kill()
        remote.process.join(10.0)

        started_s = time.monotonic()
        with pytest.raises(KVTransferError, match=peer):
            asyncio.run(endpoint.read(peer, local_regions, remote_regions, b"", 10.0))

        assert time.monotonic() - started_s < 5.0
        assert endpoint.stats()["num_in_flight"] == 0
        assert endpoint.stats()["num_failed"] == 1
    finally:
        endpoint.close()
        remote.stop()


def test_register_twice_raises(local) -> None:
    endpoint, _ = local

    with pytest.raises(RuntimeError, match="already registered"):
        endpoint.register(torch.zeros(16, dtype=torch.uint8))


def test_register_rejects_non_contiguous() -> None:
    endpoint = NixlEndpoint(unique_name("strided"), COMPAT)
    try:
        with pytest.raises(ValueError, match="contiguous"):
            endpoint.register(torch.zeros(8, 8, dtype=torch.uint8).t())
    finally:
        endpoint.close()


def test_handshake_before_register_raises() -> None:
    endpoint = NixlEndpoint(unique_name("early"), COMPAT)
    try:
        with pytest.raises(RuntimeError, match="register"):
            endpoint.handshake()
    finally:
        endpoint.close()


def test_unknown_error_handling_mode_raises() -> None:
    with pytest.raises(ValueError, match="error_handling_mode"):
        NixlEndpoint(unique_name("mode"), COMPAT, error_handling_mode="strict")


def test_close_is_idempotent(remote: RemotePeer) -> None:
    endpoint = NixlEndpoint(unique_name("close"), COMPAT)
    endpoint.register(torch.zeros(64, dtype=torch.uint8))
    endpoint.add_peer(remote.handshake)

    endpoint.close()
    endpoint.close()

    assert endpoint.stats()["peers"] == []
    with pytest.raises(RuntimeError, match="closed"):
        endpoint.poll_notifications()
    with pytest.raises(RuntimeError, match="closed"):
        endpoint.handshake()
