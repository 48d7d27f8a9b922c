"""The fast Pull listener (kvpeer.transport.pull_server): what it speaks, to real clients and raw ones.

Real clients: kvpeer's own (PeerClient, h2 transport), grpcio's generated stub
and grpcurl with the .proto read the pull port as an ordinary chunk stream, and
a client falls back to the main port and back. The pull port's refusals are the
grpcio port's word for word; one call at a time per connection, one method
(checked with :class:`tests.support.pull_server.RawClient`, which speaks HTTP/2
by hand); each row goes to the kernel as its own iovec; the tier's
``pull_port`` key. Its security, bounds and lifecycle: ``test_pull_server_security.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvpeer.api.errors import ConfigError
from kvpeer.api.limits import MAX_REQUEST_BYTES
from kvpeer.api.wire import digest
from kvpeer.bench.rows import synthetic_keys
from kvpeer.sim.relay import Relay
from kvpeer.tier.config import TierConfig
from kvpeer.transport import frames as h2
from kvpeer.v1 import peer_pb2, peer_pb2_grpc
from tests.support.chunk_node import ChunkNode
from tests.support.peer import (
    Node,
    make_client_fixture,  # noqa: F401 - fixture
    node_fixture,  # noqa: F401 - fixture
    serve_rows,
    targets_for,
    wait_until,
)
from tests.support.pull_port import (
    SMALL_WINDOW,
    TIMEOUT,
    lease,
    no_bugs_fixture,  # noqa: F401 - fixture
    pull_all,
    release,
)
from tests.support.pull_server import RawClient, pull_body

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


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


# -- One call at a time, one method --------------------------------------------------------------


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
