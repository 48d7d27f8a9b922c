"""One connection of the fast Pull listener: its life, its calls, and its waits.

Part of :mod:`kvpeer.transport.pull_server`, which accepts connections and starts a
:class:`ServerConnection` on a thread of its own for each. Its two halves are mixed
in: :class:`~kvpeer.transport.server_frames.InboundFrames` handles what the client
sends, :class:`~kvpeer.transport.server_send.OutboundFrames` writes to the socket.

HTTP/2 (RFC 9113), as this module serves it:

- the server preface (SETTINGS: one concurrent stream, a receive window of one
  request), before any other frame;
- one call at a time per connection; connection and stream send windows never
  exceeded (the sender waits for WINDOW_UPDATE); the server sends GOAWAY before
  it closes a connection;
- response HEADERS (``:status 200``, ``content-type: application/grpc``), DATA,
  trailers with ``grpc-status`` and ``grpc-message`` (percent-encoded), and
  trailers-only responses for calls refused before any row.

A call that must end while a frame is half written (revocation, its deadline,
server stop, the client resetting the stream or reading nothing for
``stall_timeout_s``) cannot send trailers: its connection is closed instead, and
the client sees UNAVAILABLE. Between frames it ends with trailers (UNAVAILABLE
for revocation and stop, DEADLINE_EXCEEDED, CANCELLED for a stall).

Bounds against hostile clients: a connection must complete TLS, its preface and
each request within ``request_timeout_s``, is closed after ``idle_timeout_s``
without a call, and a call whose client takes nothing for ``stall_timeout_s`` (or
past its deadline) ends, so its lease's pins are released.

Threads: a connection's thread does all of that connection's I/O on a
non-blocking socket, waiting in ``poll`` (never spinning) on the socket and a
wake-up socket pair. Other threads only wake it (:meth:`ServerConnection.wake`):
:meth:`PullStream.revoke` and :meth:`PullServer.shutdown`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Protocol

import grpc
import hpack

from kvpeer.api.limits import status_details
from kvpeer.api.security import Security
from kvpeer.transport import frames as h2
from kvpeer.transport.pull_stream import REVOKED_MESSAGE, PullStream, Refusal
from kvpeer.transport.server_frames import (
    MAX_HEADER_BLOCK,
    REQUEST_WINDOW,
    Call,
    Closed,
    H2ConnectionError,
    HeaderBlock,
    InboundFrames,
    request_message,
)
from kvpeer.transport.server_send import MAX_OUTBOX, OutboundFrames

#: The listener's logger: its connections log under the same name.
log = logging.getLogger("kvpeer.transport.pull_server")

#: Socket reads go into a scratch buffer of this size.
_READ_CHUNK = 64 << 10
#: After a stop's grace: time to flush goodbyes (trailers, GOAWAY) before a hard close.
_STOP_FLUSH_S = 0.5
#: How long a closing connection waits for the client to read what was sent last.
_LINGER_S = 1.0

_OK = grpc.StatusCode.OK
_STATUS = {code: code.value[0] for code in grpc.StatusCode}
_SERVER_SETTINGS = h2.frame(
    h2.SETTINGS,
    0,
    0,
    h2.settings_payload(
        {
            h2.MAX_CONCURRENT_STREAMS: 1,
            h2.INITIAL_WINDOW_SIZE: REQUEST_WINDOW,
            h2.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
        }
    ),
) + h2.frame(h2.WINDOW_UPDATE, 0, 0, h2.UINT32.pack(REQUEST_WINDOW))


class Limits(Protocol):
    """The timeouts a connection keeps: :class:`~kvpeer.transport.pull_server.PullServerOptions`."""

    @property
    def request_timeout_s(self) -> float: ...
    @property
    def idle_timeout_s(self) -> float: ...
    @property
    def stall_timeout_s(self) -> float: ...


class Listener(Protocol):
    """What a connection uses of its :class:`~kvpeer.transport.pull_server.PullServer`."""

    open_pull: Callable[[bytes], PullStream]
    security: Security
    ssl_context: ssl.SSLContext | None
    options: Limits
    #: Monotonic time from which streams are cut (a stop's grace has passed).
    stop_at: float

    @property
    def stopping(self) -> bool: ...

    def count_call(self) -> None: ...

    def forget(self, conn: ServerConnection) -> None: ...


def poke(sock: socket.socket) -> None:
    """Wake the thread polling the other end of a socket pair (any thread; never blocks)."""
    with contextlib.suppress(OSError):  # closed already, or full: a wake-up is pending anyway
        sock.send(b"\0")


class _Ending(Exception):
    """A call must end between frames, with ``code`` and ``message`` (None: the client reset it)."""

    def __init__(self, code: grpc.StatusCode | None, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServerConnection(InboundFrames, OutboundFrames):
    """One client connection: HTTP/2 state and at most one Pull at a time.

    Thread contract: :meth:`run` runs on the connection's own thread and owns every
    field; other threads only call :meth:`wake`. Frame handlers (``_on_*``, from
    :class:`InboundFrames`) only change state and queue control frames; the serving
    code does all sending (with :class:`OutboundFrames`).
    """

    def __init__(self, server: Listener, sock: socket.socket, address: object) -> None:
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
        self._receive_window = h2.DEFAULT_WINDOW + REQUEST_WINDOW
        self._last_stream = 0
        self._goaway_received = False
        self._block: HeaderBlock | None = None
        self._call: Call | None = None
        self._opened_at = time.monotonic()
        #: When the last call ended (or the connection opened): the idle clock.
        self._idle_since = self._opened_at
        #: When the current call's client last took bytes: the stall clock.
        self._progress = self._idle_since

    def wake(self) -> None:
        """Make the connection's thread look at its state again (any thread)."""
        poke(self._wake_send)

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
        except H2ConnectionError as exc:
            log.debug("pull client %s broke HTTP/2: %s", self._address, exc.message)
            goodbye = (exc.code, exc.message)
        except (Closed, OSError) as exc:
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
                raise Closed(f"TLS handshake failed: {exc}") from None
        protocol = sock.selected_alpn_protocol()
        if protocol not in (None, "h2"):
            raise Closed(f"the client chose ALPN {protocol!r}, not h2")

    def _close(self, goodbye: tuple[int, str] | None) -> None:
        """Say GOAWAY when there is a ``goodbye``, let the client read it, close everything."""
        if goodbye is not None:
            code, message = goodbye
            payload = h2.UINT32.pack(self._last_stream) + h2.UINT32.pack(code)
            self._queue(h2.frame(h2.GOAWAY, 0, 0, payload + message.encode()[:256]), force=True)
            with contextlib.suppress(Closed, H2ConnectionError, OSError):
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
        while drained < MAX_OUTBOX and time.monotonic() < by:
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
                raise H2ConnectionError(
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

    def _answer(self, call: Call) -> None:
        """Refuse ``call`` or stream its rows, then end it."""
        self._server.count_call()
        stream: PullStream | None = None
        try:
            if call.refusal is None and not call.reset:
                try:
                    stream = self._server.open_pull(request_message(call.body))
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

    def _stream_rows(self, call: Call, stream: PullStream) -> None:
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

    def _send_message(self, call: Call, stream: PullStream, header: bytes, row: memoryview) -> None:
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

    def _frame_room(self, call: Call, stream: PullStream, left: int) -> int:
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

    def _check(self, call: Call, stream: PullStream | None) -> None:
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

    def _send_by(self, call: Call, stream: PullStream, *, mid_frame: bool) -> float:
        """The time a wait in ``call`` may last; mid-frame, a reason to end it closes the connection."""
        if mid_frame:
            try:
                self._check(call, stream)
            except _Ending as ending:
                raise Closed(f"the call ended mid-frame: {ending.message or 'reset'}") from None
        return min(
            call.deadline, self._server.stop_at, self._progress + self._options.stall_timeout_s
        )

    def _end_call(
        self, call: Call, code: grpc.StatusCode, message: str, *, trailers_only: bool = False
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

    # -- waiting ---------------------------------------------------------------------------

    def _wait(
        self, by: float, *, readable: bool, writable: bool, what: str, read: bool = True
    ) -> None:
        """Wait in ``poll`` until the socket is ready, a wake-up, or ``by``; handle what arrived
        (unless not ``read``: the TLS handshake reads for itself).

        Raises :class:`Closed` once ``by`` has passed, or when the server stopped
        long enough ago.
        """
        hard_stop = self._server.stop_at + _STOP_FLUSH_S
        by = min(by, hard_stop)
        now = time.monotonic()
        if now >= by:
            reason = "the server stopped" if now >= hard_stop else f"timed out waiting for {what}"
            raise Closed(reason)
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


_STOPPING_MESSAGE = "the node is shutting down: look the keys up again elsewhere"
