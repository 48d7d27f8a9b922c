"""A fast client transport for ``KVPeer.Pull``: rows received with ``recv_into`` straight into place.

grpcio's Python receive path copies every message twice under the GIL (slices,
then pieces, then one joined ``bytes``), which held a pull to about a third of
what a socket carries between two processes here. This client runs the Pull call
over :mod:`kvpeer.transport.connection`, a minimal HTTP/2 connection, and reads each
``Chunk``'s ``data`` with ``recv_into`` straight into the caller's row: the
kernel copies every byte once, Python never.

Where it dials: a peer server also serves Pull alone on a second port with
zero-copy sends (:mod:`kvpeer.transport.pull_server`) and advertises it in the
handshake (``pull_port``). :meth:`H2PullTransport.use_pull_port` adopts it when
the client reached the peer on the peer's own port; a client that dialled
another port goes through a relay or a port mapping that would not carry the
pull port, so it keeps pulling on the port it dialled (the grpcio server serves
Pull there too). If the pull port refuses the connection, the call runs on the
main port and the transport forgets the pull port (and tells its owner, who may
handshake again to learn a new one).

A call takes an idle connection to the peer, or opens one (TLS with ALPN ``h2``,
the CA, a client certificate for mutual TLS, ``server_name`` to verify instead of
the host dialled; the bearer token in ``authorization``); one connection carries
one call at a time, so ``streams=N`` pulls use N connections on N threads
(``recv_into`` and the digest release the GIL). A connection whose call ended
cleanly goes back to the idle pool for the next call for a few seconds, which
saves the TCP and TLS handshakes of back-to-back pulls; if an idle connection
turns out closed before the server answered, the call runs again once on a new
connection (a Pull reads pinned rows, so repeating it is harmless).

Each message must be one row: a ``Chunk`` header of at most
:data:`~kvpeer.api.wire.MAX_HEADER_BYTES` then exactly ``chunk_bytes`` of ``data``,
uncompressed; anything else raises :class:`~kvpeer.api.errors.WireError`. Checking
indices, keys and digests is the caller's job (:class:`~kvpeer.client.peer.PeerClient`
does it for both transports).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import hpack

from kvpeer import __version__
from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import WireError
from kvpeer.api.security import TOKEN_HEADER, Security
from kvpeer.api.wire import MAX_HEADER_BYTES, ChunkHeader, decode_chunk_header
from kvpeer.transport import frames as h2
from kvpeer.transport.connection import CallError, ConnectFailed, H2Connection

log = logging.getLogger(__name__)

#: How long an idle connection is kept for the next call. Short: the server pings
#: idle connections (that ends their reuse) and a middlebox may drop them silently.
IDLE_REUSE_S = 5.0
#: Most idle connections kept per peer.
MAX_IDLE = 16


class H2PullTransport:
    """Runs Pull calls to one peer over pooled HTTP/2 connections.

    Holds what the calls share: the address, the TLS context (built once here, so
    bad PEM files fail now), the request headers and the idle connections.
    Thread-safe: any thread may :meth:`start` calls; :meth:`close` cancels the
    calls in progress, closes the idle connections and refuses later calls.

    Args:
        endpoint: the peer's address (its main port).
        security: TLS and the token, as for the peer's gRPC channel.
        chunk_bytes: the row size; a message must hold exactly one row.
        on_pull_port_lost: called (on a pull thread) when the adopted pull port
            refused a connection and was forgotten.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        security: Security,
        chunk_bytes: int,
        on_pull_port_lost: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.chunk_bytes = chunk_bytes
        tls = security.tls
        self.ssl_context = security.client_ssl_context()
        self.server_hostname = (tls.server_name if tls else None) or endpoint.host
        authority = tls.server_name if tls and tls.server_name else str(endpoint)
        headers: list[tuple[str, str]] = [
            (":method", "POST"),
            (":scheme", "http" if tls is None else "https"),
            (":path", h2.PULL_PATH),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", f"kvpeer-h2pull/{__version__}"),
        ]
        if security.token is not None:  # never indexed: kept out of HPACK tables
            headers.append(hpack.NeverIndexedHeaderTuple(TOKEN_HEADER, f"Bearer {security.token}"))
        self.headers = tuple(headers)
        self._lock = threading.Lock()
        self._calls: set[H2PullCall] = set()
        self._idle: list[H2Connection] = []
        self._closed = False
        self._pull_endpoint: Endpoint | None = None
        self._on_pull_port_lost = on_pull_port_lost

    def use_pull_port(self, pull_port: int, server_port: int) -> None:
        """Adopt a handshake's ``pull_port`` (0: none) from a server listening on ``server_port``.

        Calls dial it only when ``server_port`` is the port this transport dials:
        otherwise a relay or port mapping stands between, and calls stay on
        :attr:`endpoint`.
        """
        adopt = pull_port and server_port == self.endpoint.port
        with self._lock:
            self._pull_endpoint = self.endpoint.with_port(pull_port) if adopt else None

    @property
    def dial_endpoint(self) -> Endpoint:
        """Where new connections go: the adopted pull port, else :attr:`endpoint`."""
        with self._lock:
            return self._pull_endpoint or self.endpoint

    def pull_port_failed(self, endpoint: Endpoint, error: CallError) -> None:
        """``endpoint`` (the adopted pull port) refused a connection: dial the main port from now on."""
        with self._lock:
            lost = self._pull_endpoint == endpoint
            if lost:
                self._pull_endpoint = None
        if lost:
            log.warning("%s; pulling through %s instead", error, self.endpoint)
            if self._on_pull_port_lost is not None:
                self._on_pull_port_lost()

    def start(self, request: bytes, deadline: float) -> H2PullCall:
        """A call sending the serialized ``PullRequest`` ``request``; it connects when first iterated.

        ``deadline`` is a :func:`time.monotonic` time: the call fails with
        DEADLINE_EXCEEDED once it passes, and tells the server as ``grpc-timeout``.

        Raises:
            CallError: CANCELLED, the transport is closed.
        """
        with self._lock:
            if self._closed:
                raise CallError("CANCELLED", f"the client of {self.endpoint} is closed")
            call = H2PullCall(self, request, deadline)
            self._calls.add(call)
            return call

    def close(self) -> None:
        """Cancel the calls in progress, close idle connections, refuse new calls; idempotent."""
        with self._lock:
            self._closed = True
            calls, self._calls = list(self._calls), set()
            idle, self._idle = self._idle, []
        for call in calls:
            call.cancel()
        for conn in idle:
            conn.close()

    # -- for H2PullCall --------------------------------------------------------

    def take_idle(self) -> H2Connection | None:
        """An idle connection still fit for a call (to :attr:`dial_endpoint`), or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
                wanted = self._pull_endpoint or self.endpoint
            fresh = time.monotonic() - conn.idle_since <= IDLE_REUSE_S
            if fresh and conn.endpoint == wanted and conn.quiet():
                return conn
            conn.close()

    def put_idle(self, conn: H2Connection) -> None:
        """Keep a connection whose call ended cleanly for the next call (or close it)."""
        conn.idle_since = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def forget(self, call: H2PullCall) -> None:
        with self._lock:
            self._calls.discard(call)


class H2PullCall:
    """One ``KVPeer.Pull`` call: iterate for rows, then read each row's data into place.

        call = transport.start(request, deadline)
        try:
            for row in call:               # ChunkHeader(index, key, digest, data_len)
                call.read_into(dest)       # or call.skip()
        finally:
            call.close()

    Iteration stops at the server's OK status. Any other ending raises
    :class:`~kvpeer.transport.connection.CallError` (the server's status, or UNAVAILABLE,
    DEADLINE_EXCEEDED, CANCELLED), or :class:`~kvpeer.api.errors.WireError` when the
    server breaks HTTP/2, gRPC or ``Chunk`` framing. A row's data must be read or
    skipped before the next iteration.

    Thread contract: one thread iterates, reads and closes; :meth:`cancel` may come
    from any thread.
    """

    def __init__(self, transport: H2PullTransport, request: bytes, deadline: float) -> None:
        self._transport = transport
        self._request = request
        self._deadline = deadline
        self._lock = threading.Lock()  # guards _conn and _cancelled against cancel()
        self._conn: H2Connection | None = None
        self._cancelled = False
        self._started = False
        self._data_left = 0
        self._message_buf = bytearray(MAX_HEADER_BYTES)

    def __iter__(self) -> H2PullCall:
        return self

    def __next__(self) -> ChunkHeader:
        """The next row's header; its ``data_len`` bytes are to be read with :meth:`read_into`."""
        if self._data_left:
            raise RuntimeError("read_into() or skip() the previous row before the next one")
        buf = memoryview(self._message_buf)
        if self._started:
            more = self._connection().read_message(buf[:5], message_start=True)
        else:
            self._started = True
            more = self._begin(buf[:5])
        if not more:
            self._connection().finish()
            raise StopIteration
        chunk_bytes = self._transport.chunk_bytes
        if buf[0] != 0:
            raise WireError("the peer sent a compressed message, but no compression was agreed")
        length = int.from_bytes(buf[1:5], "big")
        header_len = length - chunk_bytes
        if not 0 < header_len <= MAX_HEADER_BYTES:
            raise WireError(
                f"a message of {length} bytes is not one row of {chunk_bytes} bytes "
                f"plus a header of at most {MAX_HEADER_BYTES}"
            )
        self._connection().read_message(buf[:header_len])
        try:
            row = decode_chunk_header(buf[:header_len])
        except WireError as exc:
            raise WireError(
                f"a message of {length} bytes is not one row of {chunk_bytes} bytes: {exc}"
            ) from None
        if row.data_len != chunk_bytes:
            raise WireError(f"row {row.index} has {row.data_len} bytes, expected {chunk_bytes}")
        self._data_left = row.data_len
        return row

    def read_into(self, dest: memoryview) -> None:
        """Receive the current row's data straight into ``dest`` (a writable buffer of ``data_len`` bytes).

        On failure ``dest`` holds part of the row: never use it then.
        """
        view = memoryview(dest).cast("B")
        if view.nbytes != self._data_left:
            raise ValueError(f"dest has {view.nbytes} bytes, the row has {self._data_left}")
        self._connection().read_message(view)
        self._data_left = 0

    def skip(self) -> None:
        """Receive and drop the current row's data."""
        scratch = memoryview(bytearray(min(self._data_left, 1 << 16)))
        while self._data_left:
            size = min(self._data_left, len(scratch))
            self._connection().read_message(scratch[:size])
            self._data_left -= size

    def cancel(self) -> None:
        """Stop the call from any thread: the reading thread gets CANCELLED at once."""
        with self._lock:
            self._cancelled = True
            if self._conn is not None:
                self._conn.cancel()

    def close(self) -> None:
        """End the call: its connection goes back to the pool if the call ended cleanly.

        A connection in the middle of a call is closed (the server then cancels
        the call). Idempotent.
        """
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            if conn.reusable and not self._data_left:
                self._transport.put_idle(conn)
            else:
                conn.close()
        self._transport.forget(self)

    # -- private -------------------------------------------------------------

    def _begin(self, prefix: memoryview) -> bool:
        """Start the call and read the first message's prefix (False: no message).

        On an idle connection that turns out closed before the server answered,
        starts once more on a new connection.
        """
        conn = self._transport.take_idle()
        if conn is not None:
            self._attach(conn)
            try:
                conn.start_call(self._transport.headers, self._request, self._deadline)
                return conn.read_message(prefix, message_start=True)
            except CallError as exc:
                if exc.code != "UNAVAILABLE" or conn.response_started:
                    raise
            self._detach(conn)
        conn = self._connect()
        conn.start_call(self._transport.headers, self._request, self._deadline)
        return conn.read_message(prefix, message_start=True)

    def _connect(self) -> H2Connection:
        """A new connection to the pull port, or to the main port if that one refuses."""
        transport = self._transport
        endpoint = transport.dial_endpoint
        while True:
            try:
                return H2Connection.open(
                    endpoint,
                    transport.ssl_context,
                    transport.server_hostname,
                    self._deadline,
                    self._attach,
                )
            except ConnectFailed as exc:
                if endpoint == transport.endpoint:
                    raise
                transport.pull_port_failed(endpoint, exc)
                endpoint = transport.endpoint

    def _attach(self, conn: H2Connection) -> None:
        """Make ``conn`` this call's, so that :meth:`cancel` reaches it."""
        with self._lock:
            self._conn = conn
            if self._cancelled:
                conn.cancel()

    def _detach(self, conn: H2Connection) -> None:
        with self._lock:
            self._conn = None
        conn.close()

    def _connection(self) -> H2Connection:
        conn = self._conn
        if conn is None:
            raise CallError("CANCELLED", "the call is closed")
        return conn
