"""What a connection of the fast Pull listener receives: the client's frames and requests.

Part of :mod:`kvpeer.transport.pull_server`. :class:`InboundFrames` is the receiving
half of :class:`~kvpeer.transport.server_connection.ServerConnection`, mixed into it:
both halves work on the one connection's HTTP/2 state, on the connection's own
thread. Its frame handlers (``_on_*``) only change that state and queue control
frames; the sending half does all sending.

HTTP/2 (RFC 9113), the receiving half:

- the client's preface, checked byte for byte; SETTINGS acknowledged, PING
  answered, PRIORITY and unknown frames ignored;
- the client's SETTINGS_MAX_FRAME_SIZE, SETTINGS_INITIAL_WINDOW_SIZE and
  SETTINGS_HEADER_TABLE_SIZE honoured; request bytes given back to the
  connection window as they arrive;
- one call at a time per connection, on streams the client numbers upwards; a
  second concurrent stream gets RST_STREAM(REFUSED_STREAM); RST_STREAM from the
  client stops its call at once; GOAWAY from the client closes the connection
  after its call;
- anything but ``POST /kvpeer.v1.KVPeer/Pull`` is UNIMPLEMENTED; ``grpc-timeout``
  is the call's deadline; the bearer token in ``authorization`` is checked
  (UNAUTHENTICATED).

Bounds against hostile clients: frames of at most 16 KiB and header blocks of at
most 16 KiB from clients; the same 1 MiB request limit as the grpcio port
(RESOURCE_EXHAUSTED). Bytes that break HTTP/2 raise :class:`H2ConnectionError`:
the connection answers a GOAWAY naming the problem, then closes; the server goes on.
"""

from __future__ import annotations

import math
import ssl
import time
from dataclasses import dataclass, field

import grpc
import hpack

from kvpeer.api.identity import AccessRefused, Role
from kvpeer.api.limits import MAX_REQUEST_BYTES
from kvpeer.api.security import TOKEN_HEADER
from kvpeer.transport import frames as h2
from kvpeer.transport.pull_stream import Refusal

#: Largest frame and header block a client may send us (SETTINGS_MAX_FRAME_SIZE
#: stays at its default; a Pull request's headers are a few hundred bytes).
MAX_RECEIVE_FRAME = h2.DEFAULT_MAX_FRAME
MAX_HEADER_BLOCK = 16 << 10
#: Stream receive window: one request at the limit, plus one byte to see it exceeded.
REQUEST_WINDOW = h2.GRPC_PREFIX_BYTES + MAX_REQUEST_BYTES + 1
#: Bytes read from the socket per wake-up before the thread turns to sending again.
_READ_BUDGET = 256 << 10


class H2ConnectionError(Exception):
    """The client broke HTTP/2: answer GOAWAY(``code``) naming the problem, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Closed(Exception):
    """The connection cannot go on (the client left, stalled mid-frame, or is cut): close it."""


@dataclass(eq=False)
class Call:
    """The one call of a connection: its request as it arrives, then its response's state."""

    stream_id: int
    #: Monotonic times: the request must be complete by ``request_by``; ``deadline``
    #: is the client's grpc-timeout.
    request_by: float
    deadline: float = math.inf
    send_window: int = h2.DEFAULT_WINDOW
    receive_window: int = REQUEST_WINDOW
    body: bytearray = field(default_factory=bytearray)
    request_ended: bool = False
    #: Set while the request arrives when the call is refused (trailers-only answer).
    refusal: tuple[grpc.StatusCode, str] | None = None
    #: The client sent RST_STREAM.
    reset: bool = False


@dataclass
class HeaderBlock:
    """A header block being received (HEADERS, then CONTINUATION until END_HEADERS)."""

    stream_id: int
    end_stream: bool
    data: bytearray


class InboundFrames:
    """The receiving half of a :class:`~kvpeer.transport.server_connection.ServerConnection`.

    A mixin: it reads and changes the connection's fields (set in
    ``ServerConnection.__init__``) and queues control frames with its ``_queue``;
    it runs only on the connection's thread.
    """

    def _receive(self) -> None:
        """Read what the socket has (up to a budget) and handle every complete frame."""
        budget = _READ_BUDGET
        while budget > 0:
            try:
                received = self._sock.recv_into(self._scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                raise Closed("the client closed the connection") from None
            except OSError as exc:
                raise Closed(f"receiving failed: {exc}") from None
            if not received:
                raise Closed("the client closed the connection")
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
                raise H2ConnectionError(
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
                raise H2ConnectionError(
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
            raise H2ConnectionError(
                h2.PROTOCOL_ERROR, "a header block was interrupted by another frame"
            )
        if not self._settings_seen and (kind != h2.SETTINGS or flags & h2.ACK):
            raise H2ConnectionError(h2.PROTOCOL_ERROR, "the client preface must end with SETTINGS")
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
                raise H2ConnectionError(h2.FRAME_SIZE_ERROR, "a PING frame has 8 bytes")
            if stream_id:
                raise H2ConnectionError(h2.PROTOCOL_ERROR, "PING on a stream")
            if not flags & h2.ACK:
                self._queue(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == h2.RST_STREAM:
            self._on_reset(stream_id, payload)
        elif kind == h2.GOAWAY:
            self._goaway_received = True
        elif kind == h2.PUSH_PROMISE:
            raise H2ConnectionError(h2.PROTOCOL_ERROR, "clients must not send PUSH_PROMISE")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _check_stream_id(self, stream_id: int, what: str) -> None:
        if stream_id == 0 or stream_id > self._last_stream:
            raise H2ConnectionError(
                h2.PROTOCOL_ERROR, f"{what} on stream {stream_id}, which the client never opened"
            )

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._check_stream_id(stream_id, "DATA")
        self._receive_window -= len(payload)
        if self._receive_window < 0:
            raise H2ConnectionError(h2.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        if payload:  # request bytes are tiny: give them back at once
            self._queue(h2.frame(h2.WINDOW_UPDATE, 0, 0, h2.UINT32.pack(len(payload))))
            self._receive_window += len(payload)
        call = self._call
        if call is None or call.stream_id != stream_id or call.request_ended:
            return  # a stream that was refused, reset or answered: its data is dropped
        call.receive_window -= len(payload)
        if call.receive_window < 0:
            raise H2ConnectionError(h2.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
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
            raise H2ConnectionError(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        call = self._call
        trailers = call is not None and stream_id == call.stream_id
        if not trailers:
            if stream_id <= self._last_stream:
                raise H2ConnectionError(
                    h2.STREAM_CLOSED, f"HEADERS on stream {stream_id}, which is closed"
                )
            self._last_stream = stream_id
        fragment = _unpadded(flags, payload, "HEADERS")
        if flags & h2.PRIORITY_FLAG:
            if len(fragment) < 5:
                raise H2ConnectionError(h2.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            fragment = fragment[5:]
        self._block = HeaderBlock(stream_id, bool(flags & h2.END_STREAM), bytearray(fragment))
        self._grow_block(flags, b"")

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None:
            raise H2ConnectionError(h2.PROTOCOL_ERROR, "CONTINUATION without a header block")
        self._grow_block(flags, payload)

    def _grow_block(self, flags: int, fragment: bytes) -> None:
        block = self._block
        assert block is not None
        block.data += fragment
        if len(block.data) > MAX_HEADER_BLOCK:
            raise H2ConnectionError(
                h2.ENHANCE_YOUR_CALM, f"a header block exceeds {MAX_HEADER_BLOCK} bytes"
            )
        if not flags & h2.END_HEADERS:
            return
        self._block = None
        try:  # every block is decoded, refused or not, to keep HPACK's table in step
            fields = self._decoder.decode(bytes(block.data), raw=True)
        except (hpack.HPACKError, ValueError, IndexError) as exc:
            raise H2ConnectionError(
                h2.COMPRESSION_ERROR, f"undecodable header block: {exc}"
            ) from None
        call = self._call
        if call is not None and call.stream_id == block.stream_id:
            if not block.end_stream:
                raise H2ConnectionError(
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

    def _role_refusal(self, token: bytes | None) -> tuple[grpc.StatusCode, str] | None:
        """Why this caller may not Pull (its certificate or token is a reader's), or None.

        The same rule as the grpcio port (:mod:`kvpeer.server.peer.authz`): KV bytes go
        to ``node`` and ``admin`` principals only. Free when no identities are bound.
        """
        access = self._server.security.access
        if not access.enforcing:
            return None
        cert = self._sock.getpeercert() if isinstance(self._sock, ssl.SSLSocket) else None
        try:
            principal = access.principal_of_peercert(cert, token)
        except AccessRefused as exc:
            return exc.code, exc.message
        if principal.role is Role.READER:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.describe()} may not Pull: read-only callers get no KV bytes",
            )
        return None

    def _new_call(self, stream_id: int, fields: dict[bytes, bytes], ended: bool) -> Call:
        now = time.monotonic()
        call = Call(
            stream_id,
            request_by=now + self._options.request_timeout_s,
            send_window=self._peer_initial_window,
            request_ended=ended,
        )
        token = fields.get(TOKEN_HEADER.encode())
        refusal = self._server.security.token_refusal(token)
        if refusal is not None:
            call.refusal = (grpc.StatusCode.UNAUTHENTICATED, refusal)
            return call
        call.refusal = self._role_refusal(token)
        if call.refusal is not None:
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
            raise H2ConnectionError(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2.ACK:
            if payload:
                raise H2ConnectionError(h2.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(
                h2.FRAME_SIZE_ERROR, "a SETTINGS payload is 6 bytes per setting"
            )
        self._settings_seen = True
        for key, value in h2.iter_settings(payload):
            if key == h2.HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, 4096)
            elif key == h2.ENABLE_PUSH and value > 1:
                raise H2ConnectionError(h2.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            elif key == h2.INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise H2ConnectionError(
                        h2.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} is too large"
                    )
                if self._call is not None:
                    self._call.send_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == h2.MAX_FRAME_SIZE:
                if not h2.DEFAULT_MAX_FRAME <= value <= h2.MAX_FRAME:
                    raise H2ConnectionError(
                        h2.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} is out of range"
                    )
                self._peer_max_frame = value
        self._queue(h2.frame(h2.SETTINGS, h2.ACK, 0))

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(h2.FRAME_SIZE_ERROR, "a WINDOW_UPDATE frame has 4 bytes")
        increment = int.from_bytes(payload, "big") & h2.MAX_WINDOW
        if increment == 0:
            raise H2ConnectionError(h2.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > h2.MAX_WINDOW:
                raise H2ConnectionError(h2.FLOW_CONTROL_ERROR, "the connection window overflowed")
            return
        self._check_stream_id(stream_id, "WINDOW_UPDATE")
        call = self._call
        if call is not None and call.stream_id == stream_id:
            call.send_window += increment
            if call.send_window > h2.MAX_WINDOW:
                raise H2ConnectionError(h2.FLOW_CONTROL_ERROR, "the stream window overflowed")

    def _on_reset(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(h2.FRAME_SIZE_ERROR, "a RST_STREAM frame has 4 bytes")
        self._check_stream_id(stream_id, "RST_STREAM")
        call = self._call
        if call is not None and call.stream_id == stream_id:
            call.reset = True
            call.request_ended = True


def _unpadded(flags: int, payload: bytes, what: str) -> bytes:
    """A DATA or HEADERS payload without its padding."""
    if not flags & h2.PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise H2ConnectionError(h2.PROTOCOL_ERROR, f"{what} padding exceeds the frame")
    return payload[1 : len(payload) - payload[0]]


def request_message(body: bytearray) -> bytes:
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
