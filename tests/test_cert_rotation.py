"""Certificate rotation under traffic: servers pick up new PEM files without a restart.

A directory and a chunk server (gRPC port and pull port) serve mutual TLS from
files; clients keep locating and pulling over fresh connections while the
server certificate and key are replaced (atomically, as cert-manager or an
operator's ``mv`` does). No call may fail, no directory entry may be lost, and
new connections must see the new certificate on every port.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvpeer.api.security import Security
from kvpeer.client.peer import PeerClient
from kvpeer.server.directory.service import DirectoryServer
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.directory import FP_A, keys
from tests.support.identity_certs import IdentityCA
from tests.support.peer import CHUNK_BYTES, FINGERPRINT, serve_rows, targets_for


def served_cert(port: int, client: Security) -> bytes:
    """The DER certificate a new TLS connection to ``port`` is shown."""
    context = client.client_ssl_context()
    assert context is not None
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def replace_atomically(source: Path, target: Path) -> None:
    staging = target.with_suffix(".new")
    staging.write_bytes(source.read_bytes())
    os.replace(staging, target)


@pytest.mark.slow
def test_rotation_under_traffic_drops_nothing(tmp_path: Path) -> None:
    ca = IdentityCA(tmp_path / "ca")
    old, new = ca.server(tag="-old"), ca.server(tag="-new")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    replace_atomically(old.cert, live_cert)
    replace_atomically(old.key, live_key)
    server = Security.from_config(
        {"cert": str(live_cert), "key": str(live_key), "ca": str(ca.ca), "identity": "san-dns"}
    )
    client = Security.from_config(ca.client_tls(ca.client("node-a", dns="node-a")))

    failures: list[str] = []
    rounds = {"pulls": 0, "locates": 0}
    stop = threading.Event()
    with (
        DirectoryServer("127.0.0.1:0", security=server) as directory,
        serve_rows(security=server) as node,
    ):
        target = f"localhost:{directory.port}"
        with client.open_channel(target) as channel:
            stub = directory_pb2_grpc.DirectoryStub(channel)
            join = pb.JoinRequest(
                node_id="node-a", endpoint="node-a.test:7601", fingerprint=FP_A.to_proto()
            )
            epoch = stub.Join(join, timeout=10).epoch
            stub.Publish(
                pb.PublishRequest(node_id="node-a", epoch=epoch, keys=keys(50)), timeout=10
            )

            def heartbeat() -> None:  # the long-lived channel: its session survives rotation
                while not stop.wait(0.2):
                    try:
                        stub.Heartbeat(
                            pb.HeartbeatRequest(node_id="node-a", epoch=epoch), timeout=10
                        )
                    except Exception as exc:
                        failures.append(f"heartbeat: {exc}")

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        with client.open_channel(target) as fresh:  # a new TLS handshake
                            answer = directory_pb2_grpc.DirectoryStub(fresh).Locate(
                                pb.LocateRequest(fingerprint=FP_A.digest, keys=keys(50)), timeout=10
                            )
                        if len(answer.holders) != 50 or any(not h.nodes for h in answer.holders):
                            failures.append("locate lost entries")
                        rounds["locates"] += 1
                        peer = PeerClient(
                            f"localhost:{node.server.port}",
                            node_id="node-a",
                            fingerprint=FINGERPRINT,
                            chunk_bytes=CHUNK_BYTES,
                            security=client,
                            rpc_timeout_s=10.0,
                        )
                        try:
                            lookup = peer.lookup(node.keys[:4])
                            dest = np.zeros((4, CHUNK_BYTES), dtype=np.uint8)
                            result = peer.pull(lookup.lease_id, targets_for(node.keys[:4], dest))
                            peer.release(lookup.lease_id)
                            if not result.complete or not np.array_equal(dest, node.rows[:4]):
                                failures.append(f"pull incomplete: {result.error}")
                            rounds["pulls"] += 1
                        finally:
                            peer.close()
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=f, daemon=True) for f in (heartbeat, traffic)]
            for thread in threads:
                thread.start()
            ports = (directory.port, node.server.port, node.server.pull_port)
            try:
                time.sleep(1.0)
                assert all(served_cert(p, client) == der_of(old.cert) for p in ports)
                before = dict(rounds)
                replace_atomically(new.key, live_key)  # key first: a mismatched pair is skipped
                replace_atomically(new.cert, live_cert)
                deadline = time.monotonic() + 20
                while any(served_cert(p, client) != der_of(new.cert) for p in ports):
                    assert time.monotonic() < deadline, "the new certificate was not picked up"
                    time.sleep(0.2)
                time.sleep(1.0)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
            assert not failures, failures[:5]
            assert rounds["pulls"] > before["pulls"] and rounds["locates"] > before["locates"]
            # Every entry is still there, under the same epoch.
            answer = stub.Locate(
                pb.LocateRequest(fingerprint=FP_A.digest, keys=keys(50)), timeout=10
            )
            assert [len(h.nodes) for h in answer.holders] == [1] * 50
            assert [n.epoch for n in answer.nodes] == [epoch]
