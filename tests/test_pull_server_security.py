"""The fast Pull listener (kvpeer.transport.pull_server): security, bounds and lifecycle.

TLS, mutual TLS and the token on the pull port; revocation, slow, resetting and
stopping clients; hostile bytes (:class:`tests.support.pull_server.RawClient`
speaks HTTP/2 by hand, so a test can stop reading, reset a stream or send
garbage), the connection limit, silent and idle clients, and a bounded stop.
Each hostile connection is checked for a clean GOAWAY or close, and afterwards
the server still serves and holds no pins. What it speaks to real clients:
``test_pull_server_protocol.py``.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.security import Security
from kvpeer.transport import frames as h2
from kvpeer.transport.connection import CallError
from kvpeer.transport.pull_client import H2PullTransport
from kvpeer.transport.pull_server import PullServerOptions
from kvpeer.transport.pull_stream import REVOKED_MESSAGE
from kvpeer.v1 import peer_pb2, peer_pb2_grpc
from tests.support.certs import make_certs, tls_client, tls_server
from tests.support.h2server import settings
from tests.support.peer import (
    CHUNK_BYTES,
    make_client_fixture,  # noqa: F401 - fixture
    node_fixture,  # noqa: F401 - fixture
    serve_rows,
    wait_until,
)
from tests.support.pull_port import (
    HUGE_WINDOW,
    SMALL_WINDOW,
    TIMEOUT,
    assert_serves,
    lease,
    no_bugs_fixture,  # noqa: F401 - fixture
    pull_all,
    release,
)
from tests.support.pull_server import RawClient, goaway_code, pull_body

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
