"""A fault-injecting TCP relay: put it between a client and a real server (demo, tests).

The relay listens on a free loopback port and forwards every connection to its
target, byte for byte, in both directions. :class:`Faults` describe what to do to
one direction; the relay applies them per connection, counting offsets from the
connection's first byte:

- ``delay_s``: wait before forwarding each block (latency);
- ``rate_bytes_per_s``: throttle to this rate;
- ``drop_after_bytes``: forward this many bytes, then reset both sockets (RST);
- ``corrupt_at``: flip the byte at this offset (h2c carries gRPC payloads
  uncompressed, so a flip deep in a stream most likely lands in a message's data);
- ``corrupt_match``: flip the last byte of the first occurrence of any of these
  byte strings, e.g. a few slices of a row the test knows: this hits message
  data for sure, wherever the HTTP/2 frame boundaries fall.

    with Relay(server.endpoint, down=Faults(corrupt_at=300_000)) as relay:
        client = PeerClient(relay.endpoint, ...)

"down" is target-to-client (responses), "up" is client-to-target (requests).
Faults can be changed while the relay runs (:meth:`Relay.set_faults`); they apply
to blocks forwarded afterwards. Counters (:attr:`Relay.bytes_down`, ...) let a
test wait until a transfer is under way before it strikes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

_BLOCK = 64 << 10
_THROTTLED_BLOCK = 16 << 10


@dataclass(frozen=True)
class Faults:
    """What to do to one direction of every relayed connection. The default passes through."""

    delay_s: float = 0.0
    rate_bytes_per_s: float | None = None
    drop_after_bytes: int | None = None
    corrupt_at: int | None = None
    corrupt_match: tuple[bytes, ...] = ()


class Relay:
    """A running relay to ``target`` (``host:port``); a context manager.

    Thread-safety: counters and faults are guarded by one lock; each connection
    has two pump threads; :meth:`stop` closes everything and joins them.
    """

    def __init__(self, target: str, *, down: Faults = Faults(), up: Faults = Faults()) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host.strip("[]") or "127.0.0.1", int(port))
        self._lock = threading.Lock()
        self._faults = {"down": down, "up": up}
        self._bytes = {"down": 0, "up": 0}
        self.connections = 0
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded from the target to clients, over all connections."""
        with self._lock:
            return self._bytes["down"]

    @property
    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes["up"]

    def set_faults(self, *, down: Faults | None = None, up: Faults | None = None) -> None:
        """Replace the faults of a direction for blocks forwarded from now on."""
        with self._lock:
            if down is not None:
                self._faults["down"] = down
            if up is not None:
                self._faults["up"] = up

    def reset_connections(self) -> None:
        """Reset (RST) every connection now; the relay keeps accepting new ones.

        Sockets stay listed after their connection ends (resetting a closed socket
        does nothing), which is fine for a test's handful of connections.
        """
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _reset(sock)

    def stop(self) -> None:
        """Stop accepting, reset open connections and join every thread; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        _reset(self._listener)  # shutdown wakes the thread blocked in accept()
        self.reset_connections()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- private -------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._sockets |= {client, server}
            pair = (client, server)
            for direction, source, sink in (("down", server, client), ("up", client, server)):
                thread = threading.Thread(
                    target=self._pump,
                    args=(direction, source, sink, pair),
                    name=f"relay-{direction}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _pump(
        self,
        direction: str,
        source: socket.socket,
        sink: socket.socket,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        """Forward ``source`` to ``sink`` applying this direction's faults, until EOF or error."""
        offset = 0
        started = time.monotonic()
        matcher = _Matcher()
        try:
            while True:
                faults = self._current(direction)
                size = _THROTTLED_BLOCK if faults.rate_bytes_per_s else _BLOCK
                if faults.drop_after_bytes is not None:
                    size = min(size, max(1, faults.drop_after_bytes - offset))
                block = source.recv(size)
                if not block:
                    sink.shutdown(socket.SHUT_WR)
                    return
                flip = matcher.find(block, faults.corrupt_match)
                at = faults.corrupt_at
                if at is not None and offset <= at < offset + len(block):
                    flip = at - offset
                if flip is not None:
                    flipped = bytearray(block)
                    flipped[flip] ^= 0xFF
                    block = bytes(flipped)
                if faults.delay_s:
                    time.sleep(faults.delay_s)
                sink.sendall(block)
                offset += len(block)
                with self._lock:
                    self._bytes[direction] += len(block)
                if faults.drop_after_bytes is not None and offset >= faults.drop_after_bytes:
                    for sock in pair:
                        _reset(sock)
                    return
                if faults.rate_bytes_per_s:
                    ahead = offset / faults.rate_bytes_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            for sock in pair:
                _reset(sock)

    def _current(self, direction: str) -> Faults:
        with self._lock:
            return self._faults[direction]


class _Matcher:
    """Finds ``corrupt_match`` strings across block boundaries, once per connection."""

    def __init__(self) -> None:
        self._tail = b""
        self._done = False

    def find(self, block: bytes, needles: tuple[bytes, ...]) -> int | None:
        """Index in ``block`` of the last byte of the first needle found, or None."""
        if self._done or not needles:
            return None
        window = self._tail + block
        found = [
            window.find(needle) + len(needle) - 1 - len(self._tail)
            for needle in needles
            if needle in window
        ]
        found = [end for end in found if end >= 0]
        keep = max(len(n) for n in needles) - 1
        self._tail = window[-keep:] if keep else b""
        if not found:
            return None
        self._done = True
        return min(found)


def _reset(sock: socket.socket) -> None:
    """Abort ``sock``: wake threads blocked on it, close it with a reset (linger 0).

    Ignores sockets already closed.
    """
    for action in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        lambda: sock.shutdown(socket.SHUT_RDWR),
        sock.close,
    ):
        with contextlib.suppress(OSError):
            action()
