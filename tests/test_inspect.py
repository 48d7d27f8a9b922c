"""``kvpeer inspect`` against real KVPeer and Directory servers on loopback.

Node fingerprints are the real ones the tier derives from vLLM specs, so the
mismatch output is what an operator of a TP=1 / TP=2 cluster would read.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from kvpeer.api.security import Security
from kvpeer.cli import inspect
from kvpeer.sim.vllm_config import TINY
from tests.support.certs import make_certs, tls_server
from tests.support.fingerprints import sim_tier_fingerprint

peer_server = pytest.importorskip("kvpeer.server.peer.service")
array_source = pytest.importorskip("kvpeer.server.peer.array_source")

TOKEN = "s3cret-cluster-token"


def run_inspect(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    status = inspect.run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return status, out, err


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def start_node() -> Iterator[Callable[..., str]]:
    """Starts KVPeer servers for a tier fingerprint; returns each one's ``host:port``."""
    with contextlib.ExitStack() as stack:

        def start(tier_print, node_id: str, security: Security | None = None) -> str:
            chunk_bytes = int(tier_print.fingerprint.ingredients["chunk_bytes"])
            server = peer_server.PeerServer(
                array_source.ArrayChunkSource(2, chunk_bytes),
                node_id=node_id,
                fingerprint=tier_print.fingerprint,
                listen="127.0.0.1:0",
                security=security,
            ).start()
            stack.callback(server.stop, 0)
            return f"127.0.0.1:{server.port}"

        yield start


@pytest.fixture(scope="module")
def prints():
    """Tier fingerprints of TINY nodes: canonical TP=1/TP=2, direct TP=1/TP=2."""
    return {
        (layout, tp): sim_tier_fingerprint(TINY, tp_size=tp, canonical=layout == "canonical")
        for layout in ("canonical", "direct")
        for tp in (1, 2)
    }


def test_node_shows_its_id_chunk_size_and_every_ingredient(capsys, start_node, prints):
    tier_print = prints["canonical", 2]
    endpoint = start_node(tier_print, "prefill-0")
    status, out, err = run_inspect(capsys, "--node", endpoint)
    assert status == 0, err
    chunk_bytes = tier_print.fingerprint.ingredients["chunk_bytes"]
    assert f"node prefill-0 at {endpoint}" in out
    assert f"chunk {chunk_bytes} bytes" in out
    assert f"fingerprint {tier_print.fingerprint.digest}" in out
    for name, value in tier_print.fingerprint.ingredients.items():
        assert any(line.split() == [name, *value.split()] for line in out.splitlines()), name
    assert err == ""


def test_canonical_nodes_of_different_tp_share(capsys, start_node, prints):
    tp1 = start_node(prints["canonical", 1], "decode-tp1")
    tp2 = start_node(prints["canonical", 2], "prefill-tp2")
    status, out, _ = run_inspect(capsys, "--node", tp2, "--node", tp1)
    assert status == 0
    assert f"all 2 nodes share fingerprint {prints['canonical', 1].fingerprint.digest}" in out


def test_direct_nodes_of_different_tp_do_not_share_and_inspect_says_why(capsys, start_node, prints):
    tp1 = start_node(prints["direct", 1], "decode-tp1")
    tp2 = start_node(prints["direct", 2], "prefill-tp2")
    status, out, _ = run_inspect(capsys, "--node", tp1, "--node", tp2)
    assert status == 1
    verdict = out.split("\n\n")[-1].splitlines()
    assert verdict[0] == (
        f"prefill-tp2 ({tp2}) does NOT share with decode-tp1 ({tp1}) "
        "[ours = decode-tp1, theirs = prefill-tp2]:"
    )
    assert verdict[1].startswith("  - parallelism differs (ours tp=1 pp=1 pcp=1 dcp=1, theirs tp=2")
    assert "TP differs and canonical_layout is off" in verdict[1]
    assert len(verdict) == 2  # nothing else differs


def test_unreachable_node_is_one_line_and_exit_2(capsys):
    port = free_port()
    started = time.monotonic()
    status, out, err = run_inspect(capsys, "--node", f"127.0.0.1:{port}", "--timeout", "3")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"kvpeer inspect: error: cannot reach node 127.0.0.1:{port}: ")
    assert time.monotonic() - started < 30


def test_one_unreachable_node_among_several_fails_the_command(capsys, start_node, prints):
    good = start_node(prints["canonical", 1], "up")
    port = free_port()
    status, _, err = run_inspect(capsys, "--node", good, "--node", f"127.0.0.1:{port}")
    assert status == 2
    assert f"cannot reach node 127.0.0.1:{port}" in err


def test_token_protected_node_needs_the_token(capsys, start_node, prints, tmp_path):
    endpoint = start_node(prints["canonical", 1], "secured", Security(token=TOKEN))
    status, _, err = run_inspect(capsys, "--node", endpoint)
    assert status == 2
    assert "refused the call: UNAUTHENTICATED: missing bearer token" in err
    assert err.count("\n") == 1

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    status, out, err = run_inspect(capsys, "--node", endpoint, "--auth-token-file", str(token_file))
    assert status == 0, err
    assert "node secured at" in out


def test_mutual_tls_node_with_a_server_name_override(capsys, start_node, prints, tmp_path):
    certs = make_certs(tmp_path, server_names=("kvpeer-node",))
    server_security = Security.from_config(tls_server(certs, mutual=True))
    endpoint = start_node(prints["canonical", 1], "tls-node", server_security)
    tls_flags = ["--tls-ca", str(certs.ca), "--tls-server-name", "kvpeer-node"]
    client_cert = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]

    status, out, err = run_inspect(capsys, "--node", endpoint, *tls_flags, *client_cert)
    assert status == 0, err
    assert "node tls-node at" in out

    # without a client certificate, or without TLS at all, the node refuses: one line, exit 2
    for argv in (tls_flags, []):
        status, out, err = run_inspect(capsys, "--node", endpoint, "--timeout", "3", *argv)
        assert status == 2
        assert out == ""
        assert err.startswith(f"kvpeer inspect: error: cannot reach node {endpoint}: ")
        assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give --node HOST:PORT (repeatable) and/or --directory HOST:PORT"),
        (["--node", "no-port-here"], "--node: missing ':port' in 'no-port-here'"),
        (["--directory", "host:99999"], "--directory: port 99999 out of range"),
        (["--node", "h:1", "--directory", "h"], "--directory: missing ':port' in 'h'"),
        (["--node", "h:1", "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca: cannot read"),
        (["--node", "h:1", "--tls-cert", "/x.pem"], "--tls-key: cert and key must be given"),
        (["--node", "h:1", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_bad_flags_are_named(capsys, argv, message):
    status, out, err = run_inspect(capsys, *argv)
    assert status == 2
    assert out == ""
    assert message in err
    assert err.count("\n") == 1


def test_kvpeer_inspect_command_runs_without_vllm_or_torch(start_node, prints):
    endpoint = start_node(prints["direct", 1], "plain")
    code = (
        "import argparse, sys\n"
        "from kvpeer.cli import inspect\n"
        "parser = argparse.ArgumentParser()\n"
        "inspect.add_arguments(parser)\n"
        f"status = inspect.run(parser.parse_args(['--node', {endpoint!r}]))\n"
        "heavy = sorted(m for m in ('vllm', 'torch') if m in sys.modules)\n"
        "print('heavy modules:', heavy)\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "heavy modules: []" in result.stdout
    assert "node plain at" in result.stdout

    # and through the real entry point, exit status included
    result = subprocess.run(
        [sys.executable, "-m", "kvpeer", "inspect", "--node", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "kvpeer inspect: error: cannot reach node" in result.stderr


# -- --directory ---------------------------------------------------------------


@pytest.fixture
def directory() -> Iterator[tuple[str, Callable[..., None]]]:
    """A real directory server and a function that joins a node to it (and publishes keys)."""
    directory_server = pytest.importorskip("kvpeer.server.directory.service")
    from kvpeer.v1 import directory_pb2, directory_pb2_grpc

    server = directory_server.DirectoryServer("127.0.0.1:0", lease_ttl_s=60).start()
    endpoint = f"127.0.0.1:{server.port}"
    channel = Security().open_channel(endpoint)
    stub = directory_pb2_grpc.DirectoryStub(channel)

    def join(node_id: str, node_endpoint: str, tier_print, keys: int = 0) -> None:
        answer = stub.Join(
            directory_pb2.JoinRequest(
                node_id=node_id,
                endpoint=node_endpoint,
                fingerprint=tier_print.fingerprint.to_proto(),
            ),
            timeout=10,
        )
        if keys:
            stub.Publish(
                directory_pb2.PublishRequest(
                    node_id=node_id,
                    epoch=answer.epoch,
                    keys=[node_id.encode() + i.to_bytes(4, "big") for i in range(keys)],
                ),
                timeout=10,
            )

    try:
        yield endpoint, join
    finally:
        channel.close()
        server.stop(0)


def test_directory_groups_nodes_by_fingerprint(capsys, directory, prints):
    endpoint, join = directory
    shared, other = prints["canonical", 1], prints["direct", 2]
    join("prefill-0", "prefill-0:7601", shared, keys=3)
    join("decode-0", "decode-0:7601", shared)
    join("legacy-0", "legacy-0:7601", other, keys=1)
    status, out, err = run_inspect(capsys, "--directory", endpoint)
    assert status == 0, err
    assert out.startswith(f"directory {endpoint}: 3 nodes, 2 fingerprints\n")
    groups = out.split("\n\n")[1:]
    assert groups[0].startswith(f"fingerprint {shared.fingerprint.digest}\n")
    assert "  parallelism       agnostic" in groups[0]
    assert "  nodes (2):" in groups[0]
    assert "prefill-0  prefill-0:7601  epoch" in groups[0] and "3 keys" in groups[0]
    assert "decode-0 " in groups[0] and "legacy-0" not in groups[0]
    assert groups[1].startswith(f"fingerprint {other.fingerprint.digest}\n")
    assert "tp=2 pp=1 pcp=1 dcp=1" in groups[1]
    assert "legacy-0  legacy-0:7601" in groups[1] and "1 keys" in groups[1]


def test_node_and_directory_together(capsys, directory, start_node, prints):
    endpoint, join = directory
    node = start_node(prints["canonical", 2], "prefill-0")
    join("prefill-0", node, prints["canonical", 2])
    status, out, _ = run_inspect(capsys, "--node", node, "--directory", endpoint)
    assert status == 0
    assert f"node prefill-0 at {node}" in out
    assert f"directory {endpoint}: 1 node, 1 fingerprint" in out


def test_empty_directory(capsys, directory):
    endpoint, _ = directory
    status, out, _ = run_inspect(capsys, "--directory", endpoint)
    assert status == 0
    assert out.strip() == f"directory {endpoint}: 0 nodes, 0 fingerprints"


def test_pointing_node_and_directory_at_each_others_ports_says_so(
    capsys, directory, start_node, prints
):
    endpoint, _ = directory
    node = start_node(prints["canonical", 1], "prefill-0")
    status, _, err = run_inspect(capsys, "--node", endpoint)
    assert status == 2
    assert f"{endpoint} does not serve the kvpeer node service (UNIMPLEMENTED)" in err
    status, _, err = run_inspect(capsys, "--directory", node)
    assert status == 2
    assert f"{node} does not serve the kvpeer directory service (UNIMPLEMENTED)" in err


def test_unreachable_directory_is_one_line_and_exit_2(capsys):
    port = free_port()
    status, out, err = run_inspect(capsys, "--directory", f"127.0.0.1:{port}")
    assert status == 2
    assert out == ""
    assert err.startswith(f"kvpeer inspect: error: cannot reach directory 127.0.0.1:{port}: ")
    assert err.count("\n") == 1
