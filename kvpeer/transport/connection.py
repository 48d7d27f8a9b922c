"""A minimal HTTP/2 client connection for gRPC server-streaming calls, one call at a time.

:mod:`kvpeer.transport.pull_client` runs ``KVPeer.Pull`` over it. It speaks what such a call
needs (RFC 9113, gRPC over HTTP/2) and reads message bytes straight into the
caller's buffers with ``recv_into``, so the kernel copies every byte once and
Python never does:

- the connection preface and SETTINGS (push off, a 64 MiB window, frames up to
  16 MiB - 1, so grpc-core sends a row in one or a few DATA frames), then per
  call HEADERS (HPACK through the ``hpack`` package; headers built with
  ``hpack.NeverIndexedHeaderTuple`` stay out of the table) and the request's
  DATA within the server's windows and frame size;
- while reading: SETTINGS (acknowledged), PING (answered), WINDOW_UPDATE,
  GOAWAY, RST_STREAM, the response headers and trailers (``grpc-status``,
  ``grpc-message``); WINDOW_UPDATEs give received bytes back long before the
  windows run out.

Calls run one after another on streams 1, 3, 5, ...; a connection whose last
call ended cleanly may carry the next (:attr:`H2Connection.reusable`), which
saves a TCP (and TLS) handshake per call. Failures raise
:class:`~kvpeer.transport.call_status.CallError` with the status names grpc uses
(the server's status, UNAVAILABLE for a connection that fails or closes,
DEADLINE_EXCEEDED, CANCELLED; :mod:`~kvpeer.transport.call_status` maps them), or
:class:`~kvpeer.api.errors.WireError` for bytes that break HTTP/2 or gRPC framing.

Bounds against a hostile server: a frame other than DATA may have at most 64 KiB,
a header block 64 KiB (HPACK's table stays at its 4 KiB default), a DATA frame
16 MiB - 1; message sizes are the caller's to check.

Thread contract: one thread at a time runs a connection (opens it, runs a call,
closes it); :meth:`H2Connection.cancel` may come from any thread: it shuts the
socket down, which wakes a blocked read at once.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import hpack

from kvpeer.api.endpoint import Endpoint
from kvpeer.api.errors import WireError
from kvpeer.transport import frames as h2
from kvpeer.transport.call_status import (  # CallError, ConnectFailed: importable from here too
    RESET_STATUS,
    CallError,
    ConnectFailed,
    check_response_head,
    grpc_status,
)

_T = TypeVar("_T")

#: Our receive window, per stream and for the connection. Bytes go straight to
#: their destination, so the window only bounds what is in flight.
WINDOW = 64 << 20
#: Received bytes are given back in WINDOW_UPDATEs once this many have arrived,
#: so the server always has three quarters of a window open.
WINDOW_REFILL = 16 << 20
#: Largest DATA frame we accept (the largest HTTP/2 allows).
MAX_DATA_FRAME = h2.MAX_FRAME
#: Largest frame of any other type, and largest header block (HEADERS + CONTINUATION).
MAX_CONTROL_FRAME = 1 << 16
MAX_HEADER_BLOCK = 1 << 16


class H2Connection:
    """One HTTP/2 client connection; runs one call at a time (see the module docstring).

        conn = H2Connection.open(endpoint, ssl_context, server_name, deadline, on_socket)
        conn.start_call(headers, request_message, deadline)
        while conn.read_message(prefix_view, message_start=True):
            ...  # read the rest of each message with conn.read_message(view)
        conn.finish()  # raises CallError unless the server's status is OK

    Use :meth:`open`. The connection's state (socket, HPACK tables, windows,
    settings) outlives a call; :meth:`start_call` resets the call's (stream id,
    response, status). :meth:`cancel` fails the call in progress with CANCELLED.
    """

    def __init__(self, sock: socket.socket, endpoint: Endpoint) -> None:
        self._sock = sock
        self.endpoint = endpoint
        self._lock = threading.Lock()  # guards _sock against cancel() from other threads
        self._cancelled = False
        self._broken = False  # a send failed or the stream broke: never reuse
        self._goaway = False  # the server accepts no new streams
        self._deadline = 0.0
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self._frame_header = bytearray(9)
        self._frame_buf = bytearray(MAX_CONTROL_FRAME)
        self._next_stream = 1
        self._settings_seen = False
        self._conn_unreturned = 0
        self._send_window = h2.DEFAULT_WINDOW
        self._peer_initial_window = h2.DEFAULT_WINDOW
        self._peer_max_frame = h2.DEFAULT_MAX_FRAME
        self.idle_since = time.monotonic()
        self._reset_stream(0)

    # -- set-up ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        endpoint: Endpoint,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str,
        deadline: float,
        on_socket: Callable[[H2Connection], None],
    ) -> H2Connection:
        """Connect (TLS with ALPN ``h2`` when ``ssl_context``), send the preface and SETTINGS.

        ``on_socket`` gets the connection as soon as it has a socket, before the TLS
        handshake, so that the caller can :meth:`cancel` it from then on.

        Raises:
            ConnectFailed: no TCP connection.
            CallError: UNAVAILABLE (TLS failed), DEADLINE_EXCEEDED.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CallError("DEADLINE_EXCEEDED", f"no time left to connect to {endpoint}")
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=remaining)
        except TimeoutError:
            raise CallError("DEADLINE_EXCEEDED", f"connecting to {endpoint} timed out") from None
        except OSError as exc:
            raise ConnectFailed(
                "UNAVAILABLE", f"cannot connect to {endpoint}: {_reason(exc)}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(
                sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        conn = cls(sock, endpoint)
        conn._deadline = deadline
        try:
            on_socket(conn)
            if isinstance(sock, ssl.SSLSocket):
                conn._io(sock.do_handshake)
                if sock.selected_alpn_protocol() != "h2":
                    raise CallError("UNAVAILABLE", f"{endpoint} did not agree to HTTP/2 over TLS")
            conn._send(h2.PREFACE + conn._settings_frame())
        except BaseException:
            conn.close()
            raise
        return conn

    def _settings_frame(self) -> bytes:
        settings = h2.settings_payload(
            {
                h2.ENABLE_PUSH: 0,
                h2.INITIAL_WINDOW_SIZE: WINDOW,
                h2.MAX_FRAME_SIZE: MAX_DATA_FRAME,
                h2.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
            }
        )
        return h2.frame(h2.SETTINGS, 0, 0, settings) + h2.frame(
            h2.WINDOW_UPDATE, 0, 0, h2.UINT32.pack(WINDOW - h2.DEFAULT_WINDOW)
        )

    # -- state -----------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """True when the last call ended cleanly and the connection may carry another."""
        return (
            self._stream_ended
            and self._frame_left == 0
            and self._pad_left == 0
            and not (self._broken or self._goaway or self._cancelled)
            and self._next_stream < h2.LAST_STREAM_ID
            and self._sock is not None
        )

    def quiet(self) -> bool:
        """True when the server sent nothing since the last call (no PING, GOAWAY or close).

        For a connection taken from an idle pool: anything pending means the
        server moved on (a keepalive PING it waits on, a GOAWAY, a close), so the
        connection is not worth a call.
        """
        sock = self._sock
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    # -- a call ----------------------------------------------------------------

    def start_call(
        self, headers: Sequence[tuple[str, str]], message: bytes, deadline: float
    ) -> None:
        """Open the next stream: send ``headers`` (plus ``grpc-timeout``) and ``message``.

        ``message`` is the serialized request; its 5-byte gRPC prefix is added here.
        """
        stream = self._next_stream
        self._next_stream += 2
        self._deadline = deadline
        self._reset_stream(stream)
        self._body = memoryview(b"\0" + len(message).to_bytes(4, "big") + message)
        fields = [*headers, ("grpc-timeout", h2.encode_grpc_timeout(self._remaining()))]
        block = memoryview(self._encoder.encode(fields))
        pieces = [
            block[i : i + h2.DEFAULT_MAX_FRAME] for i in range(0, len(block), h2.DEFAULT_MAX_FRAME)
        ]
        frames = []
        for n, piece in enumerate(pieces):
            flags = h2.END_HEADERS if n == len(pieces) - 1 else 0
            frames.append(h2.frame(h2.HEADERS if n == 0 else h2.CONTINUATION, flags, stream, piece))
        self._send(b"".join(frames))
        self._send_body()

    @property
    def response_started(self) -> bool:
        """True once the current call's response headers arrived."""
        return self._response_started

    def read_message(self, view: memoryview, *, message_start: bool = False) -> bool:
        """Fill ``view`` with the current call's next message bytes, across DATA frames.

        Returns False, having read nothing, when ``message_start`` and the stream
        ended between messages (then :meth:`finish`). Raises when it ends inside
        ``view``.
        """
        position, size = 0, len(view)
        while position < size:
            available = self._data_available()
            if not available:
                if message_start and position == 0:
                    return False
                self.finish()
                raise WireError("the stream ended inside a message")
            step = min(available, size - position)
            self._recv_exact(view[position : position + step])
            self._frame_left -= step
            position += step
        return True

    def finish(self) -> None:
        """At the current call's end: return on status OK, raise it otherwise."""
        if self._status is None:
            raise CallError("INTERNAL", f"{self.endpoint} ended the stream without a grpc-status")
        code, message = self._status
        if code != "OK":
            raise CallError(code, message)

    def cancel(self) -> None:
        """Stop the current call from any thread: its reader gets CANCELLED at once."""
        with self._lock:
            self._cancelled = True
            if self._sock is not None:
                # socket.socket's shutdown, not SSLSocket's: that one drops the SSL
                # object under the reading thread's feet. This only wakes the reader.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket; idempotent."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- receiving -----------------------------------------------------------------

    def _reset_stream(self, stream: int) -> None:
        self._stream = stream
        self._body = memoryview(b"")
        self._frame_left = 0
        self._pad_left = 0
        self._end_after_frame = False
        self._response_started = False
        self._stream_ended = False
        self._status: tuple[str, str] | None = None
        self._stream_unreturned = 0
        self._send_stream_window = self._peer_initial_window

    def _data_available(self) -> int:
        """Bytes left in the current DATA frame, reading frames until one has some; 0 at the end."""
        while not self._frame_left:
            if self._pad_left:
                self._recv_exact(memoryview(self._frame_buf)[: self._pad_left])
                self._pad_left = 0
            if self._end_after_frame:
                self._stream_ended = True
                self._end_after_frame = False
            if self._stream_ended:
                return 0
            self._read_frame()
        return self._frame_left

    def _read_frame(self) -> None:
        """Read one frame; a DATA frame's payload is left on the socket for the caller."""
        header = self._frame_header
        self._recv_exact(memoryview(header))
        length = int.from_bytes(header[0:3], "big")
        kind, flags = header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & h2.LAST_STREAM_ID
        if not self._settings_seen and (kind != h2.SETTINGS or flags & h2.ACK):
            raise WireError(
                f"{self.endpoint} did not start with HTTP/2 SETTINGS "
                f"(first bytes {bytes(header).hex()}): is it a kvpeer node?"
            )
        if kind == h2.DATA:
            self._on_data(length, flags, stream)
            return
        if length > MAX_CONTROL_FRAME:
            raise WireError(f"a frame of type {kind} has {length} bytes, over {MAX_CONTROL_FRAME}")
        payload = memoryview(self._frame_buf)[:length]
        self._recv_exact(payload)
        if kind == h2.SETTINGS:
            self._on_settings(payload, flags, stream)
        elif kind == h2.PING:
            if length != 8 or stream != 0:
                raise WireError("malformed PING frame")
            if not flags & h2.ACK:
                self._send_control(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.WINDOW_UPDATE:
            self._on_window_update(payload, stream)
        elif kind == h2.HEADERS:
            self._on_headers(payload, flags, stream)
        elif kind == h2.RST_STREAM:
            self._on_reset(payload, stream)
        elif kind == h2.GOAWAY:
            self._on_goaway(payload)
        elif kind in (h2.PUSH_PROMISE, h2.CONTINUATION):
            raise WireError(f"unexpected frame of type {kind}")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _on_data(self, length: int, flags: int, stream: int) -> None:
        if stream != self._stream:
            raise WireError(f"DATA frame on stream {stream}, expected {self._stream}")
        if not self._response_started or self._stream_ended:
            raise WireError("DATA frame outside the response")
        if length > MAX_DATA_FRAME:
            raise WireError(f"DATA frame of {length} bytes exceeds {MAX_DATA_FRAME}")
        self._give_back(length)
        padding = 0
        if flags & h2.PADDED:
            if length < 1:
                raise WireError("padded DATA frame without a pad length")
            self._recv_exact(memoryview(self._frame_buf)[:1])
            padding = self._frame_buf[0]
            length -= 1
            if padding > length:
                raise WireError("DATA frame padding exceeds the frame")
        self._frame_left = length - padding
        self._pad_left = padding
        self._end_after_frame = bool(flags & h2.END_STREAM)

    def _give_back(self, length: int) -> None:
        """Count received DATA bytes; return them in WINDOW_UPDATEs once enough arrived."""
        self._conn_unreturned += length
        self._stream_unreturned += length
        frames = []
        if self._stream_unreturned >= WINDOW_REFILL:
            frames.append(
                h2.frame(h2.WINDOW_UPDATE, 0, self._stream, h2.UINT32.pack(self._stream_unreturned))
            )
            self._stream_unreturned = 0
        if self._conn_unreturned >= WINDOW_REFILL:
            frames.append(h2.frame(h2.WINDOW_UPDATE, 0, 0, h2.UINT32.pack(self._conn_unreturned)))
            self._conn_unreturned = 0
        if frames:
            self._send_control(b"".join(frames))

    def _on_settings(self, payload: memoryview, flags: int, stream: int) -> None:
        if stream != 0 or len(payload) % 6 or (flags & h2.ACK and payload):
            raise WireError("malformed SETTINGS frame")
        if flags & h2.ACK:
            return
        self._settings_seen = True
        for key, value in h2.iter_settings(payload):
            if key == h2.INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise WireError(f"SETTINGS_INITIAL_WINDOW_SIZE {value} exceeds {h2.MAX_WINDOW}")
                self._send_stream_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == h2.MAX_FRAME_SIZE:
                if not h2.DEFAULT_MAX_FRAME <= value <= MAX_DATA_FRAME:
                    raise WireError(f"SETTINGS_MAX_FRAME_SIZE {value} is out of range")
                self._peer_max_frame = value
        self._send_control(h2.frame(h2.SETTINGS, h2.ACK, 0, b""))
        self._send_body()

    def _on_window_update(self, payload: memoryview, stream: int) -> None:
        if len(payload) != 4:
            raise WireError("malformed WINDOW_UPDATE frame")
        increment = int.from_bytes(payload, "big") & h2.MAX_WINDOW
        if stream == 0:
            self._send_window += increment
        elif stream == self._stream:
            self._send_stream_window += increment
        self._send_body()

    def _on_headers(self, payload: memoryview, flags: int, stream: int) -> None:
        if stream != self._stream or self._stream_ended:
            raise WireError(f"HEADERS frame on stream {stream}, which is not open")
        start, end = 0, len(payload)
        if flags & h2.PADDED:
            if not payload:
                raise WireError("padded HEADERS frame without a pad length")
            start, end = 1, end - payload[0]
        if flags & h2.PRIORITY_FLAG:
            start += 5
        if start > end:
            raise WireError("HEADERS frame padding exceeds the frame")
        block = bytearray(payload[start:end])
        while not flags & h2.END_HEADERS:
            self._recv_exact(memoryview(self._frame_header))
            length = int.from_bytes(self._frame_header[0:3], "big")
            kind, flags = self._frame_header[3], self._frame_header[4]
            continued = int.from_bytes(self._frame_header[5:9], "big") & h2.LAST_STREAM_ID
            if kind != h2.CONTINUATION or continued != stream:
                raise WireError("a header block was interrupted by another frame")
            if len(block) + length > MAX_HEADER_BLOCK:
                raise WireError(f"a header block exceeds {MAX_HEADER_BLOCK} bytes")
            more = memoryview(self._frame_buf)[:length]
            self._recv_exact(more)
            block += more
        if len(block) > MAX_HEADER_BLOCK:
            raise WireError(f"a header block exceeds {MAX_HEADER_BLOCK} bytes")
        try:
            fields = dict(self._decoder.decode(bytes(block)))
        except hpack.HPACKError as exc:
            raise WireError(f"undecodable response headers: {exc}") from None
        ends = bool(flags & h2.END_STREAM)
        if not self._response_started:
            self._response_started = True
            check_response_head(fields, self.endpoint, trailers_only=ends)
        elif not ends:
            raise WireError("a second header block that does not end the stream")
        if ends:
            self._stream_ended = True
            self._status = grpc_status(fields)

    def _on_reset(self, payload: memoryview, stream: int) -> None:
        if len(payload) != 4 or stream == 0:
            raise WireError("malformed RST_STREAM frame")
        if stream != self._stream or self._stream_ended:
            return  # a late reset of a finished stream
        code = int.from_bytes(payload, "big")
        name = h2.error_name(code)
        self._broken = True
        raise CallError(
            RESET_STATUS.get(code, "INTERNAL"), f"{self.endpoint} reset the stream ({name})"
        )

    def _on_goaway(self, payload: memoryview) -> None:
        if len(payload) < 8:
            raise WireError("malformed GOAWAY frame")
        self._goaway = True
        last_stream = int.from_bytes(payload[0:4], "big") & h2.LAST_STREAM_ID
        if last_stream < self._stream:  # else the server finishes our stream first
            code = int.from_bytes(payload[4:8], "big")
            name = h2.error_name(code)
            raise CallError("UNAVAILABLE", f"{self.endpoint} is going away ({name})")

    # -- sending -------------------------------------------------------------------

    def _send_body(self) -> None:
        """Send as much of the request's DATA as the server's windows allow."""
        frames = []
        while self._body:
            size = min(
                len(self._body), self._peer_max_frame, self._send_window, self._send_stream_window
            )
            if size <= 0:
                break
            piece, self._body = self._body[:size], self._body[size:]
            self._send_window -= size
            self._send_stream_window -= size
            flags = 0 if self._body else h2.END_STREAM
            frames.append(h2.frame(h2.DATA, flags, self._stream, piece))
        if frames:
            self._send_control(b"".join(frames))

    def _send_control(self, data: bytes) -> None:
        """Send frames owed while reading (ACKs, windows, the rest of a request).

        A connection the server closed still holds what it sent before, so a
        failed send is not the end: later sends are dropped, and the reads report
        the closed connection once that data is in.
        """
        if self._broken:
            return
        try:
            self._send(data)
        except CallError as exc:
            if exc.code != "UNAVAILABLE":
                raise
            self._broken = True

    def _send(self, data: bytes) -> None:
        self._io(self._socket().sendall, data)

    # -- socket I/O ----------------------------------------------------------------

    def _recv_exact(self, view: memoryview) -> None:
        """Fill ``view`` from the socket (``recv_into`` releases the GIL meanwhile)."""
        recv_into = self._socket().recv_into
        while view:
            received = self._io(recv_into, view)
            if not received:
                raise self._failure(f"{self.endpoint} closed the connection")
            view = view[received:]

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise self._failure("the connection is closed")
        return sock

    def _io(self, operation: Callable[..., _T], *args: object) -> _T:
        """Run a socket operation within the deadline, mapping its failures to statuses."""
        self._socket().settimeout(self._remaining())
        try:
            return operation(*args)
        except TimeoutError:
            raise self._failure("", timed_out=True) from None
        except OSError as exc:
            raise self._failure(f"connection to {self.endpoint}: {_reason(exc)}") from None

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._failure("", timed_out=True)
        return remaining

    def _failure(self, reason: str, *, timed_out: bool = False) -> CallError:
        """The error of a call that cannot go on: cancelled, past its deadline, or ``reason``."""
        self._broken = True
        if self._cancelled:
            return CallError("CANCELLED", "the call was cancelled")
        if timed_out or time.monotonic() >= self._deadline:
            return CallError("DEADLINE_EXCEEDED", f"the call to {self.endpoint} ran out of time")
        return CallError("UNAVAILABLE", reason)


def _reason(exc: OSError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
