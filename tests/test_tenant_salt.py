"""Tenant isolation through ``cache_salt``: a request never loads rows stored under another salt.

Keys are computed with vLLM's own hashing (``hash_block_tokens`` with the salt in
the first block's ``extra_keys``, as vLLM's request block hasher does, chained over
the prompt's blocks), then stored on one real tier node and requested from another
through the directory (:mod:`tests.support.cluster`: vLLM's real offloading manager
with ``kvpeer.tier``). Same tokens, other salt: no key matches, nothing is loaded.
"""

from __future__ import annotations

import pytest
from vllm.utils.hashing import sha256_cbor
from vllm.v1.core.kv_cache_utils import (
    hash_block_tokens,
    init_none_hash,
    make_block_hash_with_group_id,
)

from tests.support.cluster import hexkeys, idle, joined, published, wait_for

pytestmark = pytest.mark.slow

BLOCK_TOKENS = 16


def salted_keys(tokens: list[int], cache_salt: str | None) -> list[bytes]:
    """vLLM's chained block hashes (+ group 0) of ``tokens``; the salt goes in block 0 only."""
    init_none_hash(sha256_cbor)
    keys, parent = [], None
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        extra = (cache_salt,) if start == 0 and cache_salt is not None else None
        parent = hash_block_tokens(sha256_cbor, parent, tokens[start : start + BLOCK_TOKENS], extra)
        keys.append(bytes(make_block_hash_with_group_id(parent, 0)))
    return keys


def test_salted_keys_differ_for_every_block() -> None:
    tokens = list(range(1000, 1000 + 6 * BLOCK_TOKENS))
    a, b, none = (
        salted_keys(tokens, "tenant-a"),
        salted_keys(tokens, "tenant-b"),
        salted_keys(tokens, None),
    )
    assert len(a) == 6
    assert not set(a) & set(b) and not set(a) & set(none)
    assert a == salted_keys(tokens, "tenant-a")  # deterministic: the same tenant shares


def test_a_request_never_loads_rows_of_another_salt(cluster) -> None:
    directory = cluster.directory()
    tier = {"directory": directory.endpoint}
    a, b = (cluster.node(n, start=False, tier=tier) for n in "ab")
    cluster.start(a, b)
    tokens = list(range(7, 7 + 8 * BLOCK_TOKENS))
    tenant_a, tenant_b = salted_keys(tokens, "tenant-a"), salted_keys(tokens, "tenant-b")
    assert a.call("store", keys=hexkeys(tenant_a)) == 8
    wait_for(lambda: joined(directory, b) and published(directory, a, tenant_a), what="published")

    other = b.call("request", keys=hexkeys(tenant_b))
    assert other["hit_chunks"] == 0 and other["verified_chunks"] == 0
    assert other["wrong_chunks"] == []

    same = b.call("request", keys=hexkeys(tenant_a))
    assert same["hit_chunks"] == 8 and same["verified_chunks"] == 8
    assert same["wrong_chunks"] == []
    wait_for(lambda: idle(a, b), what="pins released on both nodes")
