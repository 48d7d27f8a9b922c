"""Faults during a same-host copy: the holder dies, resets, loses or shrinks its region mid-copy.

The holder is a real process over a real ``/dev/shm`` file
(:mod:`tests.support.shm_node`) that misbehaves right after answering a MapRows,
while the consumer copies. Every case must end as a failed pull or a network
fallback — never a wrong byte, never a hang — and the consumer's result says why.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PeerClient
from kvpeer.v1 import peer_pb2
from tests.support.peer import FINGERPRINT, targets_for
from tests.support.pull import sentinel_buffer
from tests.support.shm_node import ShmNode

pytestmark = pytest.mark.slow

#: 6 MapRows batches of 16 rows; the pulled rows are the first half of the file.
ROWS, PULLED, SIZE, SEED = 192, 96, 512 << 10, 9


def pull_during(fault: str, *, after: int = 2, delay: float = 0.0005):
    """Pull the first :data:`PULLED` rows while the holder commits ``fault``."""
    args = [f"--fault={fault}", f"--after={after}", f"--delay={delay}"]
    with ShmNode(num_chunks=ROWS, chunk_bytes=SIZE, seed=SEED, extra_args=args) as node:
        client = PeerClient(
            node.endpoint,
            node_id="consumer",
            fingerprint=FINGERPRINT,
            chunk_bytes=SIZE,
            rpc_timeout_s=3.0,
        )
        with client:
            keys = synthetic_keys(ROWS, SEED)[:PULLED]
            answer = client.lookup(keys)
            dest = sentinel_buffer(PULLED, SIZE)
            started = time.monotonic()
            result = client.pull(answer.lease_id, targets_for(keys, dest), streams=1, timeout_s=20)
            elapsed = time.monotonic() - started
            client.release(answer.lease_id)
    assert elapsed < 15, f"the pull took {elapsed:.1f}s: it must fail fast, not hang"
    expected = synthetic_rows(ROWS, SIZE, SEED)[:PULLED]
    for i, loaded in enumerate(result.loaded):
        if loaded:
            assert np.array_equal(dest[i], expected[i]), f"row {i} loaded with wrong bytes"
    return result, dest, expected


def test_holder_sigkilled_mid_copy_fails_the_pull_and_keeps_no_row():
    result, _, _ = pull_during("kill")
    assert not any(result.loaded), "rows copied under a lease nobody can confirm are dropped"
    assert result.error and result.same_host_rows == 0


def settled_before_or_failed(result) -> None:
    """A fault the copy outran leaves a complete, verified pull; else nothing is kept."""
    if result.complete:
        return
    assert not any(result.loaded), "rows copied under a lease that ended are dropped"
    assert result.error


def test_holder_reset_mid_copy_fails_the_pull_and_keeps_no_row():
    result, _, _ = pull_during("reset", delay=0.0)
    settled_before_or_failed(result)
    if result.complete:
        return
    # Whichever comes first: the overwritten row fails its digest, or the revoked
    # lease fails the next MapRows or the CheckLease after the copy.
    assert result.error
    assert any(
        w in result.error
        for w in ("digest mismatch", "revoked", "NOT_FOUND", "took its chunks back")
    ), result.error


def test_region_replaced_mid_copy_falls_back_to_the_network():
    result, dest, expected = pull_during("replace")
    assert result.complete, result.error
    assert result.fallback in ("holder_refused", "identity_changed")
    assert 0 < result.same_host_rows < PULLED, "part copied, the rest pulled over the network"
    assert np.array_equal(dest, expected)


def test_region_truncated_mid_copy_falls_back_to_the_network():
    result, dest, expected = pull_during("truncate-tail")
    assert result.complete, result.error
    assert result.fallback in ("holder_refused", "region_truncated")
    assert np.array_equal(dest, expected)


def test_truncated_before_the_handshake_means_no_fast_path():
    result, dest, expected = pull_during("truncate-tail", after=1, delay=0.0)
    assert result.complete and np.array_equal(dest, expected)


def test_a_lease_a_consumer_abandons_expires():
    """A consumer that dies between MapRows and Release leaves a lease that expires."""
    args = ["--lease-ttl=1"]
    with ShmNode(num_chunks=8, chunk_bytes=SIZE, seed=SEED, extra_args=args) as node:
        keys = synthetic_keys(8, SEED)
        with PeerClient(
            node.endpoint, node_id="doomed", fingerprint=FINGERPRINT, chunk_bytes=SIZE
        ) as doomed:
            lease = doomed.lookup(keys).lease_id
        channel = grpc.insecure_channel(node.endpoint)
        try:
            map_rows = channel.unary_unary(
                "/kvpeer.v1.KVPeer/MapRows",
                request_serializer=peer_pb2.MapRowsRequest.SerializeToString,
                response_deserializer=peer_pb2.MapRowsResponse.FromString,
            )
            check = channel.unary_unary(
                "/kvpeer.v1.KVPeer/CheckLease",
                request_serializer=peer_pb2.CheckLeaseRequest.SerializeToString,
                response_deserializer=peer_pb2.CheckLeaseResponse.FromString,
            )
            assert len(map_rows(peer_pb2.MapRowsRequest(lease_id=lease), timeout=5).rows) == 8
            check(peer_pb2.CheckLeaseRequest(lease_id=lease), timeout=5)
            time.sleep(1.5)
            with pytest.raises(grpc.RpcError) as gone:
                check(peer_pb2.CheckLeaseRequest(lease_id=lease), timeout=5)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as unmapped:
                map_rows(peer_pb2.MapRowsRequest(lease_id=lease), timeout=5)
            assert unmapped.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            channel.close()
