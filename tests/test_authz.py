"""Identity binding and roles on real directories and chunk servers (issue 17).

Callers are real gRPC clients presenting certificates from :mod:`tests.support.identity_certs`
or role tokens; the servers are real :class:`DirectoryServer` / :class:`PeerServer`
instances configured through ``Security.from_config`` as users configure them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from kvpeer.api.errors import ConfigError
from kvpeer.api.identity import AccessPolicy, Role, identity_from_peercert
from kvpeer.api.security import Security
from kvpeer.client.peer import PeerClient, PullTarget
from kvpeer.server.directory.authz import WRITE_METHODS, NamespaceAllowList
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc, peer_pb2, peer_pb2_grpc
from tests.support.directory import (
    FP_A,
    FP_B,
    RPC_TIMEOUT_S,
    DirectoryHarness,
    keys,
    make_directory,
    rpc_error,
)
from tests.support.identity_certs import IdentityCA, Leaf
from tests.support.peer import CHUNK_BYTES, FINGERPRINT, serve_rows

__all__ = ["make_directory"]

SPIFFE = "spiffe://kvpeer.test/"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> IdentityCA:
    return IdentityCA(tmp_path_factory.mktemp("identity-ca"))


@pytest.fixture(scope="module")
def identity_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("map") / "identities.json"
    path.write_text(
        json.dumps(
            {
                f"{SPIFFE}node/a": "node-a",
                f"{SPIFFE}router": {"role": "reader"},
                f"{SPIFFE}ops": {"role": "admin"},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def leaves(ca: IdentityCA) -> dict[str, Leaf]:
    return {
        "node-a": ca.client("node-a", uri=f"{SPIFFE}node/a"),
        # Not in the map: its node id is its identity.
        "node-b": ca.client("node-b", uri="node-b"),
        "router": ca.client("router", uri=f"{SPIFFE}router"),
        "ops": ca.client("ops", uri=f"{SPIFFE}ops"),
        "no-uri": ca.client("no-uri", dns="node-a"),
    }


Dial = Callable[[DirectoryHarness, Security], directory_pb2_grpc.DirectoryStub]


@pytest.fixture
def dial() -> Iterator[Dial]:
    channels: list[grpc.Channel] = []

    def make(harness: DirectoryHarness, security: Security) -> directory_pb2_grpc.DirectoryStub:
        channel = security.open_channel(f"localhost:{harness.port}")
        channels.append(channel)
        return directory_pb2_grpc.DirectoryStub(channel)

    yield make
    for channel in channels:
        channel.close()


def as_cert(ca: IdentityCA, leaf: Leaf | None) -> Security:
    return Security.from_config(ca.client_tls(leaf))


def join_req(node_id: str, fingerprint=FP_A) -> pb.JoinRequest:
    return pb.JoinRequest(
        node_id=node_id, endpoint=f"{node_id}.test:7601", fingerprint=fingerprint.to_proto()
    )


def writes_as(
    node_id: str, epoch: int
) -> dict[str, Callable[[directory_pb2_grpc.DirectoryStub], object]]:
    """Every write method, as ``node_id`` with ``epoch``."""
    t = RPC_TIMEOUT_S
    return {
        "Join": lambda s: s.Join(join_req(node_id), timeout=t),
        "Heartbeat": lambda s: s.Heartbeat(
            pb.HeartbeatRequest(node_id=node_id, epoch=epoch), timeout=t
        ),
        "Publish": lambda s: s.Publish(
            pb.PublishRequest(node_id=node_id, epoch=epoch, keys=keys(3, "evil")), timeout=t
        ),
        "Withdraw": lambda s: s.Withdraw(
            pb.WithdrawRequest(node_id=node_id, epoch=epoch, keys=keys(10)), timeout=t
        ),
        "Leave": lambda s: s.Leave(pb.LeaveRequest(node_id=node_id, epoch=epoch), timeout=t),
    }


def holders(stub, ks: list[bytes], fingerprint=FP_A) -> list[set[tuple[str, int]]]:
    response = stub.Locate(
        pb.LocateRequest(fingerprint=fingerprint.digest, keys=ks), timeout=RPC_TIMEOUT_S
    )
    nodes = [(n.node_id, n.epoch) for n in response.nodes]
    return [{nodes[i] for i in kh.nodes} for kh in response.holders]


@pytest.fixture(params=["memory", "redis"])
def cert_directory(request, make_directory, ca, identity_map) -> DirectoryHarness:
    security = Security.from_config(ca.server_tls(identity="san-uri", identity_map=identity_map))
    return make_directory(request.param, security=security)


def test_a_node_cannot_act_as_another_node(cert_directory, dial, ca, leaves) -> None:
    node_a = dial(cert_directory, as_cert(ca, leaves["node-a"]))
    node_b = dial(cert_directory, as_cert(ca, leaves["node-b"]))
    epoch = node_a.Join(join_req("node-a"), timeout=RPC_TIMEOUT_S).epoch
    node_a.Publish(pb.PublishRequest(node_id="node-a", epoch=epoch, keys=keys(10)), timeout=10)

    # node-b knows node-a's epoch (Locate hands it out) and still cannot use it.
    for method, call in writes_as("node-a", epoch).items():
        error = rpc_error(lambda call=call: call(node_b))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert "node-b" in error.details() and "node-a" in error.details(), error.details()
        assert method in error.details()

    # node-a's entries are untouched and served; its epoch and lease still work.
    reader = dial(cert_directory, as_cert(ca, leaves["router"]))
    assert holders(reader, keys(10)) == [{("node-a", epoch)}] * 10
    assert holders(reader, keys(3, "evil")) == [set()] * 3
    node_a.Heartbeat(pb.HeartbeatRequest(node_id="node-a", epoch=epoch), timeout=RPC_TIMEOUT_S)
    # node-b may still do everything as itself.
    epoch_b = node_b.Join(join_req("node-b"), timeout=RPC_TIMEOUT_S).epoch
    node_b.Publish(pb.PublishRequest(node_id="node-b", epoch=epoch_b, keys=keys(2)), timeout=10)
    node_b.Leave(pb.LeaveRequest(node_id="node-b", epoch=epoch_b), timeout=RPC_TIMEOUT_S)


def test_a_reader_reads_but_never_writes(cert_directory, dial, ca, leaves) -> None:
    node_a = dial(cert_directory, as_cert(ca, leaves["node-a"]))
    epoch = node_a.Join(join_req("node-a"), timeout=RPC_TIMEOUT_S).epoch
    node_a.Publish(pb.PublishRequest(node_id="node-a", epoch=epoch, keys=keys(4)), timeout=10)
    reader = dial(cert_directory, as_cert(ca, leaves["router"]))
    assert holders(reader, keys(4)) == [{("node-a", epoch)}] * 4
    assert [n.node_id for n in reader.ListNodes(pb.ListNodesRequest(), timeout=10).nodes] == [
        "node-a"
    ]
    assert reader.Stats(pb.StatsRequest(), timeout=10).keys == 4
    for target in ("node-a", f"{SPIFFE}router", "router"):
        for method, call in writes_as(target, epoch).items():
            error = rpc_error(lambda call=call: call(reader))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (target, method)
            assert "read-only" in error.details()
    assert holders(reader, keys(4)) == [{("node-a", epoch)}] * 4


def test_list_nodes_and_score_show_epochs_only_to_the_node_itself_and_admins(
    cert_directory, dial, ca, leaves
) -> None:
    stubs = {name: dial(cert_directory, as_cert(ca, leaves[name])) for name in leaves}
    epoch_a = stubs["node-a"].Join(join_req("node-a"), timeout=RPC_TIMEOUT_S).epoch
    epoch_b = stubs["node-b"].Join(join_req("node-b"), timeout=RPC_TIMEOUT_S).epoch

    def epochs(caller: str) -> dict[str, int]:
        response = stubs[caller].ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S)
        listed = {n.node_id: n.epoch for n in response.nodes}
        scored = stubs[caller].Score(pb.ScoreRequest(keys=keys(2)), timeout=RPC_TIMEOUT_S)
        assert {n.node_id: n.epoch for n in scored.nodes} == listed, (
            "Score shows what ListNodes does"
        )
        return listed

    assert epochs("node-a") == {"node-a": epoch_a, "node-b": 0}
    assert epochs("node-b") == {"node-a": 0, "node-b": epoch_b}
    assert epochs("router") == {"node-a": 0, "node-b": 0}
    assert epochs("ops") == {"node-a": epoch_a, "node-b": epoch_b}
    # The admin may act as any node (operators clean up after a dead node).
    stubs["ops"].Leave(pb.LeaveRequest(node_id="node-b", epoch=epoch_b), timeout=RPC_TIMEOUT_S)


def test_a_certificate_without_the_identity_field_is_refused(
    make_directory, dial, ca, leaves
) -> None:
    harness = make_directory(security=Security.from_config(ca.server_tls(identity="san-uri")))
    stub = dial(harness, as_cert(ca, leaves["no-uri"]))
    for call in (
        lambda: stub.Join(join_req("node-a"), timeout=RPC_TIMEOUT_S),
        lambda: stub.Locate(pb.LocateRequest(fingerprint=FP_A.digest, keys=keys(1)), timeout=10),
        lambda: stub.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "san-uri" in error.details()


@pytest.mark.parametrize(
    ("rule", "fields"),
    [("cn", {"cn": "node-c"}), ("san-dns", {"dns": "node-c"}), ("san-uri", {"uri": "node-c"})],
)
def test_each_identity_field(make_directory, dial, ca, rule, fields) -> None:
    harness = make_directory(security=Security.from_config(ca.server_tls(identity=rule)))
    leaf = ca.client(f"c-{rule}", **fields)
    stub = dial(harness, as_cert(ca, leaf))
    stub.Join(join_req("node-c"), timeout=RPC_TIMEOUT_S)
    error = rpc_error(lambda: stub.Join(join_req("node-d"), timeout=RPC_TIMEOUT_S))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_peercert_identity_fields() -> None:
    cert = {
        "subject": ((("commonName", "cn-x"),),),
        "subjectAltName": (("DNS", "dns-x"), ("URI", "spiffe://t/x")),
    }
    assert identity_from_peercert(cert, "cn") == "cn-x"
    assert identity_from_peercert(cert, "san-dns") == "dns-x"
    assert identity_from_peercert(cert, "san-uri") == "spiffe://t/x"
    assert identity_from_peercert({}, "cn") is None
    assert identity_from_peercert(None, "san-uri") is None


@pytest.fixture
def token_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("node-a", "node-b", "reader", "shared"):
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(f"tok-{name}-0123456789\n")
    table = tmp_path / "node-tokens.json"
    table.write_text(json.dumps({"node-a": str(files["node-a"]), "node-b": str(files["node-b"])}))
    files["table"] = table
    return files


def as_token(path: Path) -> Security:
    return Security.from_config(auth_token_file=str(path))


def test_role_tokens_bind_nodes_and_readers(make_directory, dial, token_files) -> None:
    server = Security.from_config(
        read_only_token_file=str(token_files["reader"]), node_tokens=str(token_files["table"])
    )
    harness = make_directory(security=server)
    channels = []

    def stub(security: Security | None) -> directory_pb2_grpc.DirectoryStub:
        channel = (security or Security()).open_channel(harness.endpoint)
        channels.append(channel)
        return directory_pb2_grpc.DirectoryStub(channel)

    node_a, node_b = stub(as_token(token_files["node-a"])), stub(as_token(token_files["node-b"]))
    reader = stub(as_token(token_files["reader"]))
    epoch = node_a.Join(join_req("node-a"), timeout=RPC_TIMEOUT_S).epoch
    node_a.Publish(pb.PublishRequest(node_id="node-a", epoch=epoch, keys=keys(5)), timeout=10)
    for caller, needle in ((node_b, "node token of 'node-b'"), (reader, "read-only")):
        for method, call in writes_as("node-a", epoch).items():
            error = rpc_error(lambda call=call, caller=caller: call(caller))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert needle in error.details() and "node-a" in error.details()
    assert holders(reader, keys(5)) == [{("node-a", epoch)}] * 5
    for caller in (stub(None), stub(as_token(token_files["shared"]))):
        error = rpc_error(lambda caller=caller: holders(caller, keys(1)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "tok-" not in error.details()
    for channel in channels:
        channel.close()


def test_shared_credentials_keep_todays_all_trusted_behaviour(
    make_directory, dial, ca, leaves, token_files
) -> None:
    # Shared CA, no tls.identity: any certificate may act as any node, epochs shown.
    harness = make_directory(security=Security.from_config(ca.server_tls()))
    stub = dial(harness, as_cert(ca, leaves["node-b"]))
    epoch = stub.Join(join_req("node-a"), timeout=RPC_TIMEOUT_S).epoch
    stub.Publish(pb.PublishRequest(node_id="node-a", epoch=epoch, keys=keys(1)), timeout=10)
    listed = stub.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
    assert [(n.node_id, n.epoch) for n in listed] == [("node-a", epoch)]
    # The shared token alongside role tokens is an admin: "all nodes trusted".
    both = Security.from_config(
        auth_token_file=str(token_files["shared"]), read_only_token_file=str(token_files["reader"])
    )
    policy = both.access
    assert (
        policy.token_principal(f"Bearer {token_files['shared'].read_text().strip()}".encode()).role
        is Role.ADMIN
    )


def test_every_method_that_names_a_node_is_a_write() -> None:
    for method in pb.DESCRIPTOR.services_by_name["Directory"].methods:
        fields = {f.name for f in method.input_type.fields}
        if "node_id" in fields and method.name != "Locate":
            assert method.name in WRITE_METHODS, method.name


def test_a_node_sends_its_own_token_as_auth_token_file(token_files) -> None:
    node = Security.from_config(
        auth_token_file=str(token_files["node-a"]), node_tokens=str(token_files["table"])
    )
    header = f"Bearer {token_files['node-a'].read_text().strip()}".encode()
    principal = node.access.token_principal(header)
    assert principal is not None and principal.role is Role.NODE and principal.node_id == "node-a"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"tls": {"cert": "CERT", "key": "KEY", "identity": "cn"}}, "tls.identity"),
        ({"tls": {"cert": "CERT", "key": "KEY", "ca": "CA", "identity": "email"}}, "tls.identity"),
        ({"tls": {"ca": "CA", "identity_map": "MAP"}}, "tls.identity_map"),
        ({"read_only_token_file": "/nonexistent/token"}, "read_only_token_file"),
        ({"node_tokens": "/nonexistent/tokens.json"}, "node_tokens"),
        ({"node_tokens": "BADMAP"}, "node_tokens"),
    ],
)
def test_bad_settings_name_the_key(ca, tmp_path, kwargs, key) -> None:
    server = ca.server_tls()
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"node a": "/x"}))
    subs = {"CERT": server["cert"], "KEY": server["key"], "CA": str(ca.ca), "MAP": "/nope.json"}
    subs["BADMAP"] = str(bad_map)

    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return subs.get(value, value)

    with pytest.raises(ConfigError) as info:
        Security.from_config(**fill(kwargs))
    assert info.value.key.startswith(key), info.value


def test_bad_identity_map_roles(tmp_path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"x": {"role": "root"}}))
    with pytest.raises(ConfigError, match="role"):
        AccessPolicy.from_config(identity="cn", identity_map=str(path))


def test_cli_flag_errors_name_the_flag(ca, tmp_path) -> None:
    def run(*flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "kvpeer", "directory", "--listen", "127.0.0.1:0", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done
        return done.stderr

    server = ca.server_tls()
    tls = ("--tls-cert", server["cert"], "--tls-key", server["key"])
    assert "--identity: needs tls.ca" in run("--identity", "cn", *tls)
    assert "--node-tokens" in run("--node-tokens", str(tmp_path / "missing.json"))
    assert "--read-only-token-file" in run("--read-only-token-file", str(tmp_path / "missing"))
    assert "--namespace-allow" in run("--namespace-allow", str(tmp_path / "missing.json"))


# -- chunk servers -----------------------------------------------------------------


def test_chunk_server_binds_identity(ca, leaves, identity_map) -> None:
    server = Security.from_config(ca.server_tls(identity="san-uri", identity_map=identity_map))
    with serve_rows(security=server, pull_port=None) as node:

        def stub(name: str) -> peer_pb2_grpc.KVPeerStub:
            return peer_pb2_grpc.KVPeerStub(
                as_cert(ca, leaves[name]).open_channel(f"localhost:{node.server.port}")
            )

        lookup = peer_pb2.LookupRequest(
            fingerprint=FINGERPRINT.digest, keys=node.keys[:2], hold=True
        )
        answer = stub("node-a").Lookup(lookup, timeout=10)
        assert list(answer.hit) == [True, True]
        stub("node-a").Release(peer_pb2.ReleaseRequest(lease_id=answer.lease_id), timeout=10)
        # A reader may handshake (operators probe nodes) but reads no KV bytes.
        stub("router").Handshake(peer_pb2.HandshakeRequest(), timeout=10)
        error = rpc_error(lambda: stub("router").Lookup(lookup, timeout=10))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        # A node naming another node id in its handshake is refused, naming both.
        hello = peer_pb2.HandshakeRequest(
            node_id="node-a", fingerprint=FINGERPRINT.to_proto(), chunk_bytes=CHUNK_BYTES
        )
        error = rpc_error(lambda: stub("node-b").Handshake(hello, timeout=10))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node-b" in error.details() and "node-a" in error.details()
        error = rpc_error(lambda: stub("no-uri").Lookup(lookup, timeout=10))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_reader_pulls_nothing_even_with_a_nodes_lease_id(ca, leaves, identity_map) -> None:
    """The lease id is a capability, but a reader holding one still gets no KV bytes:
    neither on the grpcio port nor on the zero-copy pull port (its TLS session)."""
    server = Security.from_config(ca.server_tls(identity="san-uri", identity_map=identity_map))
    with serve_rows(security=server) as node:
        endpoint = f"localhost:{node.server.port}"
        node_a = peer_pb2_grpc.KVPeerStub(as_cert(ca, leaves["node-a"]).open_channel(endpoint))
        lookup = peer_pb2.LookupRequest(
            fingerprint=FINGERPRINT.digest, keys=node.keys[:2], hold=True
        )
        lease_id = node_a.Lookup(lookup, timeout=10).lease_id
        router = as_cert(ca, leaves["router"])
        stub = peer_pb2_grpc.KVPeerStub(router.open_channel(endpoint))
        error = rpc_error(
            lambda: list(stub.Pull(peer_pb2.PullRequest(lease_id=lease_id), timeout=10))
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        dest = [bytearray(CHUNK_BYTES) for _ in range(2)]
        targets = [PullTarget(i, node.keys[i], memoryview(d)) for i, d in enumerate(dest)]
        with PeerClient(
            endpoint,
            node_id="router",
            fingerprint=FINGERPRINT,
            chunk_bytes=CHUNK_BYTES,
            security=router,
        ) as client:
            info = client.handshake()  # a reader may probe the node
            assert info.pull_port, "the pull port must be the one refusing here"
            result = client.pull(lease_id, targets, timeout_s=10)
        assert not any(result.loaded)
        assert "PERMISSION_DENIED" in (result.error or ""), result.error
        assert not any(dest[0]), "no byte of a row reached the reader"
        # The node that owns the lease still pulls it.
        assert len(list(node_a.Pull(peer_pb2.PullRequest(lease_id=lease_id), timeout=10))) == 2


# -- namespaces --------------------------------------------------------------------


def test_namespace_allow_list(make_directory, dial, ca, leaves, identity_map, tmp_path) -> None:
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({FP_B.digest: ["node-b", f"{SPIFFE}router"]}))
    harness = make_directory(
        security=Security.from_config(ca.server_tls(identity="san-uri", identity_map=identity_map)),
        namespace_allow=NamespaceAllowList.from_file(str(allow)),
    )
    node_a = dial(harness, as_cert(ca, leaves["node-a"]))
    node_b = dial(harness, as_cert(ca, leaves["node-b"]))
    router = dial(harness, as_cert(ca, leaves["router"]))
    epoch_b = node_b.Join(join_req("node-b", FP_B), timeout=RPC_TIMEOUT_S).epoch
    node_b.Publish(pb.PublishRequest(node_id="node-b", epoch=epoch_b, keys=keys(3)), timeout=10)
    node_a.Join(join_req("node-a", FP_A), timeout=RPC_TIMEOUT_S)

    # node-a may neither join the tenant's namespace nor look into it.
    for call in (
        lambda: node_a.Join(join_req("node-a", FP_B), timeout=RPC_TIMEOUT_S),
        lambda: holders(node_a, keys(3), FP_B),
        lambda: node_a.ListNodes(pb.ListNodesRequest(fingerprint=FP_B.digest), timeout=10),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert FP_B.digest in error.details() and "node-b" not in error.details()
    score_b = pb.ScoreRequest(fingerprint=FP_B.digest, keys=keys(3))
    error = rpc_error(lambda: node_a.Score(score_b, timeout=RPC_TIMEOUT_S))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and FP_B.digest in error.details()
    listed = node_a.ListNodes(pb.ListNodesRequest(), timeout=RPC_TIMEOUT_S).nodes
    assert [n.node_id for n in listed] == ["node-a"]
    scored = node_a.Score(pb.ScoreRequest(keys=keys(3)), timeout=RPC_TIMEOUT_S).nodes
    assert [n.node_id for n in scored] == ["node-a"]  # node-b's 3 held keys stay hidden
    assert [n.prefix_keys for n in router.Score(score_b, timeout=RPC_TIMEOUT_S).nodes] == [3]
    # Those listed see it; unlisted namespaces stay open to all.
    assert holders(router, keys(3), FP_B) == [{("node-b", epoch_b)}] * 3
    assert holders(node_b, keys(1), FP_A) == [set()]


def test_namespace_allow_list_file_errors(tmp_path) -> None:
    path = tmp_path / "allow.json"
    path.write_text(json.dumps({"not-a-digest": ["a"]}))
    with pytest.raises(ConfigError, match="digest"):
        NamespaceAllowList.from_file(str(path))
    path.write_text(json.dumps({FP_A.digest: "a"}))
    with pytest.raises(ConfigError, match="list"):
        NamespaceAllowList.from_file(str(path))
