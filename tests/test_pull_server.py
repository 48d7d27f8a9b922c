"""The fast Pull listener (kvpeer.transport.pull_server) on loopback, against real clients and bad ones.

Real clients: kvpeer's own (PeerClient, h2 transport), grpcio's generated stub
and grpcurl with the .proto, in plaintext, TLS, mutual TLS and with the token.
Bad ones: :class:`tests.support.pull_server.RawClient` speaks HTTP/2 by hand, so
a test can stop reading, reset a stream, open a second one or send garbage.
Each refusal is checked for its status and message (the same as on the grpcio
port), each hostile connection for a clean GOAWAY or close, and afterwards the
server still serves and holds no pins.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.limits import MAX_REQUEST_BYTES
from kvpeer.api.security import Security
from kvpeer.api.wire import digest
from kvpeer.bench.rows import synthetic_keys
from kvpeer.client.peer import PeerClient
from kvpeer.sim.relay import Relay
from kvpeer.tier.config import TierConfig
from kvpeer.transport import frames as h2
from kvpeer.transport.connection import CallError
from kvpeer.transport.pull_client import H2PullTransport
from kvpeer.transport.pull_server import PullServerOptions
from kvpeer.transport.pull_stream import REVOKED_MESSAGE
from kvpeer.v1 import peer_pb2, peer_pb2_grpc
from tests.support.certs import make_certs, tls_client, tls_server
from tests.support.chunk_node import ChunkNode
from tests.support.h2server import settings
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
from tests.support.pull import sentinel_buffer
from tests.support.pull_server import RawClient, goaway_code, pull_body

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
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


def raw_pull(port: int, request: bytes):
    """A Pull of serialized ``request`` through grpcio: (code, details, messages)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(
            h2.PULL_PATH, request_serializer=None, response_deserializer=None
        )(request, timeout=TIMEOUT)
        messages = []
        with contextlib.suppress(grpc.RpcError):
            messages.extend(call)
        return call.code(), call.details(), messages


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


@pytest.fixture
def no_bugs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if a pull connection died of an unexpected exception (a bug)."""
    with caplog.at_level(logging.ERROR, logger="kvpeer.transport.pull_server"):
        yield
    assert not caplog.records, [r.getMessage() for r in caplog.records]


# -- Discovery and interoperability ------------------------------------------------------


def test_handshake_advertises_the_pull_port_and_the_listen_port(node):
    with grpc.insecure_channel(node.endpoint) as channel:
        answer = peer_pb2_grpc.KVPeerStub(channel).Handshake(
            peer_pb2.HandshakeRequest(), timeout=TIMEOUT
        )
    assert answer.pull_port == node.server.pull_port != 0
    assert answer.pull_port != node.server.port
    assert answer.listen_port == node.server.port
    with serve_rows(pull_port=None) as plain, grpc.insecure_channel(plain.endpoint) as channel:
        answer = peer_pb2_grpc.KVPeerStub(channel).Handshake(
            peer_pb2.HandshakeRequest(), timeout=TIMEOUT
        )
        assert answer.pull_port == plain.server.pull_port == 0


def test_grpcio_reads_the_pull_port_as_an_ordinary_chunk_stream(node, no_bugs):
    lease_id = lease(node, [node.keys[3], b"missing", node.keys[5]])
    with grpc.insecure_channel(f"127.0.0.1:{node.server.pull_port}") as channel:
        stub = peer_pb2_grpc.KVPeerStub(channel)
        chunks = list(stub.Pull(peer_pb2.PullRequest(lease_id=lease_id), timeout=TIMEOUT))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Handshake(peer_pb2.HandshakeRequest(), timeout=TIMEOUT)
    assert [c.index for c in chunks] == [0, 2]
    assert [c.key for c in chunks] == [node.keys[3], node.keys[5]]
    for chunk, row in zip(chunks, (node.rows[3], node.rows[5]), strict=True):
        assert chunk.data == row.tobytes()
        assert chunk.digest == digest(row.tobytes())
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "call the node's main port" in refused.value.details()
    stats = node.server.stats()
    assert stats["chunks_served"] == 2
    assert stats["pull_port_calls"] == 2


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed in the venv")
def test_grpcurl_decodes_the_pull_port_given_the_proto(node):
    lease_id = lease(node, node.keys[:2])
    command = [
        GRPCURL,
        "-plaintext",
        "-max-time",
        "30",
        "-import-path",
        str(ROOT / "proto"),
        "-proto",
        "kvpeer/v1/peer.proto",
        "-d",
        json.dumps({"lease_id": lease_id, "indices": [1]}),
        f"127.0.0.1:{node.server.pull_port}",
        "kvpeer.v1.KVPeer/Pull",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    chunk = json.loads(result.stdout)
    assert chunk["index"] == 1
    assert base64.b64decode(chunk["data"]) == node.rows[1].tobytes()
    assert base64.b64decode(chunk["digest"]) == digest(node.rows[1].tobytes())


def test_peer_clients_pull_through_the_pull_port_on_many_streams(node, make_client, no_bugs):
    results: list = []

    def pull_once() -> None:
        results.append(pull_all(make_client(node.endpoint), node, streams=4))

    threads = [threading.Thread(target=pull_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2
    for result, dest in results:
        assert result.complete, result.error
        assert np.array_equal(dest, node.rows)
    stats = node.server.stats()
    assert stats["pull_port_calls"] == 8
    assert stats["chunks_served"] == 2 * len(node.keys)
    wait_until(lambda: node.source.total_pins() == 0, "every pin released")


def test_a_client_that_dialled_a_relay_pulls_through_the_relay(node, make_client):
    """The advertised pull port is the server's: a client behind a relay stays on the relay."""
    with Relay(node.endpoint) as relay:
        result, dest = pull_all(make_client(relay.endpoint), node, streams=2)
        assert result.complete, result.error
        assert relay.bytes_down > node.rows.nbytes
    assert np.array_equal(dest, node.rows)
    assert node.server.stats()["pull_port_calls"] == 0


def test_a_pull_port_that_refuses_falls_back_to_the_main_port_then_is_learnt_again(make_client):
    """The peer restarted on the same main port with a new pull port: no pull fails."""
    with serve_rows() as first:
        main_port, old_pull_port = first.server.port, first.server.pull_port
        client = make_client(first.endpoint)
        client.handshake()
    with socket.create_server(("127.0.0.1", 0)) as probe:
        new_pull_port = probe.getsockname()[1]
    assert new_pull_port != old_pull_port
    with serve_rows(listen=f"127.0.0.1:{main_port}", pull_port=new_pull_port) as second:
        result, dest = pull_all(client, second, streams=2)
        assert result.complete, result.error
        assert np.array_equal(dest, second.rows)
        assert second.server.stats()["pull_port_calls"] == 0  # pulled on the main port
        result, dest = pull_all(client, second, streams=2)  # handshakes again first
        assert result.complete, result.error
        assert second.server.stats()["pull_port_calls"] == 2
        assert client.handshake().pull_port == new_pull_port


# -- TLS, mutual TLS and the token ------------------------------------------------------------

TOKEN = "pull-port-token-77c1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN)
    return path


def test_tls_mutual_tls_and_token_on_the_pull_port(
    certs, token_file, tmp_path, make_client, no_bugs
):
    server = Security.from_config(tls_server(certs, mutual=True), str(token_file))
    good = Security.from_config(tls_client(certs), str(token_file))
    with serve_rows(security=server) as node:
        client = make_client(node.endpoint, security=good)
        result, dest = pull_all(client, node, streams=2)
        assert result.complete, result.error
        assert np.array_equal(dest, node.rows)
        assert node.server.stats()["pull_port_calls"] == 2

        # grpc-core over TLS with ALPN h2, a client certificate and the token.
        lease_id = client.lookup(node.keys[:1]).lease_id
        creds = grpc.ssl_channel_credentials(
            certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
        )
        with grpc.secure_channel(f"localhost:{node.server.pull_port}", creds) as channel:
            chunks = list(
                peer_pb2_grpc.KVPeerStub(channel).Pull(
                    peer_pb2.PullRequest(lease_id=lease_id),
                    timeout=TIMEOUT,
                    metadata=[("authorization", f"Bearer {TOKEN}")],
                )
            )
        assert [c.data for c in chunks] == [node.rows[0].tobytes()]
        served = node.server.stats()["chunks_served"]

        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token")
        intruders = {
            "UNAUTHENTICATED: wrong bearer token": Security.from_config(
                tls_client(certs), str(wrong)
            ),
            "UNAUTHENTICATED: missing bearer token": Security.from_config(tls_client(certs)),
            "UNAVAILABLE": Security.from_config(
                tls_client(certs, with_cert=False), str(token_file)
            ),
        }
        request = peer_pb2.PullRequest(lease_id=lease_id).SerializeToString()
        pull_endpoint = Endpoint("127.0.0.1", node.server.pull_port)
        for words, security in intruders.items():
            transport = H2PullTransport(pull_endpoint, security=security, chunk_bytes=CHUNK_BYTES)
            call = transport.start(request, time.monotonic() + TIMEOUT)
            try:
                with pytest.raises(CallError) as refused:
                    next(call)
            finally:
                call.close()
                transport.close()
            assert words in str(refused.value)
        assert node.server.stats()["chunks_served"] == served


# -- The grpcio port's refusals, word for word -------------------------------------------------


def _cases(node: Node, lease_id: str) -> dict[str, bytes]:
    def request(**fields) -> bytes:
        return peer_pb2.PullRequest(**fields).SerializeToString()

    return {
        "unknown-lease": request(lease_id="no-such-lease"),
        # The status message quotes it: percent-encoding of '%' and non-ASCII in grpc-message.
        "unknown-unicode-lease": request(lease_id="lease-100%-ünïcødé-\u2603"),
        "out-of-range": request(lease_id=lease_id, indices=[0, 9]),
        "named-twice": request(lease_id=lease_id, indices=[0, 0]),
        "did-not-hit": request(lease_id=lease_id, indices=[1]),
        "malformed": b"\xff\xff\xff\xff\x0f garbage",
    }


def test_refusals_are_the_grpcio_ports_word_for_word(node, no_bugs):
    lease_id = lease(node, [node.keys[0], b"missing"])
    for name, request in _cases(node, lease_id).items():
        main = raw_pull(node.server.port, request)
        fast = raw_pull(node.server.pull_port, request)
        assert fast == main, name
        assert main[0] in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), name
        assert main[2] == [], name
    stats = node.server.stats()
    assert stats["errors_not_found"] == 4
    assert stats["errors_invalid_argument"] == 8
    release(node, lease_id)
    assert node.source.total_pins() == 0


def test_an_oversized_request_is_resource_exhausted_on_both_ports(node):
    request = peer_pb2.PullRequest(lease_id="x" * (MAX_REQUEST_BYTES + 10)).SerializeToString()
    for port in (node.server.port, node.server.pull_port):
        code, details, messages = raw_pull(port, request)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (port, details)
        assert messages == []


def test_an_expired_lease_is_not_found_on_both_ports(make_client):
    with serve_rows(lease_ttl_s=0.3) as node:
        lease_id = lease(node)
        wait_until(lambda: node.source.total_pins() == 0, "the lease to expire")
        request = peer_pb2.PullRequest(lease_id=lease_id).SerializeToString()
        main = raw_pull(node.server.port, request)
        assert main[0] == grpc.StatusCode.NOT_FOUND
        assert raw_pull(node.server.pull_port, request) == main


# -- Revocation, slow and stopping clients --------------------------------------------------------


def test_revocation_between_frames_ends_the_pull_unavailable(make_client, no_bugs):
    with serve_rows(8, 256 << 10) as node:
        lease_id = lease(node)
        with RawClient(node.server.pull_port) as client:
            client.handshake(SMALL_WINDOW)
            client.send(client.request(1, pull_body(lease_id)))
            client.first_data(1)
            began = time.monotonic()
            node.server.revoke_leases()  # the server waits for a WINDOW_UPDATE, holding a row
            assert time.monotonic() - began < 2
            assert node.source.total_pins() == 0
            answer = client.response(1, window_updates=False)
            assert answer.status == grpc.StatusCode.UNAVAILABLE.value[0]
            assert answer.message == REVOKED_MESSAGE
        assert node.server.stats()["chunks_served"] < 8
        assert_serves(node, make_client)


def test_revocation_during_a_blocked_send_cuts_the_connection_at_once(make_client, no_bugs):
    with serve_rows(32, 1 << 20) as node:
        lease_id = lease(node)
        with RawClient(node.server.pull_port) as client:
            client.handshake(HUGE_WINDOW)
            client.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
            client.send(client.request(1, pull_body(lease_id)))
            wait_until(lambda: node.server.stats()["chunks_served"] > 0, "the pull to start")
            began = time.monotonic()
            node.server.revoke_leases()  # the server is blocked: nobody reads the socket
            assert time.monotonic() - began < 2
            assert node.source.total_pins() == 0
            # Mid-frame (most likely) the connection is cut; between frames, trailers.
            assert client.ending(1) in (None, grpc.StatusCode.UNAVAILABLE.value[0])
        assert node.server.stats()["chunks_served"] < 32
        assert_serves(node, make_client)


@pytest.mark.parametrize("cut_by", ["deadline", "stall"])
def test_a_client_that_stops_reading_is_cut_off_and_its_pins_released(make_client, cut_by, no_bugs):
    options = PullServerOptions(stall_timeout_s=0.5 if cut_by == "stall" else 30.0)
    with serve_rows(32, 1 << 20, pull_options=options) as node:
        lease_id = lease(node)
        with RawClient(node.server.pull_port) as client:
            client.handshake(HUGE_WINDOW)
            client.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
            timeout = "2S" if cut_by == "deadline" else None
            client.send(client.request(1, pull_body(lease_id), timeout=timeout))
            wait_until(lambda: node.server.stats()["chunks_served"] > 0, "the pull to start")
            release(node, lease_id)  # the pull still reads: the rows stay pinned until it ends
            assert node.source.total_pins() == 32
            wait_until(lambda: node.source.total_pins() == 0, f"the {cut_by} to end the pull")
            # Cut mid-frame: the connection closes; between frames: trailers.
            ending = grpc.StatusCode.DEADLINE_EXCEEDED if timeout else grpc.StatusCode.CANCELLED
            assert client.ending(1) in (None, ending.value[0])
        assert node.server.stats()["chunks_served"] < 32
        assert_serves(node, make_client)


def test_a_client_reset_stops_the_stream_and_the_connection_carries_the_next_call(
    make_client, no_bugs
):
    with serve_rows(8, 256 << 10) as node:
        first = lease(node)
        with RawClient(node.server.pull_port) as client:
            client.handshake(SMALL_WINDOW)
            client.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
            client.send(client.request(1, pull_body(first)))
            client.first_data(1)
            client.send(h2.frame(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.CANCEL)))
            release(node, first)
            wait_until(lambda: node.source.total_pins() == 0, "the reset pull to end")
            second = lease(node)
            client.send(client.request(3, pull_body(second)))
            answer = client.response(3)
            assert answer.status == 0
            assert len(answer.messages()) == 8
        release(node, second)
        assert node.source.total_pins() == 0


def test_a_second_concurrent_stream_is_refused_and_the_first_completes(node, no_bugs):
    lease_id = lease(node)
    with RawClient(node.server.pull_port) as client:
        client.handshake(SMALL_WINDOW)
        client.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
        client.send(client.request(1, pull_body(lease_id)))
        client.send(client.request(3, pull_body(lease_id)))
        second = client.response(3)
        assert second.reset == h2.REFUSED_STREAM
        first = client.response(1)
        assert first.status == 0
        chunks = [peer_pb2.Chunk.FromString(m) for m in first.messages()]
        assert [c.data for c in chunks] == [row.tobytes() for row in node.rows]


def test_other_methods_are_unimplemented_and_the_connection_goes_on(node, no_bugs):
    lease_id = lease(node, node.keys[:2])
    with RawClient(node.server.pull_port) as client:
        client.handshake()
        wrong = {1: {"path": "/kvpeer.v1.KVPeer/Lookup"}, 3: {"method": "GET"}}
        for stream, how in wrong.items():  # one call at a time, as MAX_CONCURRENT_STREAMS asks
            client.send(client.request(stream, pull_body(lease_id), **how))
            answer = client.response(stream)
            assert answer.status == grpc.StatusCode.UNIMPLEMENTED.value[0]
            assert "serves only POST /kvpeer.v1.KVPeer/Pull" in answer.message
            assert len(answer.headers) == 1  # trailers-only
        client.send(client.request(5, pull_body(lease_id)))
        answer = client.response(5)
        assert answer.status == 0
        assert len(answer.messages()) == 2


# -- Hostile bytes -------------------------------------------------------------------------------


def _huge_header_block() -> bytes:
    return h2.frame(h2.HEADERS, 0, 1, b"\x88") + b"".join(
        h2.frame(h2.CONTINUATION, 0, 1, bytes(16000)) for _ in range(3)
    )


HOSTILE = {
    "http1": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h2.PROTOCOL_ERROR),
    "random-preface": (np.random.default_rng(7).bytes(4096), h2.PROTOCOL_ERROR),
    "settings-missing": (h2.PREFACE + h2.frame(h2.PING, 0, 0, bytes(8)), h2.PROTOCOL_ERROR),
    "oversized-frame": (
        h2.PREFACE + settings() + h2.frame_header(1 << 20, h2.DATA, 0, 1),
        h2.FRAME_SIZE_ERROR,
    ),
    "huge-header-block": (h2.PREFACE + settings() + _huge_header_block(), h2.ENHANCE_YOUR_CALM),
    "bad-hpack": (
        h2.PREFACE + settings() + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff" * 8),
        h2.COMPRESSION_ERROR,
    ),
    "data-on-unopened-stream": (
        h2.PREFACE + settings() + h2.frame(h2.DATA, 0, 5, b"hello"),
        h2.PROTOCOL_ERROR,
    ),
    "window-overflow": (
        h2.PREFACE
        + settings()
        + 2 * h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", h2.MAX_WINDOW)),
        h2.FLOW_CONTROL_ERROR,
    ),
    "even-stream": (
        h2.PREFACE + settings() + h2.frame(h2.HEADERS, h2.END_HEADERS, 2, b"\x83"),
        h2.PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_get_goaway_and_the_server_keeps_serving(node, make_client, name, no_bugs):
    data, code = HOSTILE[name]
    with RawClient(node.server.pull_port) as client:
        client.send(data)
        goaway = client.goaway_or_close()
        assert goaway is not None, "expected a GOAWAY naming the problem"
        assert goaway_code(goaway) == code, goaway.payload[8:]
        assert client.closed_within(TIMEOUT)
    wait_until(lambda: node.server.stats()["pull_port_connections"] == 0, "the connection to end")
    assert_serves(node, make_client)


def test_random_frames_never_break_the_server(node, make_client, no_bugs):
    rng = np.random.default_rng(11)
    for _ in range(30):
        frames = b"".join(
            h2.frame(
                int(rng.integers(0, 12)),
                int(rng.integers(0, 256)),
                int(rng.integers(0, 8)),
                rng.bytes(int(rng.integers(0, 40))),
            )
            for _ in range(int(rng.integers(1, 8)))
        )
        with RawClient(node.server.pull_port) as client:
            client.send(h2.PREFACE + settings() + frames)
            client.closed_within(0.2)
    wait_until(lambda: node.server.stats()["pull_port_connections"] == 0, "connections to end")
    assert_serves(node, make_client)


def test_connections_beyond_the_limit_are_closed_at_accept(make_client, no_bugs):
    with serve_rows(pull_options=PullServerOptions(max_connections=2)) as node:
        first, second = RawClient(node.server.pull_port), RawClient(node.server.pull_port)
        try:
            first.handshake()
            second.handshake()
            with RawClient(node.server.pull_port) as third:
                assert third.read_frame() is None
            assert node.server.stats()["pull_port_refused_connections"] == 1
        finally:
            first.close()
            second.close()
        wait_until(lambda: node.server.stats()["pull_port_connections"] == 0, "connections to end")
        assert_serves(node, make_client)


def test_silent_and_idle_clients_are_closed(make_client, no_bugs):
    options = PullServerOptions(request_timeout_s=0.5, idle_timeout_s=0.5)
    with serve_rows(pull_options=options) as node:
        with RawClient(node.server.pull_port) as silent:  # no preface at all
            assert silent.closed_within(TIMEOUT)
        with RawClient(node.server.pull_port) as idle:  # a preface, then nothing
            idle.handshake()
            goaway = idle.goaway_or_close()
            assert goaway is not None and goaway_code(goaway) == h2.NO_ERROR
        with RawClient(node.server.pull_port) as slow:  # a request whose body never comes
            slow.handshake()
            lease_id = lease(node)
            slow.send(slow.request(1, pull_body(lease_id), end_stream=False)[:-10])
            goaway = slow.goaway_or_close()
            assert goaway is not None and goaway_code(goaway) == h2.ENHANCE_YOUR_CALM
            release(node, lease_id)
        assert_serves(node, make_client)


def test_stop_while_streaming_is_bounded_and_releases_every_pin(no_bugs):
    with serve_rows(32, 1 << 20) as node:
        parked, blocked = RawClient(node.server.pull_port), RawClient(node.server.pull_port)
        try:
            parked.handshake(SMALL_WINDOW)
            parked.send(parked.request(1, pull_body(lease(node))))
            blocked.handshake(HUGE_WINDOW)
            blocked.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
            blocked.send(blocked.request(1, pull_body(lease(node))))
            wait_until(lambda: node.server.stats()["chunks_served"] > 0, "the pulls to start")
            began = time.monotonic()
            node.server.stop(grace=0.2)
            assert time.monotonic() - began < 5
            assert node.source.total_pins() == 0
            assert parked.closed_within(TIMEOUT)
            assert blocked.closed_within(TIMEOUT)
        finally:
            parked.close()
            blocked.close()


# -- Zero copy ---------------------------------------------------------------------------------


STRACE = shutil.which("strace")


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_each_row_goes_to_the_kernel_as_its_own_iovec(tmp_path, make_client):
    """strace on a chunk server process: every row leaves in a sendmsg whose iovec is the row."""
    chunk_bytes, rows = 1 << 20, 8
    log_path = tmp_path / "strace.log"
    with ChunkNode(num_chunks=rows, chunk_bytes=chunk_bytes) as node:
        pid = node.process.pid
        # -s 8: short strings, and arrays (the iovecs) of up to 8 elements in full.
        command = [STRACE, "-f", "-qq", "-e", "trace=sendmsg", "-s", "8", "-o", str(log_path)]
        tracer = subprocess.Popen(
            [*command, "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: _all_traced(pid), "strace to attach")
            client = make_client(node.endpoint, chunk_bytes=chunk_bytes)
            keys = synthetic_keys(rows, 1)
            answer = client.lookup(keys)
            dest = np.zeros((rows, chunk_bytes), dtype=np.uint8)
            result = client.pull(answer.lease_id, targets_for(keys, dest))
            assert result.complete, result.error
            assert client.handshake().pull_port != 0
        finally:
            tracer.terminate()
            tracer.wait(30)
    calls = [line for line in log_path.read_text().splitlines() if "sendmsg(" in line]
    whole_rows = [line for line in calls if f"iov_len={chunk_bytes}}}" in line.replace(" ", "")]
    assert len(whole_rows) >= rows, calls[:5]
    for line in whole_rows:  # frame header, gRPC prefix + Chunk header, then the row itself
        lengths = [int(n) for n in re.findall(r"iov_len=(\d+)", line)]
        assert lengths[-1] == chunk_bytes and len(lengths) >= 3, line


def _all_traced(pid: int) -> bool:
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    return all(
        "TracerPid:\t0" not in (task / "status").read_text() for task in tasks if task.exists()
    )


# -- The tier key ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0), (7701, 7701), ("off", None)], ids=["free", "fixed", "off"]
)
def test_tier_key_pull_port_accepts_a_port_or_off(value, expected):
    config = TierConfig.from_kwargs({"listen": "127.0.0.1:7601", "pull_port": value})
    assert config.pull_port == expected


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (
            {"listen": "127.0.0.1:7601", "pull_port": -1},
            "pull_port: expected a port (0: any free port) or 'off', got -1",
        ),
        ({"pull_port": 70000}, "pull_port: expected a port"),
        ({"pull_port": True}, "pull_port: expected a port"),
        ({"pull_port": "7701"}, "pull_port: expected a port"),
        (
            {"listen": "127.0.0.1:7601", "pull_port": 7601},
            "pull_port: must differ from listen's port 7601",
        ),
    ],
)
def test_tier_key_pull_port_refuses_bad_values_naming_the_key(kwargs, words):
    with pytest.raises(ConfigError) as refused:
        TierConfig.from_kwargs(kwargs)
    assert words in str(refused.value)


def test_a_pull_port_in_use_is_a_config_error_naming_the_key():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with (
            pytest.raises(ConfigError, match=f"pull_port: cannot bind 127.0.0.1:{port}"),
            serve_rows(pull_port=port),
        ):
            pass
