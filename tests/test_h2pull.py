"""Pulls against hostile and scripted servers, over TLS, and past the h2 transport's window.

A scripted server (:mod:`tests.support.h2server`) answers exactly the bytes a test
wrote, so these tests show what a client does with a peer that sends duplicate,
unasked-for, short or long rows, garbage, broken HTTP/2 or error statuses: a clean
partial result naming the problem, no row reported loaded unless it arrived whole
and verified, no hang and no exception. Both pull transports run every test
whose outcome is theirs alike; a few check h2-only wording or flow control.
"""

from __future__ import annotations

import struct
import time

import hpack
import numpy as np
import pytest

from kvpeer.api.security import Security
from kvpeer.api.wire import encode_chunk
from kvpeer.client.peer import PullTarget
from kvpeer.sim.relay import Relay
from kvpeer.transport.connection import WINDOW
from tests.support.certs import make_certs, tls_client, tls_server
from tests.support.h2server import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    RST_STREAM,
    ScriptedServer,
    frame,
    grpc_message,
    headers,
    response,
    settings,
)
from tests.support.peer import (
    make_client_fixture,  # noqa: F401 - fixture
    node_fixture,  # noqa: F401 - fixture
    serve_rows,
    targets_for,
    wait_until,
)
from tests.support.pull import (
    SENTINEL,
    pull_client_fixture,  # noqa: F401 - fixture
    sentinel_buffer,
    transport_fixture,  # noqa: F401 - fixture
)

#: Small rows: a scripted answer must fit the 64 KiB a client's windows allow at first.
CHUNK = 4096
ROWS = np.random.default_rng(3).integers(0, 256, size=(4, CHUNK), dtype=np.uint8)
KEYS = [bytes([i + 1]) * 20 for i in range(4)]


def row(index: int, *, key: bytes | None = None, data: bytes | None = None) -> bytes:
    """The gRPC message of row ``index`` (optionally with another key or data)."""
    body = ROWS[index].tobytes() if data is None else data
    return grpc_message(encode_chunk(index, KEYS[index] if key is None else key, body))


def h2_client(make_client):
    """A ``pull_client`` for the h2 transport only."""
    return lambda endpoint, **overrides: make_client(endpoint, pull_transport="h2", **overrides)


def pull(pull_client, server: ScriptedServer, *, timeout_s: float = 10.0):
    """Pull rows 0-3 from ``server`` with a new client (any lease id: the server does not care)."""
    return pull_with(pull_client(server.endpoint, chunk_bytes=CHUNK), timeout_s=timeout_s)


def pull_with(client, *, timeout_s: float = 10.0):
    """Pull rows 0-3 with ``client``; check that rows reported loaded are right."""
    dest = sentinel_buffer(4, CHUNK)
    flat = memoryview(dest).cast("B")
    targets = [PullTarget(i, KEYS[i], flat[i * CHUNK : (i + 1) * CHUNK]) for i in range(4)]
    began = time.monotonic()
    result = client.pull("lease", targets, timeout_s=timeout_s)
    assert time.monotonic() - began < timeout_s + 3, "the pull overran its deadline"
    for i, loaded in enumerate(result.loaded):
        if loaded:
            assert np.array_equal(dest[i], ROWS[i]), f"row {i} reported loaded but differs"
    return result, dest


# -- A well-behaved script, in every shape HTTP/2 allows ----------------------------------


def test_scripted_rows_load(pull_client):
    with ScriptedServer(response([row(i) for i in range(4)])) as server:
        result, _ = pull(pull_client, server)
    assert result.complete, result.error


def script(data_frames: list[bytes]) -> bytes:
    """A valid answer in shapes a grpc-core server never sends: the header block split
    over HEADERS and CONTINUATION, a PING first, rows in ``data_frames``."""
    encoder = hpack.Encoder()
    block = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    return b"".join(
        [
            settings(),
            frame(PING, 0, 0, b"pingpong"),
            frame(HEADERS, 0, 1, block[:3]),
            frame(CONTINUATION, END_HEADERS, 1, block[3:]),
            *data_frames,
            headers(encoder, [("grpc-status", "0")], end_stream=True),
        ]
    )


def test_continuation_ping_and_odd_frame_sizes_are_understood(pull_client):
    body = b"".join(row(i) for i in range(4))
    data = [frame(DATA, 0, 1, body[i : i + 999]) for i in range(0, len(body), 999)]
    with ScriptedServer(script(data)) as server:
        result, _ = pull(pull_client, server)
        assert result.complete, result.error
        wait_until(
            lambda: frame(PING, ACK, 0, b"pingpong") in server.received, "the client's PING ACK"
        )


def test_h2_reads_padded_data_frames(make_client):
    """RFC 9113 allows padding; grpc-core refuses it ("unsupported data flags"), h2 reads it."""
    body = b"".join(row(i) for i in range(4))
    data = [
        frame(DATA, PADDED, 1, bytes([7]) + body[i : i + 1000] + bytes(7))
        for i in range(0, len(body), 1000)
    ]
    with ScriptedServer(script(data)) as server:
        result, _ = pull(h2_client(make_client), server)
    assert result.complete, result.error


# -- Rows that break the Chunk contract -------------------------------------------------------


def test_duplicate_row_is_refused(pull_client):
    with ScriptedServer(response([row(0), row(0), row(1)])) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [True, False, False, False]
    assert "row 0, which was not asked for or sent twice" in result.error


def test_stream_ending_with_rows_missing_is_a_partial_result(pull_client):
    with ScriptedServer(response([row(2), row(3)])) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [False, False, True, True]
    assert "2 rows missing" in result.error


def test_row_not_asked_for_is_refused(pull_client):
    stranger = grpc_message(encode_chunk(9, KEYS[0], ROWS[0].tobytes()))
    with ScriptedServer(response([row(0), stranger, row(1)])) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [True, False, False, False]
    assert "row 9, which was not asked for" in result.error


def test_row_under_the_wrong_key_is_skipped_and_the_rest_load(pull_client):
    with ScriptedServer(response([row(0, key=KEYS[1]), row(1), row(2), row(3)])) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [False, True, True, True]
    assert f"expected {KEYS[0].hex()}" in result.error


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(ROWS[0].tobytes()[:-1], id="one-byte-short"),
        pytest.param(ROWS[0].tobytes() + b"!", id="one-byte-long"),
        pytest.param(b"", id="empty"),
    ],
)
def test_row_of_the_wrong_size_is_refused(pull_client, data):
    with ScriptedServer(response([row(0, data=data), row(1)])) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [False] * 4
    assert "bad frame" in result.error


def test_corrupted_row_fails_its_digest(pull_client):
    damaged = bytearray(row(1))
    damaged[-100] ^= 0x01
    with ScriptedServer(response([row(0), bytes(damaged), row(2), row(3)])) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [True, False, True, True]
    assert "row 1: digest mismatch" in result.error


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"\x00" + struct.pack(">I", 1 << 30) + b"\x08\x00", id="1-GiB-length"),
        pytest.param(
            grpc_message(encode_chunk(0, KEYS[0], ROWS[0].tobytes()), compressed=True),
            id="compressed",
        ),
    ],
)
def test_oversized_or_compressed_message_is_refused(pull_client, message):
    with ScriptedServer(response([message]), close_after=True) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [False] * 4
    assert result.error is not None


# -- Statuses and endings -------------------------------------------------------------------


def test_error_status_after_some_rows_keeps_them(pull_client):
    reply = response([row(0), row(1)], status=8, message="too busy, 50% of slots taken")
    with ScriptedServer(reply) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [True, True, False, False]
    assert "RESOURCE_EXHAUSTED: too busy, 50% of slots taken" in result.error


@pytest.mark.parametrize(
    ("ending", "status"),
    [
        pytest.param(frame(RST_STREAM, 0, 1, struct.pack(">I", 7)), "UNAVAILABLE", id="refused"),
        pytest.param(frame(RST_STREAM, 0, 1, struct.pack(">I", 2)), "INTERNAL", id="reset"),
        pytest.param(b"", "UNAVAILABLE", id="closed"),
    ],
)
def test_stream_cut_off_after_a_row(pull_client, transport, ending, status):
    reply = response([row(0), row(1)[:-1000]], trailers=False) + ending
    with ScriptedServer(reply, close_after=True) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded[1:] == [False, False, False]
    assert status in result.error
    if transport == "h2":
        # h2 reads the socket in order, so a row that arrived before the end is kept;
        # grpcio drops the messages it holds unread when a stream fails.
        assert result.loaded[0]


def test_goaway_before_the_stream_is_unavailable(pull_client):
    reply = settings() + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0))
    with ScriptedServer(reply, close_after=True) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [False] * 4
    assert "UNAVAILABLE" in result.error


def test_http_error_status_maps_to_grpc_status(pull_client):
    encoder = hpack.Encoder()
    reply = settings() + headers(encoder, [(":status", "503")], end_stream=True)
    with ScriptedServer(reply) as server:
        result, _ = pull(pull_client, server)
    assert result.loaded == [False] * 4
    assert "UNAVAILABLE" in result.error


def test_stream_ending_without_grpc_status_is_an_error(pull_client):
    reply = response([row(0)], trailers=False) + frame(DATA, END_STREAM, 1)
    with ScriptedServer(reply) as server:
        result, _ = pull(pull_client, server)
    assert result.error is not None
    assert not all(result.loaded)


# -- Not HTTP/2 at all, or HTTP/2 used as a weapon ---------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", id="http1"),
        pytest.param(np.random.default_rng(5).bytes(100_000), id="random-bytes"),
        pytest.param(settings() + frame(0x42, 0, 0, bytes(1 << 20)), id="1-MiB-unknown-frame"),
        pytest.param(
            settings()
            + frame(HEADERS, 0, 1, b"\x88")
            + b"".join(frame(CONTINUATION, 0, 1, bytes(16000)) for _ in range(8)),
            id="endless-header-block",
        ),
        pytest.param(settings() + frame(DATA, 0, 1, bytes(100)), id="data-before-headers"),
    ],
)
def test_garbage_server_gives_a_clean_error(pull_client, reply):
    with ScriptedServer(reply, answer_at_once=True) as server:
        result, _ = pull(pull_client, server, timeout_s=2.0)
    assert result.loaded == [False] * 4
    assert result.error is not None


def test_h2_names_a_server_that_does_not_speak_http2(make_client):
    with ScriptedServer(b"HTTP/1.1 400 Bad Request\r\n\r\n", answer_at_once=True) as server:
        result, _ = pull(h2_client(make_client), server)
    assert "did not start with HTTP/2 SETTINGS" in result.error


def test_silent_server_ends_at_the_deadline(pull_client):
    with ScriptedServer(b"", answer_at_once=True) as server:
        began = time.monotonic()
        result, _ = pull(pull_client, server, timeout_s=0.5)
        assert time.monotonic() - began < 3
    assert result.loaded == [False] * 4
    assert "DEADLINE_EXCEEDED" in result.error


# -- TLS, mutual TLS and the token ------------------------------------------------------------------


TOKEN = "pull-token-5b1e"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return make_certs(tmp_path_factory.mktemp("certs"), server_names=("kvpeer.test",))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN)
    return path


def tls_pull(client, lease_client, node, count: int = 4):
    """Lease ``count`` rows through ``lease_client``, pull them with ``client`` (2 streams)."""
    answer = lease_client.lookup(node.keys[:count])
    dest = sentinel_buffer(count, node.rows.shape[1])
    result = client.pull(answer.lease_id, targets_for(node.keys[:count], dest), streams=2)
    lease_client.release(answer.lease_id)
    return result, dest


def test_tls_with_server_name_override(certs, pull_client):
    """The certificate names kvpeer.test; the client dials 127.0.0.1 and verifies that name."""
    with serve_rows(security=Security.from_config(tls_server(certs))) as node:
        tls = {"ca": str(certs.ca), "server_name": "kvpeer.test"}
        client = pull_client(node.endpoint, security=Security.from_config(tls))
        result, dest = tls_pull(client, client, node)
        assert result.complete, result.error
        assert np.array_equal(dest, node.rows[:4])
        unverified = pull_client(
            node.endpoint, security=Security.from_config({"ca": str(certs.ca)})
        )
        result, dest = tls_pull(unverified, client, node)
    assert result.loaded == [False] * 4
    assert "UNAVAILABLE" in result.error
    assert (dest == SENTINEL).all()


def test_mutual_tls_and_token(certs, token_file, tmp_path, pull_client):
    server = Security.from_config(tls_server(certs, mutual=True), str(token_file))
    tls = tls_client(certs) | {"server_name": "kvpeer.test"}
    with serve_rows(security=server) as node:
        good = pull_client(node.endpoint, security=Security.from_config(tls, str(token_file)))
        result, dest = tls_pull(good, good, node)
        assert result.complete, result.error
        assert np.array_equal(dest, node.rows[:4])

        wrong_token = tmp_path / "wrong"
        wrong_token.write_text("not-the-token")
        intruder = pull_client(node.endpoint, security=Security.from_config(tls, str(wrong_token)))
        result, _ = tls_pull(intruder, good, node)
        assert result.loaded == [False] * 4
        assert "UNAUTHENTICATED: wrong bearer token" in result.error

        no_cert = tls_client(certs, with_cert=False) | {"server_name": "kvpeer.test"}
        anonymous = pull_client(
            node.endpoint, security=Security.from_config(no_cert, str(token_file))
        )
        result, _ = tls_pull(anonymous, good, node)
        assert result.loaded == [False] * 4
        assert "UNAVAILABLE" in result.error
        assert node.server.stats()["chunks_served"] == 4


# -- Flow control --------------------------------------------------------------------------------


def test_h2_pull_larger_than_its_window(make_client):
    """The server may only send WINDOW bytes until the client gives some back."""
    size = 1 << 20
    rows = WINDOW // size + 8
    with serve_rows(rows, size, seed=6) as node:
        client = h2_client(make_client)(node.endpoint, chunk_bytes=size)
        answer = client.lookup(node.keys)
        dest = np.zeros((rows, size), dtype=np.uint8)
        result = client.pull(answer.lease_id, targets_for(node.keys, dest), timeout_s=60)
        assert result.complete, result.error
        assert np.array_equal(dest, node.rows)


# -- Connection reuse (h2) -----------------------------------------------------------------------


def test_h2_back_to_back_pulls_reuse_their_connections(node, make_client):
    with Relay(node.endpoint) as relay:
        client = h2_client(make_client)(relay.endpoint)
        answer = client.lookup(node.keys)
        for _ in range(3):
            dest = sentinel_buffer(len(node.keys), node.rows.shape[1])
            result = client.pull(answer.lease_id, targets_for(node.keys, dest), streams=2)
            assert result.complete, result.error
            assert np.array_equal(dest, node.rows)
        assert relay.connections == 1 + 2  # the control channel and one per stream


def test_h2_idle_connection_the_server_closed_is_replaced(make_client):
    """The server drops the idle connection as the next call starts: the call runs again."""
    with ScriptedServer(response([row(i) for i in range(4)]), close_on_reuse=True) as server:
        client = h2_client(make_client)(server.endpoint, chunk_bytes=CHUNK)
        for _ in range(2):
            result, _ = pull_with(client)
            assert result.complete, result.error
        assert server.connections == 2


def test_h2_idle_connection_the_server_pinged_is_not_reused(make_client):
    reply = response([row(i) for i in range(4)]) + frame(PING, 0, 0, b"areyouup")
    with ScriptedServer(reply) as server:
        client = h2_client(make_client)(server.endpoint, chunk_bytes=CHUNK)
        for _ in range(2):
            result, _ = pull_with(client)
            assert result.complete, result.error
        assert server.connections == 2
