"""The KVPeer chunk server on loopback: handshake, lookup, pull, release, leases, bad input.

Calls go through the generated stub (so responses are decoded as ordinary
protobuf messages, Chunk included) or through raw byte channels for garbage.
Every refusal is checked for its status, a message naming the field or limit,
and a server that keeps serving afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from kvpeer import PROTOCOL_VERSION
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.wire import digest
from kvpeer.server.peer.array_source import ArrayChunkSource, RowPinnedError, SourceFullError
from kvpeer.server.peer.chunk_source import LookupRefused, PinnedChunks
from kvpeer.server.peer.service import PeerServer
from kvpeer.sim.relay import Faults, Relay
from kvpeer.v1 import peer_pb2, peer_pb2_grpc
from tests.support.peer import (
    CHUNK_BYTES,
    FINGERPRINT,
    Node,
    make_client_fixture,  # noqa: F401 - fixture
    node_fixture,  # noqa: F401 - fixture
    serve_rows,
    targets_for,
    wait_until,
)

TIMEOUT = 10.0


@pytest.fixture
def stub(node: Node) -> Iterator[peer_pb2_grpc.KVPeerStub]:
    with grpc.insecure_channel(node.endpoint) as channel:
        yield peer_pb2_grpc.KVPeerStub(channel)


def handshake_request(**overrides) -> peer_pb2.HandshakeRequest:
    fields = {
        "protocol_version": PROTOCOL_VERSION,
        "node_id": "tester",
        "chunk_bytes": CHUNK_BYTES,
        "fingerprint": FINGERPRINT.to_proto(),
    }
    return peer_pb2.HandshakeRequest(**(fields | overrides))


def lookup(stub, keys, *, hold=True, **fields) -> peer_pb2.LookupResponse:
    request = peer_pb2.LookupRequest(
        fingerprint=FINGERPRINT.digest, keys=keys, hold=hold, node_id="tester", **fields
    )
    return stub.Lookup(request, timeout=TIMEOUT)


def refusal(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=TIMEOUT, **kwargs)
        if not isinstance(result, peer_pb2.LookupResponse | peer_pb2.HandshakeResponse):
            list(result)  # a stream: the status comes with the first read
    return info.value


def assert_still_serving(stub, node: Node) -> None:
    answer = lookup(stub, node.keys[:1], hold=False)
    assert list(answer.hit) == [True]


# -- Handshake -----------------------------------------------------------------


def test_handshake_answers_with_node_id_chunk_size_fingerprint_and_limits(stub, node):
    response = stub.Handshake(handshake_request(), timeout=TIMEOUT)
    assert response.node_id == "test-node"
    assert response.protocol_version == PROTOCOL_VERSION
    assert response.chunk_bytes == CHUNK_BYTES
    assert Fingerprint.from_proto(response.fingerprint) == FINGERPRINT
    assert response.max_keys_per_lookup == node.server.options.max_keys_per_lookup
    assert response.lease_ttl_ms == round(node.server.options.lease_ttl_s * 1000)


def test_handshake_without_fingerprint_is_an_inspection(stub):
    response = stub.Handshake(peer_pb2.HandshakeRequest(), timeout=TIMEOUT)
    assert response.chunk_bytes == CHUNK_BYTES
    assert response.fingerprint.digest == FINGERPRINT.digest


def test_handshake_names_each_ingredient_that_differs(stub, node):
    other = Fingerprint(dict(FINGERPRINT.ingredients) | {"model": "other/model", "dtype": "fp8"})
    error = refusal(stub.Handshake, handshake_request(fingerprint=other.to_proto()))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model differs" in error.details()
    assert "other/model" in error.details()
    assert "dtype differs" in error.details()
    assert_still_serving(stub, node)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("protocol_version", {"protocol_version": PROTOCOL_VERSION + 1}),
        ("chunk_bytes", {"chunk_bytes": CHUNK_BYTES * 2}),
    ],
)
def test_handshake_refuses_other_version_or_chunk_size(stub, field, overrides):
    error = refusal(stub.Handshake, handshake_request(**overrides))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{field} differs" in error.details()


def test_handshake_refuses_a_fingerprint_whose_digest_lies(stub):
    forged = FINGERPRINT.to_proto()
    forged.ingredients["model"] = "something/else"  # digest no longer matches
    error = refusal(stub.Handshake, handshake_request(fingerprint=forged))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fingerprint" in error.details()


# -- Lookup --------------------------------------------------------------------


def test_lookup_without_hold_answers_hits_and_pins_nothing(stub, node):
    answer = lookup(stub, [node.keys[0], b"unknown-key", node.keys[2]], hold=False)
    assert list(answer.hit) == [True, False, True]
    assert answer.lease_id == ""
    assert node.source.total_pins() == 0


def test_lookup_with_hold_pins_hits_until_release(stub, node):
    answer = lookup(stub, [node.keys[0], b"unknown-key", node.keys[1]])
    assert answer.lease_id
    assert node.source.pin_count(node.keys[0]) == 1
    assert node.source.pin_count(node.keys[1]) == 1
    stub.Release(peer_pb2.ReleaseRequest(lease_id=answer.lease_id), timeout=TIMEOUT)
    assert node.source.total_pins() == 0
    stats = node.server.stats()
    assert stats["leases_created"] == stats["leases_released"] == 1
    assert stats["leases_live"] == 0


def test_lookup_that_misses_everything_creates_no_lease(stub, node):
    answer = lookup(stub, [b"nothing-here"])
    assert list(answer.hit) == [False]
    assert answer.lease_id == ""
    assert node.server.stats()["leases_live"] == 0


def test_lookup_waits_for_keys_stored_later():
    with serve_rows() as started, grpc.insecure_channel(started.endpoint) as channel:
        stub = peer_pb2_grpc.KVPeerStub(channel)
        late_key = b"stored-later"
        late_row = np.full(CHUNK_BYTES, 7, dtype=np.uint8)
        started.source.evict(started.keys[0])
        timer = threading.Timer(0.3, started.source.put, (late_key, late_row))
        timer.start()
        try:
            answer = lookup(stub, [late_key], hold=False, handoff_id="h1", wait_ms=15_000)
        finally:
            timer.join()
        assert list(answer.hit) == [True]


def test_lookup_wait_is_capped_by_the_server():
    with (
        serve_rows(max_lookup_wait_s=0.2) as started,
        grpc.insecure_channel(started.endpoint) as channel,
    ):
        stub = peer_pb2_grpc.KVPeerStub(channel)
        began = time.monotonic()
        answer = lookup(stub, [b"never-stored"], hold=False, wait_ms=60_000)
        assert list(answer.hit) == [False]
        assert time.monotonic() - began < 5.0


def test_lookup_with_another_fingerprint_is_refused(stub, node):
    request = peer_pb2.LookupRequest(fingerprint="0" * 32, keys=node.keys[:1])
    error = refusal(stub.Lookup, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fingerprint" in error.details()
    assert node.server.stats()["errors_failed_precondition"] == 1


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ([], "at least one key"),
        ([b""], "keys[0]"),
        ([b"ok", b"k" * 65], "keys[1]: 65 bytes"),
    ],
)
def test_lookup_refuses_bad_keys(stub, node, keys, words):
    request = peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest, keys=keys)
    error = refusal(stub.Lookup, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.details()
    assert_still_serving(stub, node)


def test_lookup_refuses_more_keys_than_the_limit():
    with (
        serve_rows(max_keys_per_lookup=4) as started,
        grpc.insecure_channel(started.endpoint) as channel,
    ):
        stub = peer_pb2_grpc.KVPeerStub(channel)
        error = refusal(
            stub.Lookup,
            peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest, keys=started.keys[:5]),
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "5 keys exceed max_keys_per_lookup (4)" in error.details()


def test_live_leases_are_capped_and_refused_lookups_pin_nothing():
    with (
        serve_rows(max_leases=2) as started,
        grpc.insecure_channel(started.endpoint) as channel,
    ):
        stub = peer_pb2_grpc.KVPeerStub(channel)
        first = lookup(stub, started.keys[:1])
        lookup(stub, started.keys[1:2])
        error = refusal(
            stub.Lookup,
            peer_pb2.LookupRequest(
                fingerprint=FINGERPRINT.digest, keys=started.keys[2:3], hold=True
            ),
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 leases are live" in error.details()
        assert started.source.pin_count(started.keys[2]) == 0
        stub.Release(peer_pb2.ReleaseRequest(lease_id=first.lease_id), timeout=TIMEOUT)
        assert lookup(stub, started.keys[2:3]).lease_id


class _RefusingSource(ArrayChunkSource):
    """A real ChunkSource that refuses handoff lookups, as the vLLM source does on timeout."""

    def lookup(self, keys, *, hold, handoff_id="", wait_s=0.0, timeout_s=5.0) -> PinnedChunks:
        if handoff_id:
            raise LookupRefused("NOT_FOUND", f"handoff {handoff_id!r} timed out on the producer")
        return super().lookup(keys, hold=hold, wait_s=wait_s, timeout_s=timeout_s)


def test_a_source_refusal_becomes_its_status():
    source = _RefusingSource(1, CHUNK_BYTES)
    source.put(b"key", bytes(CHUNK_BYTES))
    with (
        PeerServer(source, node_id="producer", fingerprint=FINGERPRINT) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = peer_pb2_grpc.KVPeerStub(channel)
        error = refusal(
            stub.Lookup,
            peer_pb2.LookupRequest(
                fingerprint=FINGERPRINT.digest, keys=[b"key"], handoff_id="req-1"
            ),
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "handoff 'req-1' timed out" in error.details()


# -- Pull ------------------------------------------------------------------------


def test_pull_streams_each_row_with_key_index_and_digest(stub, node):
    answer = lookup(stub, [node.keys[3], b"missing", node.keys[5]])
    chunks = list(stub.Pull(peer_pb2.PullRequest(lease_id=answer.lease_id), timeout=TIMEOUT))
    assert [c.index for c in chunks] == [0, 2]
    assert [c.key for c in chunks] == [node.keys[3], node.keys[5]]
    for chunk, row in zip(chunks, (node.rows[3], node.rows[5]), strict=True):
        assert chunk.data == row.tobytes()
        assert chunk.digest == digest(row.tobytes())
    stats = node.server.stats()
    assert stats["chunks_served"] == 2
    assert stats["bytes_served"] == 2 * CHUNK_BYTES


def test_pull_of_chosen_indices_in_the_order_asked(stub, node):
    answer = lookup(stub, node.keys[:6])
    request = peer_pb2.PullRequest(lease_id=answer.lease_id, indices=[4, 1])
    chunks = list(stub.Pull(request, timeout=TIMEOUT))
    assert [c.index for c in chunks] == [4, 1]
    assert chunks[0].data == node.rows[4].tobytes()


def test_pull_of_unknown_lease_is_not_found(stub, node):
    error = refusal(stub.Pull, peer_pb2.PullRequest(lease_id="no-such-lease"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-lease" in error.details()
    assert_still_serving(stub, node)


@pytest.mark.parametrize(
    ("indices", "words"),
    [([0, 9], "indices[1]: 9 is out of range, the lease has 2 keys"), ([1], "did not hit")],
)
def test_pull_refuses_bad_indices_before_sending_anything(stub, node, indices, words):
    answer = lookup(stub, [node.keys[0], b"missing"])
    call = stub.Pull(
        peer_pb2.PullRequest(lease_id=answer.lease_id, indices=indices), timeout=TIMEOUT
    )
    received = []
    with pytest.raises(grpc.RpcError) as info:
        received.extend(call)
    assert received == []
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    # The refused pull does not hold the lease: release unpins at once.
    stub.Release(peer_pb2.ReleaseRequest(lease_id=answer.lease_id), timeout=TIMEOUT)
    assert node.source.total_pins() == 0


def test_release_of_unknown_lease_is_not_found_and_released_lease_is_gone(stub, node):
    error = refusal(stub.Release, peer_pb2.ReleaseRequest(lease_id="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    answer = lookup(stub, node.keys[:1])
    stub.Release(peer_pb2.ReleaseRequest(lease_id=answer.lease_id), timeout=TIMEOUT)
    for call, request in (
        (stub.Release, peer_pb2.ReleaseRequest(lease_id=answer.lease_id)),
        (stub.Pull, peer_pb2.PullRequest(lease_id=answer.lease_id)),
    ):
        assert refusal(call, request).code() == grpc.StatusCode.NOT_FOUND
    assert node.server.stats()["errors_not_found"] == 3


def test_client_going_away_mid_pull_ends_the_servers_read():
    rows = 64  # 16 MiB: more than gRPC and TCP buffer, so the server is mid-stream
    with (
        serve_rows(rows, 256 << 10) as started,
        Relay(started.endpoint, down=Faults(rate_bytes_per_s=1 << 20)) as relay,
        grpc.insecure_channel(relay.endpoint) as slow,
        grpc.insecure_channel(started.endpoint) as direct,
    ):
        stub = peer_pb2_grpc.KVPeerStub(direct)
        answer = lookup(stub, started.keys)
        call = peer_pb2_grpc.KVPeerStub(slow).Pull(
            peer_pb2.PullRequest(lease_id=answer.lease_id), timeout=TIMEOUT
        )
        next(call)
        call.cancel()
        stub.Release(peer_pb2.ReleaseRequest(lease_id=answer.lease_id), timeout=TIMEOUT)
        wait_until(lambda: started.source.total_pins() == 0, "the cancelled pull to unpin")
        assert started.server.stats()["chunks_served"] < rows


# -- Leases ----------------------------------------------------------------------


def test_lease_expiry_unpins():
    with serve_rows(lease_ttl_s=0.3) as started, grpc.insecure_channel(started.endpoint) as channel:
        stub = peer_pb2_grpc.KVPeerStub(channel)
        answer = lookup(stub, started.keys[:3])
        assert started.source.total_pins() == 3
        wait_until(lambda: started.source.total_pins() == 0, "the lease to expire")
        assert started.server.stats()["leases_expired"] == 1
        error = refusal(stub.Pull, peer_pb2.PullRequest(lease_id=answer.lease_id))
        assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("ending", ["expiry", "release"])
def test_a_lease_ending_mid_pull_stays_pinned_until_the_stream_ends(make_client, ending):
    """A throttled pull outlives its lease: the rows stay pinned until the stream ends."""
    rows, size = 32, 256 << 10
    ttl = 0.3 if ending == "expiry" else 30.0
    with (
        serve_rows(rows, size, lease_ttl_s=ttl) as started,
        Relay(started.endpoint, down=Faults(rate_bytes_per_s=2 << 20)) as relay,
    ):
        client = make_client(relay.endpoint, chunk_bytes=size)
        direct = make_client(started.endpoint, chunk_bytes=size)
        answer = client.lookup(started.keys)
        dest = np.zeros((rows, size), dtype=np.uint8)
        cancel = threading.Event()
        result = []
        puller = threading.Thread(
            target=lambda: result.append(
                client.pull(answer.lease_id, targets_for(started.keys, dest), cancel=cancel)
            )
        )
        puller.start()
        try:
            wait_until(lambda: started.server.stats()["chunks_served"] > 0, "the pull to start")
            if ending == "release":
                direct.release(answer.lease_id)
            wait_until(lambda: started.server.stats()["leases_live"] == 0, f"the lease's {ending}")
            pins = started.source.total_pins()
            served = started.server.stats()["chunks_served"]
            assert served < rows, f"the pull ended too early to test ({served} rows served)"
            assert pins == rows, f"{ending} unpinned rows a pull was still reading"
            late = direct.pull(answer.lease_id, targets_for(started.keys, dest, [0]))
            assert "NOT_FOUND" in late.error, "a new pull of an ended lease must be refused"
        finally:
            cancel.set()
            puller.join(TIMEOUT)
        assert not puller.is_alive()
        wait_until(lambda: started.source.total_pins() == 0, "the ended lease to unpin")
        assert result[0].error is not None and "cancelled" in result[0].error


def test_server_stop_releases_every_lease():
    source = ArrayChunkSource(2, CHUNK_BYTES)
    source.put(b"a", bytes(CHUNK_BYTES))
    server = PeerServer(source, node_id="n", fingerprint=FINGERPRINT).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            lookup(peer_pb2_grpc.KVPeerStub(channel), [b"a"])
        assert source.total_pins() == 1
    finally:
        server.stop(grace=0)
    assert source.total_pins() == 0


# -- Bad input from the network -------------------------------------------------------


@pytest.mark.parametrize("method", ["Handshake", "Lookup", "Pull", "Release"])
def test_garbage_bytes_get_invalid_argument(node, stub, method):
    with grpc.insecure_channel(node.endpoint) as channel:
        raw = channel.unary_unary(
            f"/kvpeer.v1.KVPeer/{method}", request_serializer=None, response_deserializer=None
        )
        if method == "Pull":
            raw = channel.unary_stream(
                f"/kvpeer.v1.KVPeer/{method}", request_serializer=None, response_deserializer=None
            )
        error = refusal(raw, b"\xff\xff\xff\xff\x0f garbage")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed kvpeer.v1." in error.details()
    assert_still_serving(stub, node)


def test_oversized_request_is_refused(stub, node):
    keys = [b"k" * 60] * 20_000  # ~1.2 MiB, above the 1 MiB request limit
    error = refusal(stub.Lookup, peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest, keys=keys))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(stub, node)


def test_stats_count_errors_by_status(stub, node):
    refusal(stub.Pull, peer_pb2.PullRequest(lease_id="x"))
    refusal(stub.Lookup, peer_pb2.LookupRequest(fingerprint=FINGERPRINT.digest))
    stats = node.server.stats()
    assert stats["errors_not_found"] == 1
    assert stats["errors_invalid_argument"] == 1
    assert stats["errors_total"] == 2


# -- ArrayChunkSource: pins protect rows --------------------------------------------


def test_array_source_refuses_to_overwrite_a_pinned_row_and_defers_its_eviction():
    source = ArrayChunkSource(2, 8)
    source.put(b"a", b"A" * 8)
    answer = source.lookup([b"a"], hold=True)
    with pytest.raises(RowPinnedError, match="pinned by 1 lease"):
        source.put(b"a", b"Z" * 8)
    assert source.evict(b"a") is False  # deferred: the row is pinned
    assert source.lookup([b"a"], hold=False).hits == [False]
    assert bytes(answer.rows[0]) == b"A" * 8  # the pinned bytes did not change
    source.put(b"b", b"B" * 8)
    with pytest.raises(SourceFullError):
        source.put(b"c", b"C" * 8)  # the evicted row is still pinned
    answer.release()
    source.put(b"c", b"C" * 8)  # freed with its last pin
    assert source.total_pins() == 0


def test_array_source_serves_rows_written_into_shared_memory_by_another_handle():
    segment = shared_memory.SharedMemory(create=True, size=2 * 16)
    try:
        source = ArrayChunkSource(2, 16, buffer=segment.buf)
        source.put_row(1, b"shared")  # claim the row; another process fills it
        writer = shared_memory.SharedMemory(name=segment.name)
        writer.buf[16:32] = b"written-by-peer!"
        writer.close()
        answer = source.lookup([b"shared"], hold=True)
        assert bytes(answer.rows[0]) == b"written-by-peer!"
        answer.release()
        del answer, source  # their views export the segment's buffer
    finally:
        segment.close()
        segment.unlink()
