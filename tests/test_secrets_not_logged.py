"""No secret ever reaches a log: tokens (right, wrong, near misses) are absent from the output
of a real ``kvpeer directory`` process at DEBUG, and from every kvpeer log record of a
chunk server refusing and serving calls.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from kvpeer.api.security import Security
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc, peer_pb2, peer_pb2_grpc
from tests.support.directory import FP_A, keys
from tests.support.peer import FINGERPRINT, serve_rows

SECRETS = {
    "node-a": "sekrit-node-a-91f2",
    "node-b": "sekrit-node-b-07c4",
    "reader": "sekrit-reader-3b88",
    "shared": "sekrit-shared-aa10",
}
#: Presented but wrong: must not be echoed either.
NEAR_MISS = "sekrit-node-a-91f3"


def write_tokens(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, secret in SECRETS.items():
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(secret + "\n")
    files["table"] = tmp_path / "node-tokens.json"
    files["table"].write_text(
        json.dumps({"node-a": str(files["node-a"]), "node-b": str(files["node-b"])})
    )
    return files


def token_security(tmp_path: Path, secret: str) -> Security:
    path = tmp_path / f"client-{secret}"
    path.write_text(secret)
    return Security.from_config(auth_token_file=str(path))


def exercise_directory(endpoint: str, tmp_path: Path) -> None:
    """Right and wrong tokens, allowed and refused calls."""
    for secret in (*SECRETS.values(), NEAR_MISS):
        with token_security(tmp_path, secret).open_channel(endpoint) as channel:
            stub = directory_pb2_grpc.DirectoryStub(channel)
            join = pb.JoinRequest(
                node_id="node-a", endpoint="node-a.test:7601", fingerprint=FP_A.to_proto()
            )
            calls = [
                ("Join", join),
                ("Locate", pb.LocateRequest(fingerprint=FP_A.digest, keys=keys(2))),
                ("ListNodes", pb.ListNodesRequest()),
                ("Publish", pb.PublishRequest(node_id="node-a", epoch=99, keys=keys(1))),
            ]
            for method, request in calls:
                try:
                    getattr(stub, method)(request, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() != grpc.StatusCode.UNAVAILABLE, exc


def assert_no_secret(text: str) -> None:
    for secret in (*SECRETS.values(), NEAR_MISS):
        assert secret not in text, f"secret {secret[:8]}... in the log"
    assert "sekrit" not in text


@pytest.mark.slow
def test_directory_process_logs_no_token(tmp_path: Path) -> None:
    files = write_tokens(tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvpeer",
            "--log-level",
            "DEBUG",
            "directory",
            "--listen",
            "127.0.0.1:0",
            f"--auth-token-file={files['shared']}",
            f"--read-only-token-file={files['reader']}",
            f"--node-tokens={files['table']}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "ready on" not in line:
            assert time.monotonic() < deadline and process.poll() is None, "directory did not start"
            line = process.stdout.readline()
        endpoint = line.split("ready on ")[1].split()[0].replace("0.0.0.0", "127.0.0.1")
        exercise_directory(endpoint, tmp_path)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert "refused Join as node 'node-a'" in err  # the log does say what was refused
    assert_no_secret(line + out + err)


def test_chunk_server_logs_no_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = write_tokens(tmp_path)
    server = Security.from_config(
        auth_token_file=str(files["shared"]),
        read_only_token_file=str(files["reader"]),
        node_tokens=str(files["table"]),
    )
    caplog.set_level(logging.DEBUG, logger="kvpeer")
    with serve_rows(security=server) as node:
        for secret in (*SECRETS.values(), NEAR_MISS):
            with token_security(tmp_path, secret).open_channel(node.endpoint) as channel:
                stub = peer_pb2_grpc.KVPeerStub(channel)
                request = peer_pb2.LookupRequest(
                    fingerprint=FINGERPRINT.digest, keys=node.keys[:1], hold=True
                )
                try:
                    lease = stub.Lookup(request, timeout=10).lease_id
                    stub.Release(peer_pb2.ReleaseRequest(lease_id=lease), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    )
    assert caplog.records  # the servers did log
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records))
