"""Prefix hashes that name the KV chunks of a prompt in the CPU cache.

A prompt is cut into chunks of ``chunk_tokens`` tokens. Chunk ``i`` is named
by a prefix hash that covers every token up to the end of that chunk, so two
prompts share a key exactly when they share the whole prefix::

    tokens   | chunk 0        | chunk 1        | chunk 2  (partial: no key)
    key      k0 = H(ns | c0)  k1 = H(k0 | c1)
             ns = CacheNamespace.digest(), H = sha256, c_i = chunk i as <u4 bytes

Keys are raw 32-byte sha256 digests. They depend only on the namespace and
the token ids, so they are equal in every process and across restarts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from disagg.kv.layout import KVLayout, torch_dtype

# Version of the byte order a pool chunk stores (see ``disagg.cache.slots``).
# Changing the chunk layout must change this string, so that old keys miss.
CHUNK_LAYOUT_VERSION = "cache-chunk/layer-kv-head-token-dim/v1"

# Version of the namespace encoding below, part of every digest.
_NAMESPACE_FORMAT = "disagg-cache-namespace/v1"

KEY_BYTES = 32
_MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True)
class CacheNamespace:
    """Everything besides token ids that decides whether cached KV may be reused.

    ``kv_layout`` names the byte layout of a chunk, normally built by
    ``chunk_layout_name``. ``salt`` isolates tenants that must not share KV.
    """

    model_name: str
    weights_digest: str
    kv_dtype: str
    kv_layout: str
    chunk_tokens: int
    salt: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} is invalid: use a positive token count.")
        torch_dtype(self.kv_dtype)  # raises ValueError for an unknown dtype
        for name in ("model_name", "weights_digest", "kv_layout"):
            if not getattr(self, name):
                raise ValueError(f"CacheNamespace.{name} is empty: set it so unrelated caches cannot collide.")

    @classmethod
    def for_model(
        cls,
        model_name: str,
        weights_digest: str,
        layout: KVLayout,
        chunk_tokens: int,
        salt: str | None = None,
    ) -> CacheNamespace:
        """Build the namespace of a model's KV chunks. Raises ValueError for invalid fields."""
        return cls(
            model_name=model_name,
            weights_digest=weights_digest,
            kv_dtype=layout.dtype,
            kv_layout=chunk_layout_name(layout),
            chunk_tokens=chunk_tokens,
            salt=salt,
        )

    def digest(self) -> bytes:
        """Return the 32-byte sha256 of a canonical msgpack encoding of the fields.

        The encoding is a list of ``(field, value)`` pairs in a fixed order,
        so the digest is stable across processes, restarts and dict orders.
        """
        fields = [
            ["format", _NAMESPACE_FORMAT],
            ["model_name", self.model_name],
            ["weights_digest", self.weights_digest],
            ["kv_dtype", self.kv_dtype],
            ["kv_layout", self.kv_layout],
            ["chunk_tokens", self.chunk_tokens],
            ["salt", self.salt],
        ]
        return hashlib.sha256(msgpack.packb(fields, use_bin_type=True)).digest()

    def same_except_salt(self, other: CacheNamespace) -> bool:
        """Return whether ``other`` differs from this namespace at most in ``salt``."""
        return (
            self.model_name == other.model_name
            and self.weights_digest == other.weights_digest
            and self.kv_dtype == other.kv_dtype
            and self.kv_layout == other.kv_layout
            and self.chunk_tokens == other.chunk_tokens
        )


def chunk_layout_name(layout: KVLayout) -> str:
    """Return the ``kv_layout`` string of pool chunks for ``layout``: version plus shape."""
    return f"{CHUNK_LAYOUT_VERSION}:{layout.num_layers}x2x{layout.num_kv_heads}xTx{layout.head_dim}"


def chunk_keys(token_ids: Sequence[int], namespace: CacheNamespace) -> list[bytes]:
    """Return the prefix hash of every full chunk of ``token_ids``, in order.

    A trailing partial chunk gets no key. Raises ValueError if a token id is
    outside ``[0, 2**32)``.
    """
    chunk_tokens = namespace.chunk_tokens
    num_chunks = len(token_ids) // chunk_tokens
    if num_chunks == 0:
        return []

    ids = np.asarray(token_ids[: num_chunks * chunk_tokens], dtype=np.int64)
    if ids.min() < 0 or ids.max() > _MAX_TOKEN_ID:
        bad = int(ids[(ids < 0) | (ids > _MAX_TOKEN_ID)][0])
        raise ValueError(f"token id {bad} is outside [0, 2**32): chunk keys hash ids as uint32.")
    data = ids.astype("<u4").tobytes()

    keys = []
    previous = namespace.digest()
    stride = chunk_tokens * 4
    for index in range(num_chunks):
        previous = hashlib.sha256(previous + data[index * stride : (index + 1) * stride]).digest()
        keys.append(previous)
    return keys


def key_hex(key: bytes) -> str:
    """Return ``key`` as 64 lowercase hex digits, the form used in logs and file names."""
    return key.hex()


def check_key(key: object, name: str = "key") -> bytes:
    """Return ``key`` if it is a 32-byte ``bytes``, and raise ValueError otherwise."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        received = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"{name} must be a {KEY_BYTES}-byte prefix hash from chunk_keys(), got {received}.")
    return key
