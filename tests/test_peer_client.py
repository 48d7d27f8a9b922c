"""PeerClient against real chunk servers: in-process, in a subprocess, behind a faulty relay.

What a caller relies on: rows land byte-exact in its buffers, a row is reported
loaded only when it arrived whole with the right key and digest, and a dead or
misbehaving peer ends as a partial result with a readable error, never an
exception or a hang. Every pull test runs with both pull transports (``h2``,
the default, and ``grpc``) through the ``pull_client`` fixture.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvpeer.api.errors import ConfigError, IncompatiblePeerError, KVPeerError, PeerUnavailableError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from kvpeer.client.peer import PeerClientPool, PullTarget
from kvpeer.sim.relay import Faults, Relay
from tests.support.chunk_node import ChunkNode
from tests.support.peer import (
    CHUNK_BYTES,
    FINGERPRINT,
    NUM_CHUNKS,
    make_client_fixture,  # noqa: F401 - fixture
    node_fixture,  # noqa: F401 - fixture
    serve_rows,
    targets_for,
    wait_until,
)
from tests.support.pull import (
    SENTINEL,
    assert_loaded_rows_exact,
    pull_client_fixture,  # noqa: F401 - fixture
    sentinel_buffer,
    start_pull,
    transport_fixture,  # noqa: F401 - fixture
)

# -- Round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(("streams", "channels"), [(1, 1), (4, 1), (3, 2)])
def test_pull_between_two_processes_delivers_every_byte(pull_client, streams, channels):
    rows, size = 12, 256 << 10
    with ChunkNode(num_chunks=rows, chunk_bytes=size, seed=5) as node:
        client = pull_client(node.endpoint, chunk_bytes=size, channels=channels)
        keys = synthetic_keys(rows, 5)
        answer = client.lookup(keys)
        assert answer.hits == [True] * rows
        dest = sentinel_buffer(rows, size)
        result = client.pull(answer.lease_id, targets_for(keys, dest), streams=streams)
        client.release(answer.lease_id)
        assert result.complete, result.error
        assert result.bytes_loaded == rows * size
        assert np.array_equal(dest, synthetic_rows(rows, size, 5))


def test_several_clients_pull_at_once(pull_client):
    rows, size = 8, 128 << 10
    expected = synthetic_rows(rows, size, 9)
    keys = synthetic_keys(rows, 9)
    with ChunkNode(num_chunks=rows, chunk_bytes=size, seed=9) as node:
        clients = [pull_client(node.endpoint, chunk_bytes=size, node_id=f"c{i}") for i in range(4)]
        buffers = [sentinel_buffer(rows, size) for _ in clients]
        results: list = [None] * len(clients)

        def pull(i: int) -> None:
            answer = clients[i].lookup(keys)
            results[i] = clients[i].pull(answer.lease_id, targets_for(keys, buffers[i]), streams=2)
            clients[i].release(answer.lease_id)

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for result, dest in zip(results, buffers, strict=True):
            assert result is not None and result.complete, result and result.error
            assert np.array_equal(dest, expected)


def test_pull_into_int8_rows_of_a_primary_tier_view(node, pull_client):
    """vLLM's primary view is int8 ('b'); targets are byte slices of it."""
    primary = np.zeros((NUM_CHUNKS, CHUNK_BYTES), dtype=np.int8)
    view = memoryview(primary).cast("B").cast("b")
    client = pull_client(node.endpoint)
    answer = client.lookup(node.keys[:3])
    targets = [
        PullTarget(i, node.keys[i], view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]) for i in range(3)
    ]
    result = client.pull(answer.lease_id, targets)
    assert result.complete, result.error
    assert np.array_equal(primary[:3].view(np.uint8), node.rows[:3])


def test_pull_of_a_subset_into_chosen_rows(node, pull_client):
    client = pull_client(node.endpoint)
    answer = client.lookup(node.keys)
    dest = sentinel_buffer(NUM_CHUNKS, CHUNK_BYTES)
    result = client.pull(answer.lease_id, targets_for(node.keys, dest, indices=[7, 2]))
    assert result.loaded == [True, True]
    assert np.array_equal(dest[[2, 7]], node.rows[[2, 7]])
    assert (dest[0] == SENTINEL).all()


# -- Handshake and lookup ---------------------------------------------------------------


def test_handshake_is_cached_and_describes_the_peer(node, make_client):
    client = make_client(node.endpoint)
    info = client.handshake()
    assert info.node_id == "test-node"
    assert info.chunk_bytes == CHUNK_BYTES
    assert info.fingerprint == FINGERPRINT
    assert info.max_keys_per_lookup == 4096
    assert info.lease_ttl_s == 30.0
    client.lookup(node.keys[:1], hold=False)
    assert client.handshake() is info
    assert node.server.stats()["handshakes"] == 1


def test_incompatible_peer_is_refused_naming_the_ingredient(node, make_client):
    other = Fingerprint(dict(FINGERPRINT.ingredients) | {"model": "someone/else"})
    client = make_client(node.endpoint, fingerprint=other)
    with pytest.raises(IncompatiblePeerError, match="model differs"):
        client.lookup(node.keys[:1])
    with pytest.raises(IncompatiblePeerError, match="chunk_bytes differs"):
        make_client(node.endpoint, chunk_bytes=CHUNK_BYTES + 1).handshake()


def test_unreachable_peer_raises_peer_unavailable(make_client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        client = make_client(f"127.0.0.1:{port}", rpc_timeout_s=1.0)
        began = time.monotonic()
        with pytest.raises(PeerUnavailableError, match=f"127.0.0.1:{port}"):
            client.lookup([b"k"])
        assert time.monotonic() - began < 10


def test_lookup_refusal_carries_the_servers_message(make_client):
    with serve_rows(max_keys_per_lookup=2) as started:
        client = make_client(started.endpoint)
        with pytest.raises(KVPeerError, match="max_keys_per_lookup") as info:
            client.lookup(started.keys[:3])
        assert not isinstance(info.value, PeerUnavailableError | IncompatiblePeerError)


def test_release_never_raises(node, make_client):
    client = make_client(node.endpoint)
    client.release("no-such-lease")
    answer = client.lookup(node.keys[:1])
    client.release(answer.lease_id)
    assert node.source.total_pins() == 0
    client.close()
    client.release(answer.lease_id)


def test_bad_targets_are_programming_errors(node, pull_client):
    client = pull_client(node.endpoint)
    short = memoryview(bytearray(CHUNK_BYTES - 1))
    with pytest.raises(ValueError, match="dest has"):
        client.pull("lease", [PullTarget(0, b"k", short)])
    read_only = memoryview(bytes(CHUNK_BYTES))
    with pytest.raises(ValueError, match="writable"):
        client.pull("lease", [PullTarget(0, b"k", read_only)])


def test_pool_shares_one_client_per_endpoint(node, transport):
    pool = PeerClientPool(
        node_id="n", fingerprint=FINGERPRINT, chunk_bytes=CHUNK_BYTES, pull_transport=transport
    )
    try:
        client = pool.get(node.endpoint)
        assert pool.get(node.endpoint) is client
        answer = client.lookup(node.keys[:2])
        dest = sentinel_buffer(2, CHUNK_BYTES)
        result = client.pull(answer.lease_id, targets_for(node.keys[:2], dest), streams=2)
        assert result.complete, result.error
        assert np.array_equal(dest, node.rows[:2])
    finally:
        pool.close_all()
    with pytest.raises(PeerUnavailableError):
        pool.get(node.endpoint)


def test_unknown_pull_transport_is_a_config_error(make_client):
    with pytest.raises(ConfigError, match=r"pull_transport: expected one of \['h2', 'grpc'\]"):
        PeerClientPool(node_id="n", fingerprint=FINGERPRINT, chunk_bytes=1, pull_transport="tcp")
    with pytest.raises(ConfigError, match="pull_transport"):
        make_client("127.0.0.1:1", pull_transport="quic")


# -- Failures during a pull --------------------------------------------------------------


def test_pull_of_unknown_lease_reports_not_found(node, pull_client):
    client = pull_client(node.endpoint)
    dest = sentinel_buffer(2, CHUNK_BYTES)
    result = client.pull("gone", targets_for(node.keys[:2], dest), streams=2)
    assert result.loaded == [False, False]
    assert "NOT_FOUND" in result.error


def test_pull_from_an_unreachable_peer_reports_unavailable(pull_client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        client = pull_client(f"127.0.0.1:{sock.getsockname()[1]}")
        dest = sentinel_buffer(2, CHUNK_BYTES)
        result = client.pull("lease", targets_for([b"k0", b"k1"], dest), streams=2, timeout_s=5)
    assert result.loaded == [False, False]
    assert "UNAVAILABLE" in result.error
    assert (dest == SENTINEL).all()


def test_row_under_another_key_is_not_loaded(node, pull_client):
    client = pull_client(node.endpoint)
    answer = client.lookup(node.keys[:2])
    dest = sentinel_buffer(2, CHUNK_BYTES)
    flat = memoryview(dest).cast("B")
    targets = [
        PullTarget(0, node.keys[1], flat[:CHUNK_BYTES]),  # the lease has keys[0] at index 0
        PullTarget(1, node.keys[1], flat[CHUNK_BYTES:]),
    ]
    result = client.pull(answer.lease_id, targets)
    assert result.loaded == [False, True]
    assert f"expected {node.keys[1].hex()}" in result.error


def test_corrupted_row_is_rejected_and_the_others_load(node, pull_client):
    victim = 5
    row = node.rows[victim].tobytes()
    needles = tuple(row[offset : offset + 12] for offset in (1_000, 30_000, 60_000))
    with Relay(node.endpoint, down=Faults(corrupt_match=needles)) as relay:
        client = pull_client(relay.endpoint)
        answer = client.lookup(node.keys)
        dest = sentinel_buffer(NUM_CHUNKS, CHUNK_BYTES)
        result = client.pull(answer.lease_id, targets_for(node.keys, dest))
    assert result.loaded == [i != victim for i in range(NUM_CHUNKS)]
    assert f"row {victim}: digest mismatch" in result.error
    assert_loaded_rows_exact(result, dest, node.rows)


def test_server_killed_mid_pull_keeps_the_verified_rows(pull_client):
    # 32 MiB: more than the kernel buffers between server and relay hold, so the
    # server is still sending when it dies.
    rows, size, seed = 64, 512 << 10, 4
    expected = synthetic_rows(rows, size, seed)
    keys = synthetic_keys(rows, seed)
    with (
        ChunkNode(num_chunks=rows, chunk_bytes=size, seed=seed) as node,
        Relay(node.endpoint, down=Faults(rate_bytes_per_s=2 << 20)) as relay,
    ):
        client = pull_client(relay.endpoint, chunk_bytes=size)
        answer = client.lookup(keys)
        dest = sentinel_buffer(rows, size)
        thread, out = start_pull(client, answer.lease_id, targets_for(keys, dest), streams=2)
        wait_until(lambda: relay.bytes_down > 5 * size, "a few rows to pass the relay")
        node.kill()
        relay.set_faults(down=Faults())  # deliver what the dead server had sent, quickly
        thread.join(30)
        assert not thread.is_alive(), "pull hung after the server died"
    result = out[0]
    loaded = sum(result.loaded)
    assert 0 < loaded < rows, f"{loaded} of {rows} rows loaded"
    assert result.error is not None and "UNAVAILABLE" in result.error
    assert result.bytes_loaded == loaded * size
    assert_loaded_rows_exact(result, dest, expected)


def test_connection_dropped_mid_pull_gives_a_partial_result(node, pull_client):
    # Throttled so that rows are read as they arrive: grpcio drops the messages it
    # holds unread when the connection breaks.
    faults = Faults(drop_after_bytes=5 * CHUNK_BYTES, rate_bytes_per_s=2 << 20)
    with Relay(node.endpoint, down=faults) as relay:
        client = pull_client(relay.endpoint)
        answer = client.lookup(node.keys)
        dest = sentinel_buffer(NUM_CHUNKS, CHUNK_BYTES)
        result = client.pull(answer.lease_id, targets_for(node.keys, dest), timeout_s=20)
    assert 0 < sum(result.loaded) < NUM_CHUNKS
    assert result.error is not None
    assert_loaded_rows_exact(result, dest, node.rows)


def test_cancel_stops_a_pull_at_once(pull_client):
    rows, size = 32, 256 << 10
    with (
        serve_rows(rows, size) as started,
        Relay(started.endpoint, down=Faults(rate_bytes_per_s=1 << 20)) as relay,
    ):
        client = pull_client(relay.endpoint, chunk_bytes=size)
        answer = client.lookup(started.keys)
        dest = sentinel_buffer(rows, size)
        cancel = threading.Event()
        thread, out = start_pull(
            client, answer.lease_id, targets_for(started.keys, dest), streams=2, cancel=cancel
        )
        wait_until(lambda: relay.bytes_down > 2 * size, "the pull to start")
        cancel.set()
        cancelled_at = time.monotonic()
        thread.join(30)
        assert time.monotonic() - cancelled_at < 5
    result = out[0]
    assert not all(result.loaded)
    assert "cancelled" in result.error
    assert_loaded_rows_exact(result, dest, started.rows)


def test_pull_deadline_ends_a_pull_from_a_silent_server(node, pull_client):
    with Relay(node.endpoint) as relay:
        client = pull_client(relay.endpoint)
        answer = client.lookup(node.keys)
        relay.set_faults(down=Faults(delay_s=2.0))  # nothing reaches the client in time
        dest = sentinel_buffer(NUM_CHUNKS, CHUNK_BYTES)
        began = time.monotonic()
        result = client.pull(answer.lease_id, targets_for(node.keys, dest), timeout_s=0.5)
        assert time.monotonic() - began < 1.8
    assert result.loaded == [False] * NUM_CHUNKS
    assert "DEADLINE_EXCEEDED" in result.error


def test_closing_the_client_ends_its_pulls(pull_client):
    rows, size = 32, 256 << 10
    with (
        serve_rows(rows, size) as started,
        Relay(started.endpoint, down=Faults(rate_bytes_per_s=1 << 20)) as relay,
    ):
        client = pull_client(relay.endpoint, chunk_bytes=size)
        answer = client.lookup(started.keys)
        dest = sentinel_buffer(rows, size)
        thread, out = start_pull(
            client, answer.lease_id, targets_for(started.keys, dest), streams=2
        )
        wait_until(lambda: relay.bytes_down > 2 * size, "the pull to start")
        client.close()
        thread.join(10)
        assert not thread.is_alive(), "pull went on after close()"
        later = client.pull(answer.lease_id, targets_for(started.keys[:1], dest[:1]))
    assert not all(out[0].loaded)
    assert out[0].error is not None
    assert_loaded_rows_exact(out[0], dest, started.rows)
    assert later.loaded == [False] and later.error is not None


def test_pull_deadline_ends_a_stalled_pull(node, pull_client):
    with Relay(node.endpoint, down=Faults(rate_bytes_per_s=64 << 10)) as relay:
        client = pull_client(relay.endpoint)
        answer = client.lookup(node.keys)
        dest = sentinel_buffer(NUM_CHUNKS, CHUNK_BYTES)
        began = time.monotonic()
        result = client.pull(answer.lease_id, targets_for(node.keys, dest), timeout_s=0.5)
        assert time.monotonic() - began < 5
    assert not all(result.loaded)
    assert "DEADLINE_EXCEEDED" in result.error


@pytest.mark.parametrize(
    ("transport", "channels", "connections"),
    [
        pytest.param("grpc", 3, 3, id="grpc-streams-share-the-channels"),
        pytest.param("h2", 1, 1 + 3, id="h2-one-connection-per-stream"),
    ],
)
def test_connections_per_pull(node, make_client, transport, channels, connections):
    with Relay(node.endpoint) as relay:
        client = make_client(relay.endpoint, channels=channels, pull_transport=transport)
        answer = client.lookup(node.keys)
        dest = sentinel_buffer(NUM_CHUNKS, CHUNK_BYTES)
        result = client.pull(answer.lease_id, targets_for(node.keys, dest), streams=3)
        assert result.complete, result.error
        assert relay.connections == connections
    assert np.array_equal(dest, node.rows)
