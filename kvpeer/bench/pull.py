"""kvpeer's side of the pull benchmark: a peer server process and timed pulls.

:class:`PeerNodeProcess` runs a :class:`~kvpeer.server.peer.service.PeerServer`
over an :class:`~kvpeer.server.peer.array_source.ArrayChunkSource` full of synthetic
rows in its own process (with its fast Pull port). :func:`timed_pull` looks the
keys up, pulls every row into a preallocated buffer (digests verified by the
client) and releases the lease, as the vLLM tier does for one load job, through
whichever path the client was made for (:data:`PULL_PATHS`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.errors import KVPeerError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.bench.process import ServerProcess, report_port
from kvpeer.bench.rows import synthetic_source
from kvpeer.client.peer import PeerClient, PullTarget
from kvpeer.server.peer.service import PeerServer

#: The ways a client can pull, by benchmark name: the keywords of its PeerClient.
PULL_PATHS: dict[str, dict[str, Any]] = {
    # kvpeer.transport.pull_client from the server's pull port: zero-copy sends, zero-copy receives.
    "h2": {"pull_transport": "h2"},
    # kvpeer.transport.pull_client from grpcio's port: the server copies each row twice.
    "h2-main": {"pull_transport": "h2", "use_pull_port": False},
    # grpcio on both ends.
    "grpc": {"pull_transport": "grpc"},
}


def bench_fingerprint(chunk_bytes: int) -> Fingerprint:
    """The fingerprint both sides of a benchmark use."""
    return Fingerprint.of(
        model="kvpeer-bench", chunk_bytes=chunk_bytes, protocol_version=PROTOCOL_VERSION
    )


def _serve(conn: Connection, num_chunks: int, chunk_bytes: int, seed: int, workers: int) -> None:
    """Server process: serve the synthetic rows until terminated."""
    source, _ = synthetic_source(num_chunks, chunk_bytes, seed)
    server = PeerServer(
        source,
        node_id="bench-server",
        fingerprint=bench_fingerprint(chunk_bytes),
        max_workers=workers,
    ).start()
    report_port(conn, server.port)
    server.wait()


class PeerNodeProcess(ServerProcess):
    """A peer server process over ``num_chunks`` synthetic rows fixed by ``seed``."""

    def __init__(self, num_chunks: int, chunk_bytes: int, seed: int, *, workers: int = 16) -> None:
        super().__init__(_serve, num_chunks, chunk_bytes, seed, workers)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


def timed_pull(
    client: PeerClient, keys: Sequence[bytes], dest: np.ndarray, *, streams: int
) -> float:
    """Lookup + pull of every key into the rows of ``dest`` + release; return seconds.

    Raises:
        KVPeerError: a key missed or a row did not arrive verified.
    """
    flat = memoryview(dest).cast("B")
    chunk_bytes = dest.shape[1]
    started = time.perf_counter()
    answer = client.lookup(keys, hold=True)
    if not all(answer.hits):
        raise KVPeerError(f"{answer.hits.count(False)} of {len(keys)} keys missed")
    targets = [
        PullTarget(i, key, flat[i * chunk_bytes : (i + 1) * chunk_bytes])
        for i, key in enumerate(keys)
    ]
    result = client.pull(answer.lease_id, targets, streams=streams)
    client.release(answer.lease_id)
    seconds = time.perf_counter() - started
    if not result.complete:
        raise KVPeerError(f"pull incomplete: {result.error}")
    return seconds
