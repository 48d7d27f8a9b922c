"""The fast Pull listener: ``KVPeer.Pull`` over gRPC/HTTP/2, each row sent with one ``sendmsg``.

Why: grpcio's Python server API takes each response message as ``bytes``, so the
grpcio servicer copies every 2 MiB row twice in user space before the kernel's
copy (into the message, then into a gRPC slice): ~1.25 CPU-s per GB served,
against 0.26 for a plain TCP sender. This listener serves only
``POST /kvpeer.v1.KVPeer/Pull`` and sends each DATA frame of a row as
``sendmsg([frame header, gRPC prefix + Chunk header, memoryview(row)])`` on
plaintext connections, so the kernel's copy is the only one. ``ssl`` has no
``sendmsg``: TLS connections send the pieces one after another (OpenSSL copies
while it encrypts anyway). The bytes on the wire are an ordinary gRPC stream of
``kvpeer.v1.Chunk`` messages; grpcio, grpcurl (given the .proto) and
:mod:`kvpeer.transport.pull_client` read it alike. Handshake, Lookup, Release, health,
reflection, and Pull for clients that dial it, stay on the grpcio port, which
advertises this one in the handshake (``pull_port``).

The call's meaning is the grpcio servicer's: requests go through
:meth:`KVPeerServicer.open_pull <kvpeer.server.peer.service.KVPeerServicer.open_pull>`
and rows come from its :class:`~kvpeer.transport.pull_stream.PullStream` (same lease
table, validation, statuses and messages, stats, revocation). Security is the
server's :class:`~kvpeer.api.security.Security`: TLS and mutual TLS (ALPN ``h2``),
and the bearer token in ``authorization`` (constant-time compare, UNAUTHENTICATED).

The listener is four modules, each docstring stating its part of the HTTP/2
subset (RFC 9113: as much as a gRPC server of one method needs) and of the
bounds against hostile clients:

- this one: :class:`PullServer` and its options, binding, accepting, stopping;
- :mod:`kvpeer.transport.server_connection`: one connection's life and its calls
  (the response, trailers, deadlines, stalls, goodbyes), and its waits in ``poll``;
- :mod:`kvpeer.transport.server_frames`: what a connection receives (the client's
  preface, frames, header blocks, and each request's headers and body);
- :mod:`kvpeer.transport.server_send`: what a connection writes, and how
  (queued control frames, ``sendmsg`` or TLS pieces).

Bounds kept here: at most ``max_connections`` connections (more are closed at
accept).

Threads: one acceptor thread, and one thread per connection that does all of that
connection's I/O (:class:`~kvpeer.transport.server_connection.ServerConnection`).
Other threads only wake a connection: :meth:`PullStream.revoke` and
:meth:`PullServer.shutdown`. :meth:`PullServer.stop` is bounded: streams get
``grace`` seconds, then about a second to say goodbye, and every thread is joined.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.security import Security
from kvpeer.transport.pull_stream import PullStream
from kvpeer.transport.server_connection import ServerConnection, poke

log = logging.getLogger(__name__)

_JOIN_SLACK_S = 5.0

#: Keys of :meth:`PullServer.stats`.
STATS_KEYS = ("pull_port_connections", "pull_port_calls", "pull_port_refused_connections")


@dataclass(frozen=True)
class PullServerOptions:
    """Limits of the fast Pull listener (see the module docstring). Durations are seconds."""

    #: Connections served at once; more are closed at accept.
    max_connections: int = 256
    #: To finish the TLS handshake and the client's preface, and to send a request's
    #: headers and body.
    request_timeout_s: float = 10.0
    #: A connection without a call for this long is closed (GOAWAY first).
    idle_timeout_s: float = 60.0
    #: A call whose client takes no bytes for this long ends (its pins are released).
    stall_timeout_s: float = 30.0


class PullServer:
    """A started fast Pull listener; create, :meth:`start`, then :meth:`stop`.

    Args:
        open_pull: validates a serialized ``PullRequest`` and returns its
            :class:`PullStream` (raising :class:`Refusal`);
            ``KVPeerServicer.open_pull``.
        listen: host and port to bind (port 0: a free one, see :attr:`port`).
        security: TLS and the token, as for the grpcio port.
        options: limits and timeouts.

    Raises:
        ConfigError: (from :meth:`start`) the port cannot be bound, named ``pull_port``.
    """

    def __init__(
        self,
        open_pull: Callable[[bytes], PullStream],
        listen: Endpoint,
        security: Security,
        options: PullServerOptions = PullServerOptions(),
    ) -> None:
        self.open_pull = open_pull
        self.security = security
        self.ssl_context = security.server_ssl_context()
        self.options = options
        self._listen = listen
        self._lock = threading.Lock()
        self._connections: dict[ServerConnection, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._wake_acceptor, self._acceptor_woken = socket.socketpair()
        self._wake_acceptor.setblocking(False)
        self._stopping = False
        #: Monotonic time from which streams are cut (a stop's grace has passed).
        self.stop_at = math.inf
        self.port = 0
        self._calls = 0
        self._refused = 0

    def start(self) -> PullServer:
        self._listener = _bind(self._listen)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"kvpeer-pull-accept-{self.port}", daemon=True
        )
        self._acceptor.start()
        log.info("serving KVPeer.Pull (zero-copy sends) on %s", self._listen.with_port(self.port))
        return self

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stats(self) -> dict[str, int]:
        """Counters named by :data:`STATS_KEYS`: connections open now, calls since
        start (any outcome), connections closed at accept (over the limit)."""
        with self._lock:
            counts = (len(self._connections), self._calls, self._refused)
            return dict(zip(STATS_KEYS, counts, strict=True))

    def count_call(self) -> None:
        """A connection started answering a call (called from its thread)."""
        with self._lock:
            self._calls += 1

    def shutdown(self, grace: float = 0.0) -> None:
        """Accept no more connections; streams may run ``grace`` seconds more. Returns at once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self.stop_at = time.monotonic() + max(0.0, grace)
            connections = list(self._connections)
        poke(self._wake_acceptor)
        for conn in connections:
            conn.wake()

    def stop(self, grace: float = 0.0) -> None:
        """:meth:`shutdown`, then wait for every thread (at most ``grace`` + a few seconds)."""
        self.shutdown(grace)
        limit = time.monotonic() + max(0.0, grace) + _JOIN_SLACK_S
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, limit - time.monotonic()))
        with self._lock:
            threads = list(self._connections.values())
        for thread in threads:
            thread.join(max(0.0, limit - time.monotonic()))
            if thread.is_alive():
                log.error("pull connection thread %s did not stop in time", thread.name)
        self._wake_acceptor.close()
        self._acceptor_woken.close()

    # -- accepting ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        """Acceptor thread: admit connections until :meth:`shutdown`."""
        listener = self._listener
        assert listener is not None
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._acceptor_woken, select.POLLIN)
        try:
            while not self._stopping:
                poller.poll()
                if self._stopping:
                    break
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    # Out of descriptors or memory: let closing connections free some.
                    log.warning("accepting a pull connection failed: %s", exc)
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        time.sleep(0.1)
                    continue
                self._admit(sock, address)
        finally:
            listener.close()

    def _admit(self, sock: socket.socket, address: object) -> None:
        """Start a connection's thread, or close it at once (over the limit, stopping, no resources)."""
        with self._lock:
            full = self._stopping or len(self._connections) >= self.options.max_connections
            if full:
                self._refused += 1
        if full:
            log.debug("refusing a pull connection from %s: limit or stopping", address)
            sock.close()
            return
        try:
            conn = ServerConnection(self, sock, address)
        except OSError as exc:  # out of descriptors
            log.warning("cannot serve a pull connection from %s: %s", address, exc)
            sock.close()
            return
        thread = threading.Thread(target=conn.run, name=f"kvpeer-pull-{self.port}", daemon=True)
        with self._lock:
            self._connections[conn] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # out of threads
            log.warning("cannot serve a pull connection from %s: %s", address, exc)
            self.forget(conn)
            conn.discard()

    def forget(self, conn: ServerConnection) -> None:
        """A connection's thread is ending (called from that thread)."""
        with self._lock:
            self._connections.pop(conn, None)


def _bind(listen: Endpoint) -> socket.socket:
    host = listen.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server(
            (host, listen.port),
            family=family,
            backlog=128,
            dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
        )
    except OSError as exc:
        raise ConfigError("pull_port", f"cannot bind {listen}: {exc.strerror or exc}") from exc
    listener.setblocking(False)
    return listener
