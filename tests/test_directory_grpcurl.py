"""The real ``kvpeer directory`` process: grpcurl through reflection, signals, flags, no torch.

Everything here runs the command as a child process (kvpeer.bench.directory's
DirectoryProcess) and talks to it from outside, as an operator would.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvpeer.sim.directory import DirectoryProcess
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.directory import FP_A, RPC_TIMEOUT_S, keys, refused_at_start
from tests.support.redis_server import RedisServer

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture
def directory_process() -> Iterator[DirectoryProcess]:
    process = DirectoryProcess(["--lease-ttl", "30"])
    try:
        yield process
    finally:
        process.close()


def grpcurl(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_list_and_describe(directory_process: DirectoryProcess) -> None:
    listed = grpcurl("-plaintext", directory_process.endpoint, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "kvpeer.v1.Directory" in services
    assert "grpc.health.v1.Health" in services

    described = grpcurl("-plaintext", directory_process.endpoint, "describe", "kvpeer.v1.Directory")
    assert described.returncode == 0, described.stderr
    for method in ("Join", "Heartbeat", "Publish", "Withdraw", "Locate", "Leave", "ListNodes"):
        assert f"rpc {method} (" in described.stdout

    message = grpcurl(
        "-plaintext", directory_process.endpoint, "describe", "kvpeer.v1.LocateRequest"
    )
    assert "repeated bytes keys" in message.stdout


def test_locate_through_grpcurl(directory_process: DirectoryProcess) -> None:
    with grpc.insecure_channel(directory_process.endpoint) as channel:
        stub = directory_pb2_grpc.DirectoryStub(channel)
        epoch = stub.Join(
            pb.JoinRequest(node_id="a", endpoint="a.test:7601", fingerprint=FP_A.to_proto()),
            timeout=RPC_TIMEOUT_S,
        ).epoch
        stub.Publish(pb.PublishRequest(node_id="a", epoch=epoch, keys=keys(2)), timeout=10)

    request = {
        "fingerprint": FP_A.digest,
        "keys": [base64.b64encode(k).decode() for k in [*keys(2), b"missing"]],
    }
    result = grpcurl(
        "-plaintext",
        "-d",
        json.dumps(request),
        directory_process.endpoint,
        "kvpeer.v1.Directory/Locate",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["nodes"] == [{"node_id": "a", "endpoint": "a.test:7601", "epoch": str(epoch)}]
    assert answer["holders"] == [{"nodes": [0]}, {"nodes": [0]}, {}]

    health = grpcurl("-plaintext", directory_process.endpoint, "grpc.health.v1.Health/Check")
    assert '"status": "SERVING"' in health.stdout


def test_bad_request_through_grpcurl(directory_process: DirectoryProcess) -> None:
    result = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"fingerprint": "llama", "keys": ["AA=="]}),
        directory_process.endpoint,
        "kvpeer.v1.Directory/Locate",
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "'llama' is not a fingerprint digest" in result.stderr
    assert directory_process.poll() is None  # still serving


def test_token_through_grpcurl(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    with DirectoryProcess(["--auth-token-file", str(token)]) as process:
        refused = grpcurl("-plaintext", "-d", "{}", process.endpoint, "kvpeer.v1.Directory/Stats")
        assert refused.returncode != 0
        assert "Unauthenticated" in refused.stderr and "missing bearer token" in refused.stderr
        allowed = grpcurl(
            "-plaintext",
            "-H",
            "authorization: Bearer t0ken",
            "-d",
            "{}",
            process.endpoint,
            "kvpeer.v1.Directory/Stats",
        )
        assert allowed.returncode == 0, allowed.stderr
        assert '"store": "memory"' in allowed.stdout


def test_redis_store_and_metrics_flags() -> None:
    with RedisServer() as redis, DirectoryProcess(["--store", redis.url]) as process:
        stats = grpcurl("-plaintext", "-d", "{}", process.endpoint, "kvpeer.v1.Directory/Stats")
        assert f'"store": "{redis.url}"' in stats.stdout
        assert process.metrics_port is not None
        url = f"http://127.0.0.1:{process.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "kvpeer_directory_store_up 1.0" in response.read().decode()


def test_sigterm_stops_cleanly(directory_process: DirectoryProcess) -> None:
    assert directory_process.stop() == 0
    assert "Traceback" not in directory_process.stderr()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--store", "postgres://db"],
            "--store: expected 'memory', 'redis://host:port/db' or 'redis+cluster://",
        ),
        (["--lease-ttl", "0"], "--lease-ttl: 0.0 s is out of range"),
        (["--listen", "nohost"], "--listen: missing ':port'"),
        (["--tls-cert", "c.pem"], "--tls-cert: give --tls-cert and --tls-key together"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file: cannot read"),
        (["--metrics-port", "70000"], "--metrics-port: 70000 is not a port number"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(flags: list[str], message: str) -> None:
    assert message in refused_at_start(*flags)


def test_runs_without_torch_or_vllm() -> None:
    """`kvpeer directory` must serve on a host that has neither torch nor vLLM."""
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "vllm"):
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        from kvpeer.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    with DirectoryProcess(["--lease-ttl", "5"], python_args=("-c", script)) as process:
        stats = grpcurl("-plaintext", "-d", "{}", process.endpoint, "kvpeer.v1.Directory/Stats")
        assert stats.returncode == 0, stats.stderr
        assert process.stop() == 0
