"""Handshake, release notice and compatibility hash encoding."""

from __future__ import annotations

import dataclasses
import pickle

import msgpack
import pytest

from disagg.transfer.protocol import (
    PROTOCOL_VERSION,
    Handshake,
    IncompatiblePeerError,
    ReleaseNotice,
    check_compatible,
    compat_hash,
)

LAYOUT = {
    "model": "SmolLM2-135M-Instruct",
    "weights_sha256": "b179c952",
    "dtype": "float32",
    "num_layers": 30,
    "num_kv_heads": 3,
    "head_dim": 64,
    "block_layout": "layer,kv,head,token,dim",
}


def make_handshake(name: str = "prefill-0", layout: dict | None = None, **overrides) -> Handshake:
    layout = dict(LAYOUT if layout is None else layout)
    fields = {
        "protocol_version": PROTOCOL_VERSION,
        "agent_name": name,
        "compat_hash": compat_hash(layout),
        "nixl_metadata": b"\x00\x01binary\xff",
        "kv_layout": layout,
        "worker": f"{name} on node-a",
    }
    fields.update(overrides)
    return Handshake(**fields)


def test_handshake_round_trip() -> None:
    handshake = make_handshake()

    decoded = Handshake.decode(handshake.encode())

    assert decoded == handshake
    assert isinstance(decoded.nixl_metadata, bytes)


def test_handshake_is_msgpack_not_pickle() -> None:
    data = make_handshake().encode()

    message = msgpack.unpackb(data, raw=False)

    assert message["agent_name"] == "prefill-0"
    assert not data.startswith(b"\x80")  # every pickle protocol >= 2 starts with PROTO


def test_handshake_decode_ignores_unknown_fields() -> None:
    message = msgpack.unpackb(make_handshake().encode(), raw=False)
    message["added_in_a_later_version"] = 1

    decoded = Handshake.decode(msgpack.packb(message, use_bin_type=True))

    assert decoded == make_handshake()


def test_handshake_decode_missing_field_raises() -> None:
    message = msgpack.unpackb(make_handshake().encode(), raw=False)
    del message["compat_hash"]

    with pytest.raises(ValueError, match="compat_hash"):
        Handshake.decode(msgpack.packb(message, use_bin_type=True))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb([1, 2, 3]),
        pickle.dumps({"agent_name": "x"}),
    ],
)
def test_handshake_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid handshake"):
        Handshake.decode(data)


def test_compatible_handshakes_pass() -> None:
    check_compatible(make_handshake("prefill-0"), make_handshake("decode-0"))


def test_compat_hash_mismatch_names_both_sides() -> None:
    remote_layout = dict(LAYOUT, dtype="bfloat16", num_layers=24)
    local = make_handshake("prefill-0")
    remote = make_handshake("decode-0", remote_layout)

    with pytest.raises(IncompatiblePeerError) as excinfo:
        check_compatible(local, remote)

    message = str(excinfo.value)
    assert "'prefill-0'" in message
    assert "'decode-0'" in message
    assert "compat hash" in message
    assert "['dtype', 'num_layers']" in message
    assert "'bfloat16'" in message
    assert "'float32'" in message
    assert "protocol version" not in message


def test_protocol_version_mismatch() -> None:
    local = make_handshake("prefill-0")
    remote = make_handshake("decode-0", protocol_version=PROTOCOL_VERSION + 1)

    with pytest.raises(IncompatiblePeerError) as excinfo:
        check_compatible(local, remote)

    message = str(excinfo.value)
    assert f"protocol version {PROTOCOL_VERSION} (local) != {PROTOCOL_VERSION + 1} (remote)" in message
    assert "'prefill-0'" in message
    assert "'decode-0'" in message
    assert "compat hash" not in message


def test_both_mismatches_reported() -> None:
    local = make_handshake("prefill-0")
    remote = make_handshake("decode-0", dict(LAYOUT, head_dim=128), protocol_version=99)

    with pytest.raises(IncompatiblePeerError) as excinfo:
        check_compatible(local, remote)

    message = str(excinfo.value)
    assert "protocol version" in message
    assert "compat hash" in message
    assert "['head_dim']" in message


def test_same_agent_name_rejected() -> None:
    with pytest.raises(IncompatiblePeerError, match="unique agent name"):
        check_compatible(make_handshake("worker-0"), make_handshake("worker-0"))


def test_incompatible_peer_error_is_value_error() -> None:
    assert issubclass(IncompatiblePeerError, ValueError)


def test_compat_hash_ignores_key_order() -> None:
    reordered = dict(reversed(list(LAYOUT.items())))

    assert compat_hash(reordered) == compat_hash(LAYOUT)


def test_compat_hash_ignores_nested_key_order() -> None:
    first = {"model": "m", "rope": {"theta": 10000.0, "scaling": None}}
    second = {"rope": {"scaling": None, "theta": 10000.0}, "model": "m"}

    assert compat_hash(first) == compat_hash(second)


@pytest.mark.parametrize(
    "key,value",
    [("dtype", "bfloat16"), ("num_layers", 31), ("num_kv_heads", 2), ("head_dim", 32), ("block_layout", "x")],
)
def test_compat_hash_changes_with_each_field(key: str, value: object) -> None:
    assert compat_hash(dict(LAYOUT, **{key: value})) != compat_hash(LAYOUT)


def test_compat_hash_is_sha256_hex() -> None:
    digest = compat_hash(LAYOUT)

    assert len(digest) == 64
    assert int(digest, 16) >= 0


def test_compat_hash_stable_value() -> None:
    # Pinned so that a change of the canonical encoding, which would make old
    # and new workers reject each other, fails here first. The digest is
    # sha256(msgpack.packb([["a", 1], ["b", [1, 2]]], use_bin_type=True)).
    expected = "2c948a762f71bf5fbcfa7617f08d5f165e182b0edd08b346cece4118f4905bda"

    assert compat_hash({"a": 1, "b": [1, 2]}) == expected
    assert compat_hash({"b": (1, 2), "a": 1}) == expected


def test_compat_hash_rejects_non_str_keys() -> None:
    with pytest.raises(TypeError, match="must be str"):
        compat_hash({1: "x"})


def test_compat_hash_does_not_mutate() -> None:
    fields = {"b": {"y": 1, "x": 2}, "a": (1, 2)}
    snapshot = {"b": {"y": 1, "x": 2}, "a": (1, 2)}

    compat_hash(fields)

    assert fields == snapshot
    assert list(fields) == ["b", "a"]


@pytest.mark.parametrize("ok", [True, False])
def test_release_notice_round_trip(ok: bool) -> None:
    notice = ReleaseNotice(request_id="req-42", ok=ok)

    decoded = ReleaseNotice.decode(notice.encode())

    assert decoded == notice
    assert msgpack.unpackb(notice.encode(), raw=False) == {"request_id": "req-42", "ok": ok}


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        msgpack.packb({"request_id": 5, "ok": True}),
        msgpack.packb({"request_id": "r", "ok": 1}),
        msgpack.packb({"request_id": "r"}),
        msgpack.packb("req-1"),
    ],
)
def test_release_notice_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid release notice"):
        ReleaseNotice.decode(data)


def test_handshake_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_handshake().agent_name = "other"  # type: ignore[misc]
