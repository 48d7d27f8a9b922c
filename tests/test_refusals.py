"""Every way in without the right credentials is refused, on every method of both services
and on the pull port, and the refusal tells the caller nothing about the cluster.

Both servers run mutual TLS with ``tls.identity`` and node tokens (the strictest
configuration); callers present: nothing (plaintext), TLS without a client
certificate, a certificate from another CA, an expired certificate, the right
certificate with no token or a wrong one.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvpeer.api.security import Security
from kvpeer.server.directory.service import DirectoryServer
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import peer_pb2
from tests.support.directory import FP_A, keys
from tests.support.identity_certs import IdentityCA
from tests.support.peer import FINGERPRINT, Node, serve_rows
from tests.support.pull_server import RawClient, pull_body

TOKEN = "node-a-secret-5d1e"
ENDPOINT_A = "node-a.internal.test:7601"


@dataclass
class Cluster:
    ca: IdentityCA
    rogue: IdentityCA
    directory: DirectoryServer
    peer: Node
    token_file: Path
    lease_id: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("refusals")
    ca, rogue = IdentityCA(tmp / "ca"), IdentityCA(tmp / "rogue", name="rogue CA")
    token_file = tmp / "node-a.token"
    token_file.write_text(TOKEN)
    table = tmp / "tokens.json"
    table.write_text(json.dumps({"node-a": str(token_file)}))
    server = Security.from_config(ca.server_tls(identity="san-dns"), node_tokens=str(table))
    good = Security.from_config(
        ca.client_tls(ca.client("node-a", dns="node-a")), auth_token_file=str(token_file)
    )
    directory = DirectoryServer("127.0.0.1:0", security=server).start()
    with serve_rows(security=server) as peer:
        with good.open_channel(f"localhost:{directory.port}") as channel:
            stub = channel.unary_unary("/kvpeer.v1.Directory/Join")
            join = pb.JoinRequest(
                node_id="node-a", endpoint=ENDPOINT_A, fingerprint=FP_A.to_proto()
            )
            epoch = pb.JoinResponse.FromString(stub(join.SerializeToString(), timeout=10)).epoch
            publish = channel.unary_unary("/kvpeer.v1.Directory/Publish")
            publish(
                pb.PublishRequest(node_id="node-a", epoch=epoch, keys=keys(3)).SerializeToString(),
                timeout=10,
            )
        with good.open_channel(f"localhost:{peer.server.port}") as channel:
            lookup = channel.unary_unary("/kvpeer.v1.KVPeer/Lookup")
            request = peer_pb2.LookupRequest(
                fingerprint=FINGERPRINT.digest, keys=peer.keys[:2], hold=True
            )
            lease_id = peer_pb2.LookupResponse.FromString(
                lookup(request.SerializeToString(), timeout=10)
            ).lease_id
        yield Cluster(ca, rogue, directory, peer, token_file, lease_id)
    directory.stop(grace=None)


def bad_credentials(c: Cluster, name: str, tmp: Path) -> Security:
    wrong = tmp / "wrong.token"
    wrong.write_text("node-a-secret-5d1f")
    node_a = c.ca.client("node-a-again", dns="node-a")
    return {
        "plaintext": lambda: Security(),
        "no-client-cert": lambda: Security.from_config(c.ca.client_tls(None), str(c.token_file)),
        "other-ca": lambda: Security.from_config(
            {"ca": str(c.ca.ca), **_leaf(c.rogue.client("intruder", dns="node-a"))},
            str(c.token_file),
        ),
        "expired-cert": lambda: Security.from_config(
            c.ca.client_tls(c.ca.client("expired", dns="node-a", expired=True)), str(c.token_file)
        ),
        "no-token": lambda: Security.from_config(c.ca.client_tls(node_a)),
        "wrong-token": lambda: Security.from_config(c.ca.client_tls(node_a), str(wrong)),
    }[name]()


def _leaf(leaf) -> dict[str, str]:
    return {"cert": str(leaf.cert), "key": str(leaf.key)}


CREDENTIALS = ["plaintext", "no-client-cert", "other-ca", "expired-cert", "no-token", "wrong-token"]
DIRECTORY_METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Directory"].methods]
PEER_METHODS = ["Handshake", "Lookup", "Pull", "Release"]


def assert_nothing_leaked(details: str) -> None:
    for secret in (TOKEN, ENDPOINT_A, "node-a.internal", FP_A.digest):
        assert secret not in details, details


@pytest.mark.parametrize("credentials", CREDENTIALS)
def test_every_method_refuses_bad_credentials(cluster, credentials, tmp_path) -> None:
    security = bad_credentials(cluster, credentials, tmp_path)
    stats_before = cluster.peer.server.stats()
    targets = [
        (cluster.directory.port, "kvpeer.v1.Directory", m, False) for m in DIRECTORY_METHODS
    ] + [(cluster.peer.server.port, "kvpeer.v1.KVPeer", m, m == "Pull") for m in PEER_METHODS]
    requests = {
        "Locate": pb.LocateRequest(fingerprint=FP_A.digest, keys=keys(3)).SerializeToString(),
        "ListNodes": b"",
        "Lookup": peer_pb2.LookupRequest(
            fingerprint=FINGERPRINT.digest, keys=cluster.peer.keys[:1]
        ).SerializeToString(),
        "Pull": peer_pb2.PullRequest(lease_id=cluster.lease_id).SerializeToString(),
    }
    for port, service, method, streaming in targets:
        with security.open_channel(f"localhost:{port}") as channel:
            path = f"/{service}/{method}"
            call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
            with pytest.raises(grpc.RpcError) as info:
                answer = call(requests.get(method, b""), timeout=10)
                list(answer) if streaming else None
            error = info.value
            assert error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.UNAUTHENTICATED,
            ), (method, error)
            assert_nothing_leaked(error.details() or "")
    stats = cluster.peer.server.stats()
    for counter in ("handshakes", "lookups", "pulls", "chunks_served"):
        assert stats[counter] == stats_before[counter], counter


def _pull_port_answer(cluster: Cluster, security: Security) -> tuple[int | None, bytes]:
    """(grpc-status, data bytes) of a Pull on the pull port; (None, b"") if the link failed."""
    raw = RawClient(cluster.peer.server.pull_port, timeout_s=5.0)
    try:
        context = security.client_ssl_context()
        if context is not None:
            raw.sock = context.wrap_socket(raw.sock, server_hostname="localhost")
        raw.handshake()
        extra = [("authorization", f"Bearer {security.token}")] if security.token else []
        raw.send(raw.request(1, pull_body(cluster.lease_id), extra=extra))
        response = raw.response(1)
        return response.status, bytes(response.data)
    except (ssl.SSLError, OSError, AssertionError):
        return None, b""
    finally:
        raw.close()


@pytest.mark.parametrize("credentials", CREDENTIALS)
def test_pull_port_refuses_bad_credentials(cluster, credentials, tmp_path) -> None:
    security = bad_credentials(cluster, credentials, tmp_path)
    served = cluster.peer.server.stats()["chunks_served"]
    status, data = _pull_port_answer(cluster, security)
    assert status in (None, grpc.StatusCode.UNAUTHENTICATED.value[0]), status
    assert data == b""
    assert TOKEN.encode() not in data
    assert cluster.peer.server.stats()["chunks_served"] == served


def test_pull_port_serves_the_right_credentials(cluster, tmp_path) -> None:
    good = Security.from_config(
        cluster.ca.client_tls(cluster.ca.client("node-a-pull", dns="node-a")),
        str(cluster.token_file),
    )
    with good.open_channel(f"localhost:{cluster.peer.server.port}") as channel:
        lookup = channel.unary_unary("/kvpeer.v1.KVPeer/Lookup")
        request = peer_pb2.LookupRequest(
            fingerprint=FINGERPRINT.digest, keys=cluster.peer.keys[:1], hold=True
        )
        lease = peer_pb2.LookupResponse.FromString(lookup(request.SerializeToString(), timeout=10))
    cluster.lease_id = lease.lease_id
    status, data = _pull_port_answer(cluster, good)
    assert status == 0 and len(data) > 0
