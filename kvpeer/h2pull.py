"""A fast client transport for ``KVPeer.Pull``: rows received with ``recv_into`` straight into place.

grpcio's Python receive path copies every message twice under the GIL (slices,
then pieces, then one joined ``bytes``), which held a pull to about a third of
what a socket carries between two processes here. The server stays an ordinary
grpcio server (TLS, token, health, reflection unchanged; grpcurl still decodes
the stream). This client runs the Pull call over :mod:`kvpeer.h2conn`, a minimal
HTTP/2 connection, and reads each ``Chunk``'s ``data`` with ``recv_into``
straight into the caller's row: the kernel copies every byte once, Python never.

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
:data:`~kvpeer.wire.MAX_HEADER_BYTES` then exactly ``chunk_bytes`` of ``data``,
uncompressed; anything else raises :class:`~kvpeer.errors.WireError`. Checking
indices, keys and digests is the caller's job (:class:`~kvpeer.peer_client.PeerClient`
does it for both transports).
"""

from __future__ import annotations

import ssl
import tempfile
import threading
import time
from pathlib import Path

import hpack

from kvpeer import __version__
from kvpeer.endpoint import Endpoint
from kvpeer.errors import WireError
from kvpeer.h2conn import CallError, H2Connection
from kvpeer.security import TOKEN_HEADER, Security, TLSFiles
from kvpeer.wire import MAX_HEADER_BYTES, ChunkHeader, decode_chunk_header

PULL_PATH = "/kvpeer.v1.KVPeer/Pull"
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
        endpoint: the peer's address.
        security: TLS and the token, as for the peer's gRPC channel.
        chunk_bytes: the row size; a message must hold exactly one row.
    """

    def __init__(self, endpoint: Endpoint, *, security: Security, chunk_bytes: int) -> None:
        self.endpoint = endpoint
        self.chunk_bytes = chunk_bytes
        tls = security.tls
        self.ssl_context = None if tls is None else _client_context(tls)
        self.server_hostname = (tls.server_name if tls else None) or endpoint.host
        authority = tls.server_name if tls and tls.server_name else str(endpoint)
        headers: list[tuple[str, str]] = [
            (":method", "POST"),
            (":scheme", "http" if tls is None else "https"),
            (":path", PULL_PATH),
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
        """An idle connection still fit for a call, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if time.monotonic() - conn.idle_since <= IDLE_REUSE_S and conn.quiet():
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
    :class:`~kvpeer.h2conn.CallError` (the server's status, or UNAVAILABLE,
    DEADLINE_EXCEEDED, CANCELLED), or :class:`~kvpeer.errors.WireError` when the
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
        conn = H2Connection.open(
            self._transport.endpoint,
            self._transport.ssl_context,
            self._transport.server_hostname,
            self._deadline,
            self._attach,
        )
        conn.start_call(self._transport.headers, self._request, self._deadline)
        return conn.read_message(prefix, message_start=True)

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


def _client_context(tls: TLSFiles) -> ssl.SSLContext:
    """A TLS client context from PEM bytes: verify the server against ``tls.ca``, present ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca is not None:
        context.load_verify_locations(cadata=tls.ca.decode("ascii", "replace"))
    else:
        context.load_default_certs()
    if tls.cert is not None and tls.key is not None:
        # ssl loads a certificate chain from files only: write them to a private temp dir.
        with tempfile.TemporaryDirectory(prefix="kvpeer-tls-") as directory:
            cert, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
            cert.write_bytes(tls.cert)
            key.touch(mode=0o600)
            key.write_bytes(tls.key)
            context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context
