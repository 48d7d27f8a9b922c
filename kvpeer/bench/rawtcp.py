"""The raw TCP baseline: the fastest a Python process pair moves the same bytes on loopback.

The sender process keeps ``num_chunks`` synthetic rows in memory. A receiver
connects, asks for ``n`` bytes (an 8-byte big-endian count), and the sender
writes the rows in order (wrapping around) with ``sendall`` straight from the
rows' memory. The receiver moves them into a preallocated buffer with
``recv_into``: no framing, no digests, no copies beyond the kernel's. Whatever
kvpeer adds is measured against this.
"""

from __future__ import annotations

import socket
import struct
import time
from multiprocessing.connection import Connection

from kvpeer.api.errors import KVPeerError
from kvpeer.bench.process import ServerProcess, report_port
from kvpeer.bench.rows import synthetic_rows

_REQUEST = struct.Struct(">Q")


def _serve(conn: Connection, num_chunks: int, chunk_bytes: int, seed: int, host: str) -> None:
    """Sender process: serve byte requests until terminated, one connection at a time."""
    rows = synthetic_rows(num_chunks, chunk_bytes, seed)
    flat = memoryview(rows).cast("B")
    with socket.create_server((host, 0)) as listener:
        report_port(conn, listener.getsockname()[1])
        while True:
            peer, _ = listener.accept()
            with peer:
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request = _recv_exact(peer, _REQUEST.size)
                if request is None:
                    continue
                remaining = _REQUEST.unpack(request)[0]
                position = 0
                while remaining:
                    size = min(remaining, len(flat) - position)
                    peer.sendall(flat[position : position + size])
                    remaining -= size
                    position = (position + size) % len(flat)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            return None
        data += more
    return data


class RawTcpSender(ServerProcess):
    """A sender process over synthetic rows (see :func:`kvpeer.bench.rows.synthetic_rows`).

    It listens on ``host`` (loopback unless a benchmark runs it in a network namespace).
    """

    def __init__(
        self, num_chunks: int, chunk_bytes: int, seed: int, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(_serve, num_chunks, chunk_bytes, seed, host)


def receive(
    port: int, dest: memoryview, *, host: str = "127.0.0.1", timeout_s: float = 120.0
) -> float:
    """Fill ``dest`` (a writable byte view) from the sender at ``host:port``; return seconds.

    The clock runs from connecting to the last byte received.
    """
    view = dest.cast("B")
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(_REQUEST.pack(len(view)))
        received = 0
        while received < len(view):
            n = sock.recv_into(view[received:])
            if n == 0:
                raise KVPeerError(f"sender closed after {received} of {len(view)} bytes")
            received += n
    return time.perf_counter() - started
