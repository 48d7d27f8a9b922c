"""Directory test helpers: a restartable in-process directory over either store, raw stubs.

``directory`` (fixture, parametrized ``memory`` / ``redis``) yields a
:class:`DirectoryHarness`: a real :class:`DirectoryServer` on a loopback port,
with a store of the requested kind (Redis: a private ``redis-server`` with
append-only persistence). :meth:`DirectoryHarness.restart` stops the server and
starts a new one on the same port with a new store object — empty for memory,
the same Redis data for redis — as a directory process restart would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.security import Security
from kvpeer.server.directory.memory_store import MemoryStore
from kvpeer.server.directory.redis_store import RedisStore
from kvpeer.server.directory.service import DirectoryServer
from kvpeer.server.directory.store import MAX_KEYS_PER_NODE, DirectoryStore
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc
from tests.support.redis_server import RedisServer

FP_A = Fingerprint.of(model="tiny-llama", dtype="bfloat16", tokens_per_hash=16)
FP_B = Fingerprint.of(model="tiny-llama", dtype="float16", tokens_per_hash=16)
RPC_TIMEOUT_S = 10.0


def keys(n: int, tag: str = "k", size: int = 36) -> list[bytes]:
    """``n`` distinct keys of ``size`` bytes (OffloadKey-sized by default)."""
    return [f"{tag}{i:08d}".encode().ljust(size, b"\0") for i in range(n)]


def wait_until(predicate: Callable[[], object], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` until truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(0.02)


def refused_at_start(*flags: str) -> str:
    """Run ``kvpeer directory FLAGS``, expect it to exit 2 without a traceback; its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "kvpeer", "directory", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


class DirectoryHarness:
    """An in-process directory over a memory or Redis store, restartable on its port."""

    def __init__(
        self,
        kind: str,
        redis: RedisServer | None,
        *,
        lease_ttl_s: float = 5.0,
        max_keys_per_node: int = MAX_KEYS_PER_NODE,
    ):
        self.max_keys_per_node = max_keys_per_node
        self.kind = kind
        self.redis = redis
        self.lease_ttl_s = lease_ttl_s
        self.server: DirectoryServer | None = None
        self.port = 0
        self._channels: list[grpc.Channel] = []

    def new_store(self) -> DirectoryStore:
        if self.kind == "memory":
            return MemoryStore(max_keys_per_node=self.max_keys_per_node)
        assert self.redis is not None
        return RedisStore(self.redis.url, timeout_s=2.0, max_keys_per_node=self.max_keys_per_node)

    def start(self, **kwargs: object) -> DirectoryHarness:
        self.server = DirectoryServer(
            f"127.0.0.1:{self.port}",
            store=self.new_store(),
            lease_ttl_s=self.lease_ttl_s,
            **kwargs,  # type: ignore[arg-type]
        ).start()
        self.port = self.server.port
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self, security: Security | None = None) -> directory_pb2_grpc.DirectoryStub:
        """A stub on a new channel (closed with the harness), presenting ``security``."""
        channel = (security or Security()).open_channel(self.endpoint)
        self._channels.append(channel)
        return directory_pb2_grpc.DirectoryStub(channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self.stop()


def join(
    stub: directory_pb2_grpc.DirectoryStub, node_id: str, fingerprint: Fingerprint = FP_A
) -> int:
    return stub.Join(
        pb.JoinRequest(
            node_id=node_id, endpoint=f"{node_id}.test:7601", fingerprint=fingerprint.to_proto()
        ),
        timeout=RPC_TIMEOUT_S,
    ).epoch


def publish(stub: directory_pb2_grpc.DirectoryStub, node_id: str, epoch: int, ks: list[bytes]):
    return stub.Publish(
        pb.PublishRequest(node_id=node_id, epoch=epoch, keys=ks), timeout=RPC_TIMEOUT_S
    )


def locate(
    stub: directory_pb2_grpc.DirectoryStub,
    ks: list[bytes],
    fingerprint: Fingerprint = FP_A,
    exclude: str = "",
) -> list[set[tuple[str, int]]]:
    """Holders of each key as sets of (node id, epoch)."""
    response = stub.Locate(
        pb.LocateRequest(fingerprint=fingerprint.digest, keys=ks, exclude_node_id=exclude),
        timeout=RPC_TIMEOUT_S,
    )
    nodes = [(n.node_id, n.epoch) for n in response.nodes]
    assert len(response.holders) == len(ks)
    return [{nodes[i] for i in kh.nodes} for kh in response.holders]


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError ``call`` raises (fails the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(params=["memory", "redis"])
def directory(request: pytest.FixtureRequest) -> Iterator[DirectoryHarness]:
    """A started directory over each store kind (lease 5 s unless a test changes it)."""
    redis = RedisServer(appendonly=True).start() if request.param == "redis" else None
    harness = DirectoryHarness(request.param, redis)
    try:
        yield harness.start()
    finally:
        harness.close()
        if redis is not None:
            redis.close()


@pytest.fixture
def make_directory() -> Iterator[Callable[..., DirectoryHarness]]:
    """Factory for directories with custom options: ``make_directory(kind, lease_ttl_s=..)``."""
    made: list[tuple[DirectoryHarness, RedisServer | None]] = []

    def make(kind: str = "memory", *, start: bool = True, **options: object) -> DirectoryHarness:
        redis = RedisServer(appendonly=True).start() if kind == "redis" else None
        lease = float(options.pop("lease_ttl_s", 5.0))  # type: ignore[arg-type]
        cap = int(options.pop("max_keys_per_node", MAX_KEYS_PER_NODE))  # type: ignore[arg-type]
        harness = DirectoryHarness(kind, redis, lease_ttl_s=lease, max_keys_per_node=cap)
        made.append((harness, redis))
        return harness.start(**options) if start else harness

    try:
        yield make
    finally:
        for harness, redis in made:
            harness.close()
            if redis is not None:
                redis.close()
