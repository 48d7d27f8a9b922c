"""Helpers of the fast Pull listener's tests (``tests/test_pull_server_*.py``).

Leases pinned and released through a node's main port, a pull of every row, the
check that a node still serves byte-exact pulls and holds no pins, client
SETTINGS that park the server or never do, and :func:`no_bugs_fixture`, which
fails a test whose pull connection died of an unexpected exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from kvpeer.client.peer import PeerClient
from kvpeer.transport import frames as h2
from kvpeer.v1 import peer_pb2, peer_pb2_grpc
from tests.support.h2server import settings
from tests.support.peer import FINGERPRINT, Node, targets_for, wait_until
from tests.support.pull import sentinel_buffer

TIMEOUT = 10.0
#: A client stream window small enough that the server parks between frames waiting for it.
SMALL_WINDOW = settings(s4=64 << 10)
#: A window the server never exhausts: it sends until the socket is full.
HUGE_WINDOW = settings(s4=h2.MAX_WINDOW)


def lease(node: Node, keys: list[bytes] | None = None) -> str:
    """Pin ``keys`` (default: all) through the main port; the lease id."""
    with grpc.insecure_channel(node.endpoint) as channel:
        answer = peer_pb2_grpc.KVPeerStub(channel).Lookup(
            peer_pb2.LookupRequest(
                fingerprint=FINGERPRINT.digest, keys=keys or node.keys, hold=True
            ),
            timeout=TIMEOUT,
        )
    return answer.lease_id


def release(node: Node, lease_id: str) -> None:
    with grpc.insecure_channel(node.endpoint) as channel:
        peer_pb2_grpc.KVPeerStub(channel).Release(
            peer_pb2.ReleaseRequest(lease_id=lease_id), timeout=TIMEOUT
        )


def pull_all(client: PeerClient, node: Node, *, streams: int = 1):
    answer = client.lookup(node.keys)
    dest = sentinel_buffer(len(node.keys), node.rows.shape[1])
    result = client.pull(answer.lease_id, targets_for(node.keys, dest), streams=streams)
    client.release(answer.lease_id)
    return result, dest


def assert_serves(node: Node, make_client) -> None:
    """The node still serves a byte-exact pull through its pull port and holds no pins after."""
    calls = node.server.stats()["pull_port_calls"]
    client = make_client(node.endpoint, chunk_bytes=node.rows.shape[1])
    result, dest = pull_all(client, node, streams=2)
    assert result.complete, result.error
    assert np.array_equal(dest, node.rows)
    assert node.server.stats()["pull_port_calls"] == calls + 2
    wait_until(lambda: node.source.total_pins() == 0, "every pin released")


@pytest.fixture(name="no_bugs")
def no_bugs_fixture(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if a pull connection died of an unexpected exception (a bug)."""
    with caplog.at_level(logging.ERROR, logger="kvpeer.transport.pull_server"):
        yield
    assert not caplog.records, [r.getMessage() for r in caplog.records]
