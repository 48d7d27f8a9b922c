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

HTTP/2 (RFC 9113), as much as a gRPC server of one method needs:

- the server preface (SETTINGS: one concurrent stream, a receive window of one
  request) and the client's, checked byte for byte; SETTINGS acknowledged,
  PING answered, PRIORITY and unknown frames ignored;
- the client's SETTINGS_MAX_FRAME_SIZE, SETTINGS_INITIAL_WINDOW_SIZE and
  SETTINGS_HEADER_TABLE_SIZE honoured; connection and stream send windows never
  exceeded (the sender waits for WINDOW_UPDATE); request bytes given back to
  the connection window as they arrive;
- one call at a time per connection, on streams the client numbers upwards; a
  second concurrent stream gets RST_STREAM(REFUSED_STREAM); RST_STREAM from the
  client stops its call at once; GOAWAY from the client closes the connection
  after its call, and the server sends GOAWAY before it closes one;
- response HEADERS (``:status 200``, ``content-type: application/grpc``), DATA,
  trailers with ``grpc-status`` and ``grpc-message`` (percent-encoded), and
  trailers-only responses for calls refused before any row; anything but
  ``POST /kvpeer.v1.KVPeer/Pull`` is UNIMPLEMENTED; ``grpc-timeout`` is the call's
  deadline.

A call that must end while a frame is half written (revocation, its deadline,
server stop, the client resetting the stream or reading nothing for
``stall_timeout_s``) cannot send trailers: its connection is closed instead, and
the client sees UNAVAILABLE. Between frames it ends with trailers (UNAVAILABLE
for revocation and stop, DEADLINE_EXCEEDED, CANCELLED for a stall).

Bounds against hostile clients: at most ``max_connections`` connections (more are
closed at accept); frames of at most 16 KiB and header blocks of at most 16 KiB
from clients; the same 1 MiB request limit as the grpcio port
(RESOURCE_EXHAUSTED); control frames owed to a client that does not read them
capped at 1 MiB; a connection must complete TLS, its preface and each request
within ``request_timeout_s``, is closed after ``idle_timeout_s`` without a call,
and a call whose client takes nothing for ``stall_timeout_s`` (or past its
deadline) ends, so its lease's pins are released. Bytes that break HTTP/2 get a
GOAWAY naming the problem, then the connection is closed; the server goes on.

Threads: one acceptor thread, and one thread per connection that does all of that
connection's I/O on a non-blocking socket, waiting in ``poll`` (never spinning)
on the socket and a wake-up socket pair. Other threads only wake it
(:meth:`_Connection.wake`): :meth:`PullStream.revoke` and :meth:`PullServer.shutdown`.
:meth:`PullServer.stop` is bounded: streams get ``grace`` seconds, then about a
second to say goodbye, and every thread is joined.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import hpack

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.limits import MAX_REQUEST_BYTES, status_details
from kvpeer.api.security import TOKEN_HEADER, Security
from kvpeer.transport import frames as h2
from kvpeer.transport.pull_stream import REVOKED_MESSAGE, PullStream, Refusal

log = logging.getLogger(__name__)

#: Largest frame and header block a client may send us (SETTINGS_MAX_FRAME_SIZE
#: stays at its default; a Pull request's headers are a few hundred bytes).
MAX_RECEIVE_FRAME = h2.DEFAULT_MAX_FRAME
MAX_HEADER_BLOCK = 16 << 10
#: Stream receive window: one request at the limit, plus one byte to see it exceeded.
_REQUEST_WINDOW = h2.GRPC_PREFIX_BYTES + MAX_REQUEST_BYTES + 1
#: Control frames owed to a client (ACKs, window updates) beyond this: it does not read.
_MAX_OUTBOX = 1 << 20
#: Bytes read from the socket per wake-up before the thread turns to sending again.
_READ_BUDGET = 256 << 10
_READ_CHUNK = 64 << 10
#: Largest piece given to one ``SSLSocket.send`` (OpenSSL wants a retry to repeat it).
_TLS_WRITE = 256 << 10
#: Pieces shorter than this are joined before TLS sends them (headers, control frames).
_SMALL_PIECE = 16 << 10
#: After a stop's grace: time to flush goodbyes (trailers, GOAWAY) before a hard close.
_STOP_FLUSH_S = 0.5
#: How long a closing connection waits for the client to read what was sent last.
_LINGER_S = 1.0
_JOIN_SLACK_S = 5.0

#: Keys of :meth:`PullServer.stats`.
STATS_KEYS = ("pull_port_connections", "pull_port_calls", "pull_port_refused_connections")

_OK = grpc.StatusCode.OK
_STATUS = {code: code.value[0] for code in grpc.StatusCode}
_SERVER_SETTINGS = h2.frame(
    h2.SETTINGS,
    0,
    0,
    h2.settings_payload(
        {
            h2.MAX_CONCURRENT_STREAMS: 1,
            h2.INITIAL_WINDOW_SIZE: _REQUEST_WINDOW,
            h2.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
        }
    ),
) + h2.frame(h2.WINDOW_UPDATE, 0, 0, h2.UINT32.pack(_REQUEST_WINDOW))


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
        self._connections: dict[_Connection, threading.Thread] = {}
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
        _poke(self._wake_acceptor)
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
            conn = _Connection(self, sock, address)
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

    def forget(self, conn: _Connection) -> None:
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


def _poke(sock: socket.socket) -> None:
    """Wake the thread polling the other end of a socket pair (any thread; never blocks)."""
    with contextlib.suppress(OSError):  # closed already, or full: a wake-up is pending anyway
        sock.send(b"\0")


class _ConnectionError(Exception):
    """The client broke HTTP/2: answer GOAWAY(``code``) naming the problem, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Closed(Exception):
    """The connection cannot go on (the client left, stalled mid-frame, or is cut): close it."""


class _Ending(Exception):
    """A call must end between frames, with ``code`` and ``message`` (None: the client reset it)."""

    def __init__(self, code: grpc.StatusCode | None, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class _Call:
    """The one call of a connection: its request as it arrives, then its response's state."""

    stream_id: int
    #: Monotonic times: the request must be complete by ``request_by``; ``deadline``
    #: is the client's grpc-timeout.
    request_by: float
    deadline: float = math.inf
    send_window: int = h2.DEFAULT_WINDOW
    receive_window: int = _REQUEST_WINDOW
    body: bytearray = field(default_factory=bytearray)
    request_ended: bool = False
    #: Set while the request arrives when the call is refused (trailers-only answer).
    refusal: tuple[grpc.StatusCode, str] | None = None
    #: The client sent RST_STREAM.
    reset: bool = False


@dataclass
class _HeaderBlock:
    """A header block being received (HEADERS, then CONTINUATION until END_HEADERS)."""

    stream_id: int
    end_stream: bool
    data: bytearray


class _Connection:
    """One client connection: HTTP/2 state and at most one Pull at a time.

    Thread contract: :meth:`run` runs on the connection's own thread and owns every
    field; other threads only call :meth:`wake`. Frame handlers (``_on_*``) only
    change state and queue control frames; the serving code does all sending.
    """

    def __init__(self, server: PullServer, sock: socket.socket, address: object) -> None:
        self._server = server
        self._options = server.options
        self._sock: socket.socket = sock
        self._address = address
        self._wake_send, self._wake_receive = socket.socketpair()
        self._wake_send.setblocking(False)
        self._wake_receive.setblocking(False)
        self._poller = select.poll()
        self._scratch = memoryview(bytearray(_READ_CHUNK))
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._preface_seen = False
        self._settings_seen = False
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self._peer_max_frame = h2.DEFAULT_MAX_FRAME
        self._peer_initial_window = h2.DEFAULT_WINDOW
        self._send_window = h2.DEFAULT_WINDOW
        self._receive_window = h2.DEFAULT_WINDOW + _REQUEST_WINDOW
        self._last_stream = 0
        self._goaway_received = False
        self._block: _HeaderBlock | None = None
        self._call: _Call | None = None
        self._opened_at = time.monotonic()
        #: When the last call ended (or the connection opened): the idle clock.
        self._idle_since = self._opened_at
        #: When the current call's client last took bytes: the stall clock.
        self._progress = self._idle_since

    def wake(self) -> None:
        """Make the connection's thread look at its state again (any thread)."""
        _poke(self._wake_send)

    def discard(self) -> None:
        """Close a connection whose thread never started."""
        self._close(None)

    # -- the connection's life -------------------------------------------------------

    def run(self) -> None:
        """Connection thread: serve calls until the client leaves, idles, breaks HTTP/2 or the server stops."""
        goodbye: tuple[int, str] | None = (h2.NO_ERROR, "")
        try:
            self._open()
            while self._serve_next_call():
                pass
        except _ConnectionError as exc:
            log.debug("pull client %s broke HTTP/2: %s", self._address, exc.message)
            goodbye = (exc.code, exc.message)
        except (_Closed, OSError) as exc:
            log.debug("pull connection from %s closed: %s", self._address, exc)
            goodbye = None
        except Exception:
            log.exception("pull connection from %s failed", self._address)
            goodbye = (h2.INTERNAL_ERROR, "internal error")
        finally:
            self._close(goodbye)
            self._server.forget(self)

    def _open(self) -> None:
        """TLS handshake (ALPN h2), our preface; the client's preface arrives with the first read."""
        by = time.monotonic() + self._options.request_timeout_s
        self._sock.setblocking(False)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self._server.ssl_context
        if context is not None:
            self._sock = context.wrap_socket(
                self._sock, server_side=True, do_handshake_on_connect=False
            )
        self._poller.register(self._sock, select.POLLIN)
        self._poller.register(self._wake_receive, select.POLLIN)
        self._queue(_SERVER_SETTINGS)  # first: frames answering the client's come after
        if isinstance(self._sock, ssl.SSLSocket):
            self._tls_handshake(self._sock, by)
        self._flush(by)

    def _tls_handshake(self, sock: ssl.SSLSocket, by: float) -> None:
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._wait(by, readable=True, writable=False, what="the TLS handshake", read=False)
            except ssl.SSLWantWriteError:
                self._wait(by, readable=False, writable=True, what="the TLS handshake", read=False)
            except (ssl.SSLError, OSError) as exc:
                raise _Closed(f"TLS handshake failed: {exc}") from None
        protocol = sock.selected_alpn_protocol()
        if protocol not in (None, "h2"):
            raise _Closed(f"the client chose ALPN {protocol!r}, not h2")

    def _close(self, goodbye: tuple[int, str] | None) -> None:
        """Say GOAWAY when there is a ``goodbye``, let the client read it, close everything."""
        if goodbye is not None:
            code, message = goodbye
            payload = h2.UINT32.pack(self._last_stream) + h2.UINT32.pack(code)
            self._queue(h2.frame(h2.GOAWAY, 0, 0, payload + message.encode()[:256]), force=True)
            with contextlib.suppress(_Closed, _ConnectionError, OSError):
                self._flush(time.monotonic() + _LINGER_S)
            self._linger()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._wake_send.close()
        self._wake_receive.close()

    def _linger(self) -> None:
        """Half-close and drain what the client still sends for a moment, so that the
        last frames are not lost to a reset (closing with unread input sends RST)."""
        try:
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
            self._poller.unregister(self._wake_receive)
            self._poller.modify(self._sock, select.POLLIN)
        except (OSError, KeyError):
            return
        by = time.monotonic() + _LINGER_S
        drained = 0
        while drained < _MAX_OUTBOX and time.monotonic() < by:
            if not self._poller.poll(max(0.0, by - time.monotonic()) * 1000):
                return
            try:
                received = self._sock.recv_into(self._scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError:
                return
            if not received:
                return
            drained += received

    # -- calls -------------------------------------------------------------------------

    def _serve_next_call(self) -> bool:
        """Wait for a request and answer it; False when the connection should close."""
        while True:
            call = self._call
            if call is not None and (call.refusal is not None or call.request_ended):
                break
            if call is None and (self._goaway_received or self._server.stopping):
                return False
            now = time.monotonic()
            if call is None:
                by = self._idle_since + self._options.idle_timeout_s
                if not self._settings_seen:  # the client's preface is still due
                    by = min(by, self._opened_at + self._options.request_timeout_s)
                if now >= by:
                    log.debug("closing idle pull connection from %s", self._address)
                    return False
                self._flush(by)
                self._wait(by, readable=True, writable=False, what="a request")
            elif now >= call.deadline:
                call.refusal = (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            elif now >= call.request_by:
                raise _ConnectionError(
                    h2.ENHANCE_YOUR_CALM,
                    f"the request did not arrive within {self._options.request_timeout_s} s",
                )
            elif self._server.stopping:
                call.refusal = (grpc.StatusCode.UNAVAILABLE, _STOPPING_MESSAGE)
            else:
                by = min(call.request_by, call.deadline)
                self._flush(by)
                self._wait(by, readable=True, writable=False, what="a request")
        try:
            self._answer(call)
        finally:
            self._call = None
            self._idle_since = time.monotonic()
        return True

    def _answer(self, call: _Call) -> None:
        """Refuse ``call`` or stream its rows, then end it."""
        self._server.count_call()
        stream: PullStream | None = None
        try:
            if call.refusal is None and not call.reset:
                try:
                    stream = self._server.open_pull(_request_message(call.body))
                except Refusal as refusal:
                    call.refusal = (refusal.code, refusal.message)
            call.body = bytearray()
            if call.reset:
                return
            if stream is None:
                assert call.refusal is not None
                self._end_call(call, *call.refusal, trailers_only=True)
                return
            stream.set_waker(self.wake)
            self._stream_rows(call, stream)
        finally:
            if stream is not None:
                stream.close()

    def _stream_rows(self, call: _Call, stream: PullStream) -> None:
        self._progress = time.monotonic()
        self._queue_headers(
            call.stream_id, [(":status", "200"), ("content-type", "application/grpc")]
        )
        try:
            while True:
                self._check(call, stream)
                with stream.lock:
                    if stream.revoked:
                        raise _Ending(grpc.StatusCode.UNAVAILABLE, REVOKED_MESSAGE)
                    item = stream.next_row()
                    if item is None:
                        break
                    header, row = item
                    self._send_message(call, stream, header, row)
                stream.count_row(len(row))
        except _Ending as ending:
            if ending.code is not None:  # None: the client reset the stream
                self._end_call(call, ending.code, ending.message)
            return
        self._end_call(call, _OK, "")

    def _send_message(
        self, call: _Call, stream: PullStream, header: bytes, row: memoryview
    ) -> None:
        """Send one ``Chunk`` message in DATA frames: prefix and header, then the row in place."""
        message_bytes = len(header) + len(row)
        head = memoryview(b"\0" + message_bytes.to_bytes(4, "big") + header)
        body = memoryview(row).cast("B") if row.format != "B" else row
        pieces = [head, body]
        left = len(head) + len(body)
        while left:
            size = self._frame_room(call, stream, left)
            frame = [h2.frame_header(size, h2.DATA, 0, call.stream_id)]
            taken = 0
            while taken < size:
                piece = pieces[0]
                part = min(len(piece), size - taken)
                frame.append(piece[:part])
                if part == len(piece):
                    pieces.pop(0)
                else:
                    pieces[0] = piece[part:]
                taken += part
            self._send_window -= size
            call.send_window -= size
            left -= size
            self._write(frame, lambda: self._send_by(call, stream, mid_frame=True))

    def _frame_room(self, call: _Call, stream: PullStream, left: int) -> int:
        """Bytes the next DATA frame may carry, after waiting for the client's windows."""
        while True:
            self._check(call, stream)
            room = min(left, self._peer_max_frame, self._send_window, call.send_window)
            if room > 0:
                return room
            by = self._send_by(call, stream, mid_frame=False)
            if time.monotonic() < by:  # else _check ends the call cleanly
                self._flush(by)
                self._wait(by, readable=True, writable=False, what="a WINDOW_UPDATE")

    def _check(self, call: _Call, stream: PullStream | None) -> None:
        """Between frames: raise :class:`_Ending` if the call must end now."""
        if call.reset:
            raise _Ending(None)
        if stream is not None and stream.revoked:
            raise _Ending(grpc.StatusCode.UNAVAILABLE, REVOKED_MESSAGE)
        now = time.monotonic()
        if now >= call.deadline:
            raise _Ending(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if now >= self._server.stop_at:
            raise _Ending(grpc.StatusCode.UNAVAILABLE, _STOPPING_MESSAGE)
        stall = self._options.stall_timeout_s
        if now >= self._progress + stall:
            raise _Ending(
                grpc.StatusCode.CANCELLED,
                f"the client took no data for {stall:g} s: the call was ended to release its rows",
            )

    def _send_by(self, call: _Call, stream: PullStream, *, mid_frame: bool) -> float:
        """The time a wait in ``call`` may last; mid-frame, a reason to end it closes the connection."""
        if mid_frame:
            try:
                self._check(call, stream)
            except _Ending as ending:
                raise _Closed(f"the call ended mid-frame: {ending.message or 'reset'}") from None
        return min(
            call.deadline, self._server.stop_at, self._progress + self._options.stall_timeout_s
        )

    def _end_call(
        self, call: _Call, code: grpc.StatusCode, message: str, *, trailers_only: bool = False
    ) -> None:
        """Send the call's status (trailers, or a trailers-only response), then forget it."""
        fields = [(":status", "200"), ("content-type", "application/grpc")] if trailers_only else []
        fields.append(("grpc-status", str(_STATUS[code])))
        if message:
            fields.append(("grpc-message", h2.encode_grpc_message(status_details(message))))
        self._queue_headers(call.stream_id, fields, end_stream=True)
        if not call.request_ended:  # stop the client's upload: the answer is complete
            self._queue(h2.frame(h2.RST_STREAM, 0, call.stream_id, h2.UINT32.pack(h2.NO_ERROR)))
        now = time.monotonic()
        self._flush(min(now + self._options.stall_timeout_s, self._server.stop_at + _STOP_FLUSH_S))

    # -- sending ---------------------------------------------------------------------------

    def _queue(self, data: bytes, *, force: bool = False) -> None:
        """Queue a control frame for the next write (frame handlers and the serving code)."""
        if self._outbox_bytes + len(data) > _MAX_OUTBOX and not force:
            raise _ConnectionError(
                h2.ENHANCE_YOUR_CALM, "the client sends frames but does not read the answers"
            )
        self._outbox.append(data)
        self._outbox_bytes += len(data)

    def _queue_headers(
        self, stream_id: int, fields: list[tuple[str, str]], *, end_stream: bool = False
    ) -> None:
        block = self._encoder.encode(fields)
        limit = self._peer_max_frame
        chunks = [block[i : i + limit] for i in range(0, len(block), limit)] or [b""]
        for n, chunk in enumerate(chunks):
            flags = h2.END_HEADERS if n == len(chunks) - 1 else 0
            if n == 0:
                self._queue(
                    h2.frame(
                        h2.HEADERS, flags | (h2.END_STREAM if end_stream else 0), stream_id, chunk
                    ),
                    force=True,
                )
            else:
                self._queue(h2.frame(h2.CONTINUATION, flags, stream_id, chunk), force=True)

    def _take_outbox(self) -> list[bytes]:
        if not self._outbox:
            return []
        data = b"".join(self._outbox)
        self._outbox.clear()
        self._outbox_bytes = 0
        return [data]

    def _flush(self, by: float) -> None:
        """Send the queued control frames; raise :class:`_Closed` if the client does not take them by ``by``."""
        pieces = self._take_outbox()
        if pieces:
            self._write(pieces, lambda: by)

    def _write(self, pieces: list, wait_until: Callable[[], float]) -> None:
        """Send queued control frames, then ``pieces`` (bytes or memoryviews), all of them.

        ``wait_until`` gives the latest time each wait for the socket may last (and
        may raise to give up). Plaintext: one ``sendmsg`` per attempt, no copy;
        TLS: one piece per ``send``, retried with the same bytes as OpenSSL asks.
        """
        iov = [memoryview(p) for p in (*self._take_outbox(), *pieces)]
        tls = isinstance(self._sock, ssl.SSLSocket)
        if tls:  # one TLS record for the small pieces before a row, not one each
            iov = _coalesce_small(iov)
        while iov:
            want_write = True
            try:
                if tls:
                    sent = self._sock.send(iov[0][:_TLS_WRITE])
                else:
                    sent = self._sock.sendmsg(iov)
            except (BlockingIOError, ssl.SSLWantWriteError):
                sent = 0
            except ssl.SSLWantReadError:
                sent, want_write = 0, False
            except OSError as exc:
                raise _Closed(f"sending failed: {exc}") from None
            if sent:
                self._progress = time.monotonic()
                while sent:
                    first = iov[0]
                    if sent >= len(first):
                        sent -= len(first)
                        iov.pop(0)
                    else:
                        iov[0] = first[sent:]
                        sent = 0
                continue
            self._wait(wait_until(), readable=True, writable=want_write, what="the client to read")

    # -- receiving -------------------------------------------------------------------------

    def _wait(
        self, by: float, *, readable: bool, writable: bool, what: str, read: bool = True
    ) -> None:
        """Wait in ``poll`` until the socket is ready, a wake-up, or ``by``; handle what arrived
        (unless not ``read``: the TLS handshake reads for itself).

        Raises :class:`_Closed` once ``by`` has passed, or when the server stopped
        long enough ago.
        """
        hard_stop = self._server.stop_at + _STOP_FLUSH_S
        by = min(by, hard_stop)
        now = time.monotonic()
        if now >= by:
            reason = "the server stopped" if now >= hard_stop else f"timed out waiting for {what}"
            raise _Closed(reason)
        if read and readable and isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            self._receive()  # OpenSSL holds decrypted bytes that poll cannot see
            return
        events = (select.POLLIN if readable else 0) | (select.POLLOUT if writable else 0)
        self._poller.modify(self._sock, events)
        timeout_ms = None if math.isinf(by) else max(0.0, by - now) * 1000
        for fd, event in self._poller.poll(timeout_ms):
            if fd == self._wake_receive.fileno():
                with contextlib.suppress(OSError):
                    self._wake_receive.recv(64)
            elif read and event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                self._receive()  # raises on an error or hang-up

    def _receive(self) -> None:
        """Read what the socket has (up to a budget) and handle every complete frame."""
        budget = _READ_BUDGET
        while budget > 0:
            try:
                received = self._sock.recv_into(self._scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                raise _Closed("the client closed the connection") from None
            except OSError as exc:
                raise _Closed(f"receiving failed: {exc}") from None
            if not received:
                raise _Closed("the client closed the connection")
            self._inbox += self._scratch[:received]
            self._parse_inbox()
            budget -= received
            if received < len(self._scratch) and not isinstance(self._sock, ssl.SSLSocket):
                return

    def _parse_inbox(self) -> None:
        buf = self._inbox
        position = 0
        if not self._preface_seen:
            seen = bytes(buf[: len(h2.PREFACE)])
            if not h2.PREFACE.startswith(seen):
                raise _ConnectionError(
                    h2.PROTOCOL_ERROR,
                    "not an HTTP/2 client preface: this port speaks gRPC (HTTP/2) only",
                )
            if len(seen) < len(h2.PREFACE):
                return
            self._preface_seen = True
            position = len(h2.PREFACE)
        while len(buf) - position >= h2.FRAME_HEADER_BYTES:
            length = int.from_bytes(buf[position : position + 3], "big")
            if length > MAX_RECEIVE_FRAME:
                raise _ConnectionError(
                    h2.FRAME_SIZE_ERROR,
                    f"a frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {MAX_RECEIVE_FRAME}",
                )
            end = position + h2.FRAME_HEADER_BYTES + length
            if end > len(buf):
                break
            kind, flags = buf[position + 3], buf[position + 4]
            stream_id = int.from_bytes(buf[position + 5 : position + 9], "big") & h2.LAST_STREAM_ID
            payload = bytes(buf[position + h2.FRAME_HEADER_BYTES : end])
            position = end
            self._on_frame(kind, flags, stream_id, payload)
        del buf[:position]

    # -- frames from the client -------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is not None and (
            kind != h2.CONTINUATION or stream_id != self._block.stream_id
        ):
            raise _ConnectionError(
                h2.PROTOCOL_ERROR, "a header block was interrupted by another frame"
            )
        if not self._settings_seen and (kind != h2.SETTINGS or flags & h2.ACK):
            raise _ConnectionError(h2.PROTOCOL_ERROR, "the client preface must end with SETTINGS")
        if kind == h2.DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == h2.HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == h2.CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == h2.SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == h2.PING:
            if len(payload) != 8:
                raise _ConnectionError(h2.FRAME_SIZE_ERROR, "a PING frame has 8 bytes")
            if stream_id:
                raise _ConnectionError(h2.PROTOCOL_ERROR, "PING on a stream")
            if not flags & h2.ACK:
                self._queue(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == h2.RST_STREAM:
            self._on_reset(stream_id, payload)
        elif kind == h2.GOAWAY:
            self._goaway_received = True
        elif kind == h2.PUSH_PROMISE:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "clients must not send PUSH_PROMISE")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _check_stream_id(self, stream_id: int, what: str) -> None:
        if stream_id == 0 or stream_id > self._last_stream:
            raise _ConnectionError(
                h2.PROTOCOL_ERROR, f"{what} on stream {stream_id}, which the client never opened"
            )

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._check_stream_id(stream_id, "DATA")
        self._receive_window -= len(payload)
        if self._receive_window < 0:
            raise _ConnectionError(h2.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        if payload:  # request bytes are tiny: give them back at once
            self._queue(h2.frame(h2.WINDOW_UPDATE, 0, 0, h2.UINT32.pack(len(payload))))
            self._receive_window += len(payload)
        call = self._call
        if call is None or call.stream_id != stream_id or call.request_ended:
            return  # a stream that was refused, reset or answered: its data is dropped
        call.receive_window -= len(payload)
        if call.receive_window < 0:
            raise _ConnectionError(h2.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        data = _unpadded(flags, payload, "DATA")
        if call.refusal is None:
            call.body += data
            if len(call.body) > h2.GRPC_PREFIX_BYTES + MAX_REQUEST_BYTES:
                call.body = bytearray()
                call.refusal = (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request exceeds {MAX_REQUEST_BYTES} bytes, the limit of a kvpeer request",
                )
        if flags & h2.END_STREAM:
            call.request_ended = True

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise _ConnectionError(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        call = self._call
        trailers = call is not None and stream_id == call.stream_id
        if not trailers:
            if stream_id <= self._last_stream:
                raise _ConnectionError(
                    h2.STREAM_CLOSED, f"HEADERS on stream {stream_id}, which is closed"
                )
            self._last_stream = stream_id
        fragment = _unpadded(flags, payload, "HEADERS")
        if flags & h2.PRIORITY_FLAG:
            if len(fragment) < 5:
                raise _ConnectionError(h2.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            fragment = fragment[5:]
        self._block = _HeaderBlock(stream_id, bool(flags & h2.END_STREAM), bytearray(fragment))
        self._grow_block(flags, b"")

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "CONTINUATION without a header block")
        self._grow_block(flags, payload)

    def _grow_block(self, flags: int, fragment: bytes) -> None:
        block = self._block
        assert block is not None
        block.data += fragment
        if len(block.data) > MAX_HEADER_BLOCK:
            raise _ConnectionError(
                h2.ENHANCE_YOUR_CALM, f"a header block exceeds {MAX_HEADER_BLOCK} bytes"
            )
        if not flags & h2.END_HEADERS:
            return
        self._block = None
        try:  # every block is decoded, refused or not, to keep HPACK's table in step
            fields = self._decoder.decode(bytes(block.data), raw=True)
        except (hpack.HPACKError, ValueError, IndexError) as exc:
            raise _ConnectionError(
                h2.COMPRESSION_ERROR, f"undecodable header block: {exc}"
            ) from None
        call = self._call
        if call is not None and call.stream_id == block.stream_id:
            if not block.end_stream:
                raise _ConnectionError(
                    h2.PROTOCOL_ERROR, "a second header block that does not end the request"
                )
            call.request_ended = True
            return
        if call is not None or self._goaway_received or self._server.stopping:
            self._queue(
                h2.frame(h2.RST_STREAM, 0, block.stream_id, h2.UINT32.pack(h2.REFUSED_STREAM))
            )
            return
        self._call = self._new_call(block.stream_id, dict(fields), block.end_stream)

    def _new_call(self, stream_id: int, fields: dict[bytes, bytes], ended: bool) -> _Call:
        now = time.monotonic()
        call = _Call(
            stream_id,
            request_by=now + self._options.request_timeout_s,
            send_window=self._peer_initial_window,
            request_ended=ended,
        )
        refusal = self._server.security.token_refusal(fields.get(TOKEN_HEADER.encode()))
        if refusal is not None:
            call.refusal = (grpc.StatusCode.UNAUTHENTICATED, refusal)
            return call
        method = fields.get(b":method", b"").decode("latin-1")
        path = fields.get(b":path", b"").decode("latin-1")
        if method != "POST" or path != h2.PULL_PATH:
            call.refusal = (
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method} {path[:200]!r} is not served on this port, which serves only "
                f"POST {h2.PULL_PATH}: call the node's main port",
            )
            return call
        content_type = fields.get(b"content-type", b"").decode("latin-1")
        if not content_type.startswith("application/grpc"):
            call.refusal = (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"content-type {content_type[:100]!r} is not application/grpc",
            )
            return call
        encoding = fields.get(b"grpc-encoding", b"identity").decode("latin-1")
        if encoding != "identity":
            call.refusal = (
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding[:100]!r} is not supported: send requests uncompressed",
            )
            return call
        timeout = fields.get(b"grpc-timeout")
        if timeout is not None:
            try:
                call.deadline = now + h2.parse_grpc_timeout(timeout.decode("latin-1"))
            except ValueError as exc:
                call.refusal = (grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return call

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2.ACK:
            if payload:
                raise _ConnectionError(h2.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(h2.FRAME_SIZE_ERROR, "a SETTINGS payload is 6 bytes per setting")
        self._settings_seen = True
        for key, value in h2.iter_settings(payload):
            if key == h2.HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, 4096)
            elif key == h2.ENABLE_PUSH and value > 1:
                raise _ConnectionError(h2.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            elif key == h2.INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise _ConnectionError(
                        h2.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} is too large"
                    )
                if self._call is not None:
                    self._call.send_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == h2.MAX_FRAME_SIZE:
                if not h2.DEFAULT_MAX_FRAME <= value <= h2.MAX_FRAME:
                    raise _ConnectionError(
                        h2.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} is out of range"
                    )
                self._peer_max_frame = value
        self._queue(h2.frame(h2.SETTINGS, h2.ACK, 0))

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(h2.FRAME_SIZE_ERROR, "a WINDOW_UPDATE frame has 4 bytes")
        increment = int.from_bytes(payload, "big") & h2.MAX_WINDOW
        if increment == 0:
            raise _ConnectionError(h2.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > h2.MAX_WINDOW:
                raise _ConnectionError(h2.FLOW_CONTROL_ERROR, "the connection window overflowed")
            return
        self._check_stream_id(stream_id, "WINDOW_UPDATE")
        call = self._call
        if call is not None and call.stream_id == stream_id:
            call.send_window += increment
            if call.send_window > h2.MAX_WINDOW:
                raise _ConnectionError(h2.FLOW_CONTROL_ERROR, "the stream window overflowed")

    def _on_reset(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(h2.FRAME_SIZE_ERROR, "a RST_STREAM frame has 4 bytes")
        self._check_stream_id(stream_id, "RST_STREAM")
        call = self._call
        if call is not None and call.stream_id == stream_id:
            call.reset = True
            call.request_ended = True


_STOPPING_MESSAGE = "the node is shutting down: look the keys up again elsewhere"


def _coalesce_small(iov: list[memoryview]) -> list[memoryview]:
    """``iov`` with each run of small pieces joined (a copy of those bytes only)."""
    out: list[memoryview] = []
    run: list[memoryview] = []
    for piece in iov:
        if len(piece) < _SMALL_PIECE:
            run.append(piece)
            continue
        if run:
            out.append(memoryview(b"".join(run)))
            run = []
        out.append(piece)
    if run:
        out.append(memoryview(b"".join(run)))
    return out


def _unpadded(flags: int, payload: bytes, what: str) -> bytes:
    """A DATA or HEADERS payload without its padding."""
    if not flags & h2.PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ConnectionError(h2.PROTOCOL_ERROR, f"{what} padding exceeds the frame")
    return payload[1 : len(payload) - payload[0]]


def _request_message(body: bytearray) -> bytes:
    """The serialized request of a request body holding one uncompressed gRPC message.

    Raises:
        Refusal: INVALID_ARGUMENT naming what is wrong with the body.
    """
    if len(body) < h2.GRPC_PREFIX_BYTES:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the request carries no gRPC message")
    if body[0] != 0:
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request message is compressed, but no grpc-encoding was agreed",
        )
    length = int.from_bytes(body[1:5], "big")
    if h2.GRPC_PREFIX_BYTES + length != len(body):
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body of {len(body)} bytes is not one gRPC message of {length} bytes",
        )
    return bytes(body[h2.GRPC_PREFIX_BYTES :])
