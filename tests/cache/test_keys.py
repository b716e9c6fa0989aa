"""Prefix hashes of prompt chunks and the namespace that seeds them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from disagg.cache.keys import CHUNK_LAYOUT_VERSION, CacheNamespace, chunk_keys, chunk_layout_name, key_hex
from disagg.kv.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


def make_namespace(**overrides) -> CacheNamespace:
    namespace = CacheNamespace.for_model("tiny", "sha256:abc", LAYOUT, chunk_tokens=4)
    return dataclasses.replace(namespace, **overrides)


def test_digest_is_sha256_of_fields() -> None:
    digest = make_namespace().digest()

    assert len(digest) == 32
    assert digest == make_namespace().digest()
    assert digest != make_namespace(salt="tenant-a").digest()


def test_first_key_chains_namespace_digest() -> None:
    namespace = make_namespace()
    tokens = [1, 2, 3, 70000, 5, 6, 7, 8]

    keys = chunk_keys(tokens, namespace)

    first = hashlib.sha256(namespace.digest() + np.asarray(tokens[:4], "<u4").tobytes()).digest()
    second = hashlib.sha256(first + np.asarray(tokens[4:], "<u4").tobytes()).digest()
    assert keys == [first, second]


@pytest.mark.parametrize("num_tokens,num_keys", [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2), (13, 3)])
def test_partial_chunk_gets_no_key(num_tokens: int, num_keys: int) -> None:
    keys = chunk_keys(list(range(num_tokens)), make_namespace())

    assert len(keys) == num_keys
    assert all(len(key) == 32 for key in keys)


def test_keys_equal_in_subprocess() -> None:
    tokens = list(range(1000, 1037))
    script = (
        "from disagg.cache.keys import CacheNamespace, chunk_keys, key_hex\n"
        "from disagg.kv.layout import KVLayout\n"
        "layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype='float32')\n"
        "namespace = CacheNamespace.for_model('tiny', 'sha256:abc', layout, chunk_tokens=4, salt='s')\n"
        f"print(' '.join(key_hex(key) for key in chunk_keys({tokens}, namespace)))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")

    output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)

    local = chunk_keys(tokens, make_namespace(salt="s"))
    assert output.stdout.split() == [key_hex(key) for key in local]


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_name", "other-model"),
        ("weights_digest", "sha256:def"),
        ("kv_dtype", "bfloat16"),
        ("kv_layout", CHUNK_LAYOUT_VERSION + ":3x2x2xTx4"),
        ("chunk_tokens", 2),
        ("salt", "tenant-a"),
    ],
)
def test_namespace_change_gives_disjoint_keys(field: str, value) -> None:
    tokens = list(range(16))

    base = set(chunk_keys(tokens, make_namespace()))
    changed = set(chunk_keys(tokens, make_namespace(**{field: value})))

    assert base
    assert changed
    assert base.isdisjoint(changed)


def test_different_salts_give_disjoint_keys() -> None:
    tokens = list(range(16))

    first = chunk_keys(tokens, make_namespace(salt="a"))
    second = chunk_keys(tokens, make_namespace(salt="b"))

    assert set(first).isdisjoint(second)


def test_prefix_keys_are_leading_keys() -> None:
    namespace = make_namespace()
    long_prompt = list(range(50, 90))

    long_keys = chunk_keys(long_prompt, namespace)

    for length in range(len(long_prompt) + 1):
        prefix_keys = chunk_keys(long_prompt[:length], namespace)
        assert prefix_keys == long_keys[: length // 4]


def test_changed_chunk_changes_later_keys() -> None:
    namespace = make_namespace()
    tokens = list(range(16))
    changed = list(tokens)
    changed[5] = 999  # inside chunk 1

    before = chunk_keys(tokens, namespace)
    after = chunk_keys(changed, namespace)

    assert after[0] == before[0]
    assert all(after[index] != before[index] for index in range(1, 4))


def test_numpy_and_list_tokens_agree() -> None:
    tokens = list(range(12))

    assert chunk_keys(np.asarray(tokens, dtype=np.int32), make_namespace()) == chunk_keys(tokens, make_namespace())


@pytest.mark.parametrize("bad_token", [-1, 2**32])
def test_out_of_range_token_raises(bad_token: int) -> None:
    with pytest.raises(ValueError, match=str(bad_token)):
        chunk_keys([0, 1, bad_token, 3], make_namespace())


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"chunk_tokens": 0}, "chunk_tokens=0"),
        ({"kv_dtype": "int8"}, "int8"),
        ({"model_name": ""}, "model_name"),
    ],
)
def test_invalid_namespace_raises(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_namespace(**overrides)


def test_key_hex_and_layout_name() -> None:
    key = chunk_keys(list(range(4)), make_namespace())[0]

    assert key_hex(key) == key.hex()
    assert len(key_hex(key)) == 64
    assert chunk_layout_name(LAYOUT) == f"{CHUNK_LAYOUT_VERSION}:2x2x2xTx4"
    assert make_namespace().kv_layout == chunk_layout_name(LAYOUT)
