"""TLS, mutual TLS and the bearer token on a real peer server, configured as users write them.

Certificates are generated per test session (:mod:`tests.support.certs`); the
Security objects come from ``Security.from_config`` with the same ``tls`` dict and
``auth_token_file`` a tier config holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpeer.api.errors import KVPeerError, PeerUnavailableError
from kvpeer.api.security import Security
from kvpeer.bench.rows import synthetic_keys, synthetic_rows
from tests.support.certs import CertFiles, make_certs, tls_client, tls_server
from tests.support.chunk_node import ChunkNode
from tests.support.peer import (
    CHUNK_BYTES,
    Node,
    make_client_fixture,  # noqa: F401 - fixture
    serve_rows,
    targets_for,
)

TOKEN = "cluster-token-7f3a"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return path


def pulls_everything(client, node: Node) -> bool:
    answer = client.lookup(node.keys[:4])
    dest = np.zeros((4, CHUNK_BYTES), dtype=np.uint8)
    result = client.pull(answer.lease_id, targets_for(node.keys[:4], dest), streams=2)
    client.release(answer.lease_id)
    return result.complete and np.array_equal(dest, node.rows[:4])


@pytest.fixture
def tls_node(certs) -> Iterator[Node]:
    with serve_rows(security=Security.from_config(tls_server(certs))) as started:
        yield started


@pytest.fixture
def mtls_node(certs) -> Iterator[Node]:
    with serve_rows(security=Security.from_config(tls_server(certs, mutual=True))) as started:
        yield started


@pytest.fixture
def token_node(token_file) -> Iterator[Node]:
    with serve_rows(security=Security.from_config(auth_token_file=str(token_file))) as started:
        yield started


def test_tls_client_pulls_from_tls_server(tls_node, certs, make_client):
    client = make_client(
        tls_node.endpoint, security=Security.from_config(tls_client(certs, with_cert=False))
    )
    assert pulls_everything(client, tls_node)


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_node, make_client):
    client = make_client(tls_node.endpoint, rpc_timeout_s=3.0)
    with pytest.raises(PeerUnavailableError):
        client.handshake()


def test_mutual_tls_accepts_a_client_certificate_from_its_ca(mtls_node, certs, make_client):
    client = make_client(mtls_node.endpoint, security=Security.from_config(tls_client(certs)))
    assert pulls_everything(client, mtls_node)


@pytest.mark.parametrize(
    "client_tls",
    [
        pytest.param({"with_cert": False}, id="no-client-cert"),
        pytest.param({"rogue": True}, id="cert-from-another-ca"),
    ],
)
def test_mutual_tls_refuses_other_clients(mtls_node, certs, make_client, client_tls):
    security = Security.from_config(tls_client(certs, **client_tls))
    client = make_client(mtls_node.endpoint, security=security, rpc_timeout_s=3.0)
    with pytest.raises(PeerUnavailableError):
        client.handshake()
    assert mtls_node.server.stats()["handshakes"] == 0


def test_token_is_required_and_checked(token_node, token_file, tmp_path, make_client):
    missing = make_client(token_node.endpoint)
    with pytest.raises(KVPeerError, match="UNAUTHENTICATED: missing bearer token"):
        missing.handshake()
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("not-the-token")
    wrong = make_client(
        token_node.endpoint, security=Security.from_config(auth_token_file=str(wrong_file))
    )
    with pytest.raises(KVPeerError, match="UNAUTHENTICATED: wrong bearer token"):
        wrong.lookup(token_node.keys[:1])
    right = make_client(
        token_node.endpoint, security=Security.from_config(auth_token_file=str(token_file))
    )
    assert pulls_everything(right, token_node)


def test_health_check_needs_no_token(token_node):
    with grpc.insecure_channel(token_node.endpoint) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvpeer.v1.KVPeer"), timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_chunk_node_process_with_mutual_tls_and_token(certs, token_file, make_client):
    rows, size = 4, 32 << 10
    server_args = [
        f"--tls-cert={certs.server_cert}",
        f"--tls-key={certs.server_key}",
        f"--tls-ca={certs.ca}",
        f"--token-file={token_file}",
    ]
    with ChunkNode(num_chunks=rows, chunk_bytes=size, seed=2, extra_args=server_args) as node:
        security = Security.from_config(tls_client(certs), str(token_file))
        client = make_client(node.endpoint, chunk_bytes=size, security=security)
        keys = synthetic_keys(rows, 2)
        answer = client.lookup(keys)
        dest = np.zeros((rows, size), dtype=np.uint8)
        result = client.pull(answer.lease_id, targets_for(keys, dest))
        assert result.complete, result.error
        assert np.array_equal(dest, synthetic_rows(rows, size, 2))
