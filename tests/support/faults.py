"""Helpers of the tier's fault tests (``tests/test_faults.py``).

- :class:`StallingServer`: a TCP server that accepts connections and never says a
  word — a peer whose process hangs, or a host that vanished behind a proxy;
- :func:`registrations`: the (node id, epoch) pairs the directory names for keys;
- :func:`counter`: a labelled counter from a node's ``stats`` op (vLLM's metrics);
- :func:`run_request`: a node's ``request`` op on a thread, to strike while it runs.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from kvpeer.sim.directory import DirectoryProcess
from kvpeer.sim.node import NodeProcess
from kvpeer.v1 import directory_pb2, directory_pb2_grpc


class StallingServer:
    """Accepts TCP connections on a free loopback port, then neither reads nor writes.

    A client's connect succeeds (the kernel completes the handshake), so only its
    deadlines can end what it sends. :meth:`close` closes every socket. Context manager.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="stalling-server", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._accepted)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._accepted.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for conn in self._accepted:
                conn.close()

    def __enter__(self) -> StallingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def registrations(
    directory: DirectoryProcess, fingerprint: str, keys: list[bytes]
) -> list[set[tuple[str, int]]]:
    """The (node id, epoch) of every holder the directory names, per key."""
    with grpc.insecure_channel(directory.endpoint) as channel:
        stub = directory_pb2_grpc.DirectoryStub(channel)
        answer = stub.Locate(
            directory_pb2.LocateRequest(fingerprint=fingerprint, keys=keys), timeout=10
        )
    nodes = [(n.node_id, n.epoch) for n in answer.nodes]
    return [{nodes[i] for i in per_key.nodes} for per_key in answer.holders]


def counter(stats: dict[str, dict[str, float]], name: str, label: str = "") -> float:
    """The value of counter ``name`` (with label value ``label``) in a ``stats`` op result."""
    return stats.get(name, {}).get(label, 0)


@contextlib.contextmanager
def run_request(node: NodeProcess, **args: Any) -> Iterator[dict[str, Any]]:
    """Run ``node.call("request", **args)`` on a thread; the dict holds its report after exit.

    On exit the thread is joined (the request's own timeouts bound it); an error
    the call raised is stored under ``"error"``.
    """
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result.update(node.call("request", **args))
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=call, name=f"request-{node.spec.name}", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        thread.join(timeout=180)
