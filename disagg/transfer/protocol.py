"""Messages that transfer endpoints exchange, encoded with msgpack.

Two kinds of message cross process boundaries:

- ``Handshake``: sent once per peer pair, out of band (a Ray call or a pipe).
  It carries the NIXL agent metadata plus enough about the KV layout to
  reject a peer whose blocks would be read as garbage.
- ``ReleaseNotice``: the payload of a NIXL notification that a reader sends
  to the KV owner when it has finished (or given up) reading a request's
  blocks, so that the owner can release the lease.

Everything is msgpack, never pickle: a handshake comes from another process
and must not be able to run code on decode.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

_HANDSHAKE_FIELDS = (
    "protocol_version",
    "agent_name",
    "compat_hash",
    "nixl_metadata",
    "kv_layout",
    "worker",
)


class IncompatiblePeerError(ValueError):
    """A peer's handshake shows it cannot exchange KV blocks with this side."""


def _canonical(value: Any) -> Any:
    """Convert nested dicts to key-sorted pairs and tuples to lists."""
    if isinstance(value, dict):
        return [[key, _canonical(value[key])] for key in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


def compat_hash(fields: dict[str, Any]) -> str:
    """Return the sha256 hex digest of ``fields`` in a canonical msgpack form.

    Keys are sorted at every nesting level, so two dicts with the same items
    hash equally whatever their insertion order. Does not mutate ``fields``.
    Raises TypeError if a key is not a str or a value is not msgpack-encodable.
    """
    for key in fields:
        if not isinstance(key, str):
            raise TypeError(f"compat field names must be str, got {key!r} ({type(key).__name__})")

    encoded = msgpack.packb(_canonical(fields), use_bin_type=True)
    return hashlib.sha256(encoded).hexdigest()


@dataclass(frozen=True)
class Handshake:
    """Everything a peer needs to add this endpoint and check compatibility."""

    protocol_version: int
    agent_name: str
    compat_hash: str
    nixl_metadata: bytes
    kv_layout: dict[str, Any] = field(default_factory=dict)
    worker: str = ""

    def encode(self) -> bytes:
        """Encode this handshake as a msgpack map."""
        message = {name: getattr(self, name) for name in _HANDSHAKE_FIELDS}
        return msgpack.packb(message, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Handshake:
        """Decode a handshake produced by ``encode``.

        Unknown keys are ignored so that a newer peer can add fields.
        Raises ValueError if ``data`` is not a msgpack map or lacks a field.
        """
        try:
            message = msgpack.unpackb(data, raw=False)
        except (msgpack.UnpackException, ValueError) as exc:
            raise ValueError(f"invalid handshake: not msgpack ({exc})") from exc
        if not isinstance(message, dict):
            raise ValueError(f"invalid handshake: expected a msgpack map, got {type(message).__name__}")

        missing = [name for name in _HANDSHAKE_FIELDS if name not in message]
        if missing:
            raise ValueError(
                f"invalid handshake from agent {message.get('agent_name')!r}: missing fields {missing} "
                f"(its protocol version {message.get('protocol_version')!r}, ours {PROTOCOL_VERSION})"
            )
        return cls(**{name: message[name] for name in _HANDSHAKE_FIELDS})


def check_compatible(local: Handshake, remote: Handshake) -> None:
    """Check that ``remote`` may exchange KV blocks with ``local``.

    Compares the protocol version, the compatibility hash and the agent
    names (which must differ, because NIXL keys peers by name). Mutates
    nothing. Raises IncompatiblePeerError naming both agents, each differing
    field with both values, and both sides' KV layouts.
    """
    problems = []
    if remote.agent_name == local.agent_name:
        problems.append(f"both agents are named {local.agent_name!r}; give every worker a unique agent name")
    if remote.protocol_version != local.protocol_version:
        problems.append(
            f"protocol version {local.protocol_version} (local) != {remote.protocol_version} (remote); "
            "run the same disagg version on both workers"
        )
    if remote.compat_hash != local.compat_hash:
        problems.append(
            f"compat hash {local.compat_hash[:12]} (local) != {remote.compat_hash[:12]} (remote); "
            "start both workers with the same model, weights, dtype and KV layout"
        )
    if not problems:
        return

    differing = sorted(
        key
        for key in set(local.kv_layout) | set(remote.kv_layout)
        if local.kv_layout.get(key) != remote.kv_layout.get(key)
    )
    raise IncompatiblePeerError(
        f"peer {remote.agent_name!r} ({remote.worker or 'no worker description'}) is incompatible with "
        f"local agent {local.agent_name!r} ({local.worker or 'no worker description'}): "
        + "; ".join(problems)
        + f". KV layout keys that differ: {differing or 'none'}. "
        f"Local layout: {local.kv_layout}. Remote layout: {remote.kv_layout}."
    )


@dataclass(frozen=True)
class ReleaseNotice:
    """Notification from a reader that it is done with a request's KV blocks.

    ``ok`` is False when the reader gave up. The owner releases the lease in
    both cases.
    """

    request_id: str
    ok: bool

    def encode(self) -> bytes:
        """Encode this notice as a msgpack map."""
        return msgpack.packb({"request_id": self.request_id, "ok": self.ok}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> ReleaseNotice:
        """Decode a notice produced by ``encode``.

        Raises ValueError if ``data`` is not a msgpack map with a str
        ``request_id`` and a bool ``ok``.
        """
        try:
            message = msgpack.unpackb(data, raw=False)
        except (msgpack.UnpackException, ValueError) as exc:
            raise ValueError(f"invalid release notice: not msgpack ({exc})") from exc

        if (
            not isinstance(message, dict)
            or not isinstance(message.get("request_id"), str)
            or not isinstance(message.get("ok"), bool)
        ):
            raise ValueError(
                f"invalid release notice {message!r}: expected {{'request_id': str, 'ok': bool}}"
            )
        return cls(request_id=message["request_id"], ok=message["ok"])
