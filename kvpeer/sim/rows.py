"""Deterministic chunk contents, so any process can check loaded bytes without copies.

A simulated node "computes" the KV of a chunk as a pseudo-random row derived from
the chunk's key; a node that loads the chunk from a peer recomputes the expected
row from the key and compares. Two different keys never share a row, so a chunk
delivered under the wrong key, a torn row or a stale row all show as wrong bytes.
"""

from __future__ import annotations

import blake3


def keyed_row(key: bytes, chunk_bytes: int, salt: bytes = b"") -> bytes:
    """The row a node computes for ``key`` (BLAKE3 output stream of ``salt + key``)."""
    return blake3.blake3(salt + key).digest(length=chunk_bytes)


def chunk_keys(prompt: str, count: int, *, group: int = 0) -> list[bytes]:
    """``count`` vLLM-style OffloadKeys (32-byte chained hash + 4-byte group) for a prompt.

    Like vLLM's block hashes they chain, so two prompts share exactly the keys of
    their shared prefix when their names share a ``/``-separated prefix:
    ``chunk_keys("sys/a", n)`` and ``chunk_keys("sys/b", n)`` differ from chunk 0, while
    the first chunks of ``"sys"`` are the first chunks of neither. Use
    :func:`prefix_keys` for explicitly shared prefixes.
    """
    return prefix_keys([(prompt, count)], group=group)


def prefix_keys(segments: list[tuple[str, int]], *, group: int = 0) -> list[bytes]:
    """Keys of a prompt made of named segments, each ``(name, chunks)``, chained in order.

    Prompts that start with the same segments share those segments' keys, exactly as
    two vLLM requests with a common token prefix share block hashes.
    """
    keys: list[bytes] = []
    parent = b"kvpeer-sim-root"
    for name, count in segments:
        for i in range(count):
            parent = blake3.blake3(parent + f"{name}:{i}".encode()).digest()
            keys.append(parent + group.to_bytes(4, "big"))
    return keys
