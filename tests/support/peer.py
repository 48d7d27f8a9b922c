"""Shared pieces of the peer server/client tests: fingerprints, servers, clients, polling.

Import the fixtures explicitly into a test module:

    from tests.support.peer import make_client_fixture, node_fixture  # noqa: F401

The fixture ``node`` is an in-process :class:`PeerServer` over an :class:`ArrayChunkSource`
of synthetic rows (:mod:`kvpeer.bench.rows`); ``make_client`` builds
:class:`PeerClient` objects closed at teardown.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.security import Security
from kvpeer.bench.rows import synthetic_rows, synthetic_source
from kvpeer.client.peer import PeerClient, PullTarget
from kvpeer.server.peer.array_source import ArrayChunkSource
from kvpeer.server.peer.service import PeerServer
from tests.support.chunk_node import DEFAULT_INGREDIENTS

#: The fingerprint of every test node (and of :class:`tests.support.chunk_node.ChunkNode`).
FINGERPRINT = Fingerprint(DEFAULT_INGREDIENTS)
#: Small rows keep tests fast; big enough to span many HTTP/2 frames.
CHUNK_BYTES = 64 << 10
NUM_CHUNKS = 16
SEED = 11


@dataclass
class Node:
    """A started in-process peer server and what it serves."""

    server: PeerServer
    source: ArrayChunkSource
    keys: list[bytes]
    rows: np.ndarray

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextlib.contextmanager
def serve_rows(
    num_chunks: int = NUM_CHUNKS,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    seed: int = SEED,
    fingerprint: Fingerprint = FINGERPRINT,
    security: Security | None = None,
    **server_args,
) -> Iterator[Node]:
    """A peer server over ``num_chunks`` synthetic rows; stopped (grace 0) on exit."""
    source, keys = synthetic_source(num_chunks, chunk_bytes, seed)
    server = PeerServer(
        source, node_id="test-node", fingerprint=fingerprint, security=security, **server_args
    ).start()
    try:
        yield Node(server, source, keys, synthetic_rows(num_chunks, chunk_bytes, seed))
    finally:
        server.stop(grace=0)


@pytest.fixture(name="node")
def node_fixture() -> Iterator[Node]:
    with serve_rows() as started:
        yield started


@pytest.fixture(name="make_client")
def make_client_fixture() -> Iterator[Callable[..., PeerClient]]:
    """``make_client(endpoint, **overrides)``: a PeerClient closed at teardown."""
    clients: list[PeerClient] = []

    def make(endpoint: str, **overrides) -> PeerClient:
        args = {
            "node_id": "test-client",
            "fingerprint": FINGERPRINT,
            "chunk_bytes": CHUNK_BYTES,
            "rpc_timeout_s": 10.0,
        }
        client = PeerClient(endpoint, **(args | overrides))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def targets_for(
    keys: Sequence[bytes], dest: np.ndarray, indices: Sequence[int] | None = None
) -> list[PullTarget]:
    """Pull targets that put row ``i`` of a lease into ``dest[i]``."""
    flat = memoryview(dest).cast("B")
    size = dest.shape[1]
    chosen = range(len(keys)) if indices is None else indices
    return [PullTarget(i, keys[i], flat[i * size : (i + 1) * size]) for i in chosen]


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
