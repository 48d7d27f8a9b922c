"""Clusters of real processes for the tier's tests: a directory and simulated vLLM nodes.

``cluster`` (fixture) yields a :class:`Cluster` that starts a ``kvpeer directory``
subprocess and :class:`~kvpeer.sim.node.NodeProcess` nodes (each a real vLLM
``TieringOffloadingManager`` with ``PeerSecondaryTier`` over ``/dev/shm``), and
tears every one of them down at the end, also when a test fails.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvpeer.sim.directory import DirectoryProcess
from kvpeer.sim.node import NodeProcess, NodeSpec

#: Tier keys of a holder reached through a fault-injecting relay: it stands for a node on
#: another host, so it offers no same-host region (a consumer on this machine would
#: otherwise copy its rows straight from /dev/shm, past the relay and its faults).
REMOTE: dict[str, Any] = {"same_host": "off"}


class Cluster:
    """Processes of one test; everything started through it is torn down by the fixture."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.directories: list[DirectoryProcess] = []
        self.nodes: list[NodeProcess] = []

    def directory(self, *, lease_ttl_s: float = 3.0, store: str = "memory") -> DirectoryProcess:
        """A ``kvpeer directory`` process (short leases, so tests see expiry quickly)."""
        directory = DirectoryProcess(["--lease-ttl", str(lease_ttl_s), "--store", store])
        self.directories.append(directory)
        return directory

    def node(self, name: str, *, start: bool = True, **spec: Any) -> NodeProcess:
        """A node (started unless ``start=False``); ``spec`` are NodeSpec fields."""
        tier = {"listen": "127.0.0.1:0", "lookup_timeout_s": 10.0, **spec.pop("tier", {})}
        env = {"PYTHONHASHSEED": "0", **spec.pop("env", {})}
        node = NodeProcess(
            NodeSpec(name, tier, env=env, **spec), log_path=str(self.tmp_path / f"{name}.log")
        )
        self.nodes.append(node)
        return node.start() if start else node

    def pair(self, holder: dict[str, Any] | None = None, consumer: dict[str, Any] | None = None):
        """A holder and a consumer that knows it as a static peer, started side by side."""
        port = free_port()
        holder_spec = dict(holder or {})
        holder_spec["tier"] = {"listen": f"127.0.0.1:{port}", **holder_spec.get("tier", {})}
        consumer_spec = dict(consumer or {})
        consumer_spec["tier"] = {"peers": [f"127.0.0.1:{port}"], **consumer_spec.get("tier", {})}
        a = self.node(holder_spec.pop("name", "holder"), start=False, **holder_spec)
        b = self.node(consumer_spec.pop("name", "consumer"), start=False, **consumer_spec)
        self.start(a, b)
        return a, b

    def start(self, *nodes: NodeProcess) -> None:
        """Start nodes side by side (each spends seconds importing vLLM)."""
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()

    def close(self) -> None:
        for node in self.nodes:
            try:
                if node.proc is not None and node.proc.poll() is None:
                    node.stop(timeout_s=30)
            except Exception:
                node.kill()
        for directory in self.directories:
            directory.close()


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy and return it; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.05)


def hexkeys(keys: list[bytes]) -> list[str]:
    return [k.hex() for k in keys]


def shm_files(prefix: str = "vllm_offload_kvpeer-sim-") -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def free_port() -> int:
    """A port that was free a moment ago (for a server that must be known before it starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask_directory(directory: DirectoryProcess, method: str, request: Any) -> Any:
    """One unary call to ``directory``'s Directory service, e.g. ``("Locate", request)``."""
    import grpc

    from kvpeer.v1 import directory_pb2_grpc

    with grpc.insecure_channel(directory.endpoint) as channel:
        return getattr(directory_pb2_grpc.DirectoryStub(channel), method)(request, timeout=10)


def holders(directory: DirectoryProcess, fingerprint: str, keys: list[bytes]) -> list[set[str]]:
    """Node ids the directory names for each key (fingerprint given as a digest)."""
    from kvpeer.v1 import directory_pb2

    answer = _ask_directory(
        directory, "Locate", directory_pb2.LocateRequest(fingerprint=fingerprint, keys=keys)
    )
    nodes = [n.node_id for n in answer.nodes]
    return [{nodes[i] for i in per_key.nodes} for per_key in answer.holders]


def published(directory: DirectoryProcess, node: NodeProcess, keys: list[bytes]) -> bool:
    """The directory names ``node`` as a holder of every key."""
    return all(
        node.info["node_id"] in h for h in holders(directory, node.info["fingerprint"], keys)
    )


def joined(directory: DirectoryProcess, node: NodeProcess) -> bool:
    """The directory lists ``node`` as a live member (its directory client is connected)."""
    from kvpeer.v1 import directory_pb2

    answer = _ask_directory(directory, "ListNodes", directory_pb2.ListNodesRequest())
    return any(n.node_id == node.info["node_id"] for n in answer.nodes)


def idle(*nodes: NodeProcess) -> bool:
    """No pinned primary rows, no vLLM jobs and no open row views on any of ``nodes``."""
    for node in nodes:
        state = node.call("tier_state")
        if node.call("pinned") or state["jobs"] or state["open_row_views"]:
            return False
    return True
