"""Deterministic synthetic chunk rows and keys, the same in every process of a benchmark.

A benchmark's sender and receiver run in different processes; both derive the
rows from a seed instead of shipping them, and the receiver compares what arrived
with its own copy.
"""

from __future__ import annotations

import numpy as np

from kvpeer.server.peer.array_source import ArrayChunkSource

#: Bytes of a synthetic key (the size of a vLLM OffloadKey with a 4-byte group index).
KEY_BYTES = 36


def synthetic_rows(num_chunks: int, chunk_bytes: int, seed: int) -> np.ndarray:
    """A ``(num_chunks, chunk_bytes)`` uint8 array of random bytes fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.frombuffer(rng.bytes(num_chunks * chunk_bytes), dtype=np.uint8).reshape(
        num_chunks, chunk_bytes
    )


def synthetic_keys(num_chunks: int, seed: int) -> list[bytes]:
    """``num_chunks`` distinct keys of :data:`KEY_BYTES` bytes fixed by ``seed``."""
    return [
        seed.to_bytes(8, "big") + i.to_bytes(8, "big") + bytes(KEY_BYTES - 16)
        for i in range(num_chunks)
    ]


def synthetic_source(
    num_chunks: int, chunk_bytes: int, seed: int
) -> tuple[ArrayChunkSource, list[bytes]]:
    """An :class:`ArrayChunkSource` holding every synthetic row under its key."""
    rows = synthetic_rows(num_chunks, chunk_bytes, seed)
    keys = synthetic_keys(num_chunks, seed)
    source = ArrayChunkSource(num_chunks, chunk_bytes)
    for i, key in enumerate(keys):
        source.put_row(i, key, rows[i])
    return source, keys
