"""A hand-driven HTTP/2 client for tests of the fast Pull listener that misbehave on purpose.

:class:`RawClient` connects to a port, sends whatever bytes a test builds (with the
frame helpers of :mod:`tests.support.h2server`), and reads the server's frames
back one at a time, so a test can stop reading, reset a stream, open a second
one, or send garbage, and see exactly what the server answers:

    with RawClient(node.server.pull_port) as client:
        client.handshake(settings(s4=64 << 10))
        client.send(client.request(1, pull_body(lease_id)))
        response = client.response(1)        # headers, messages, grpc-status
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import hpack

from kvpeer.transport import frames as h2
from kvpeer.v1 import peer_pb2
from tests.support.h2server import grpc_message, settings

PULL_PATH = h2.PULL_PATH


def pull_body(lease_id: str, indices: list[int] | None = None) -> bytes:
    """A Pull request body: one gRPC message holding a PullRequest."""
    request = peer_pb2.PullRequest(lease_id=lease_id, indices=indices or [])
    return grpc_message(request.SerializeToString())


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


@dataclass
class Response:
    """One stream's answer as :meth:`RawClient.response` collected it."""

    headers: list[dict[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    reset: int | None = None

    @property
    def status(self) -> int | None:
        """The grpc-status of the last header block, if any."""
        value = self.headers[-1].get("grpc-status") if self.headers else None
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        return h2.decode_grpc_message(self.headers[-1].get("grpc-message", ""))

    def messages(self) -> list[bytes]:
        """The gRPC messages in the DATA received (whole ones only)."""
        out, position = [], 0
        while len(self.data) - position >= 5:
            length = struct.unpack_from(">I", self.data, position + 1)[0]
            if len(self.data) - position - 5 < length:
                break
            out.append(bytes(self.data[position + 5 : position + 5 + length]))
            position += 5 + length
        return out


class RawClient:
    """One plaintext TCP connection to ``port``; a context manager that closes it."""

    def __init__(self, port: int, *, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.timeout_s = timeout_s
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        #: What each stream received so far (kept across :meth:`response` calls).
        self.streams: dict[int, Response] = {}
        self._ended: set[int] = set()
        self._buf = bytearray()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, client_settings: bytes | None = None) -> None:
        """Send the preface and SETTINGS (default: empty), and ACK the server's SETTINGS."""
        self.send(h2.PREFACE + (client_settings if client_settings is not None else settings()))
        first = self.read_frame()
        assert first is not None and first.kind == h2.SETTINGS, first
        self.send(h2.frame(h2.SETTINGS, h2.ACK, 0))

    def request(
        self,
        stream: int,
        body: bytes,
        *,
        path: str = PULL_PATH,
        method: str = "POST",
        extra: list[tuple[str, str]] | None = None,
        timeout: str | None = "20S",
        end_stream: bool = True,
    ) -> bytes:
        """The HEADERS and DATA frames of a gRPC call on ``stream`` (to send)."""
        fields = [
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "test"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
        if timeout is not None:
            fields.append(("grpc-timeout", timeout))
        block = self.encoder.encode(fields)
        flags = h2.END_STREAM if end_stream else 0
        return h2.frame(h2.HEADERS, h2.END_HEADERS, stream, block) + h2.frame(
            h2.DATA, flags, stream, body
        )

    def read_frame(self, timeout_s: float | None = None) -> Frame | None:
        """The next frame, or None when the server closed the connection (or reset it)."""
        self.sock.settimeout(timeout_s or self.timeout_s)
        try:
            header = self._recv(9)
            if header is None:
                return None
            length = int.from_bytes(header[:3], "big")
            payload = self._recv(length)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if payload is None:
            return None
        stream = int.from_bytes(header[5:9], "big") & h2.LAST_STREAM_ID
        return Frame(header[3], header[4], stream, payload)

    def response(self, stream: int, *, window_updates: bool = True) -> Response:
        """Read until ``stream`` ends (END_STREAM or RST_STREAM) and return what it got.

        Frames of other streams are kept for them (:attr:`streams`); PINGs are
        answered, and with ``window_updates`` every DATA frame's bytes are given back.
        """
        while stream not in self._ended:
            frame = self.read_frame()
            assert frame is not None, "the server closed the connection mid-response"
            self._record(frame, window_updates)
        return self.streams[stream]

    def first_data(self, stream: int) -> None:
        """Read (and record) frames until ``stream`` got some DATA; grants no window."""
        while not (stream in self.streams and self.streams[stream].data):
            frame = self.read_frame()
            assert frame is not None, "the server closed the connection before any DATA"
            self._record(frame, window_updates=False)

    def ending(self, stream: int) -> int | None:
        """``stream``'s grpc-status, or None when the server closed the connection first."""
        while stream not in self._ended:
            frame = self.read_frame()
            if frame is None:
                return None
            self._record(frame, window_updates=False)
        return self.streams[stream].status

    def _record(self, frame: Frame, window_updates: bool) -> None:
        if frame.kind == h2.PING and not frame.flags & h2.ACK:
            self.send(h2.frame(h2.PING, h2.ACK, 0, frame.payload))
        if not frame.stream:
            return
        out = self.streams.setdefault(frame.stream, Response())
        if frame.kind == h2.HEADERS:
            out.headers.append(self.decode(frame.payload))
        elif frame.kind == h2.DATA:
            out.data += frame.payload
            if window_updates and frame.payload:
                grant = struct.pack(">I", len(frame.payload))
                self.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, grant))
                self.send(h2.frame(h2.WINDOW_UPDATE, 0, frame.stream, grant))
        elif frame.kind == h2.RST_STREAM:
            out.reset = struct.unpack(">I", frame.payload)[0]
            self._ended.add(frame.stream)
        if frame.flags & h2.END_STREAM and frame.kind in (h2.HEADERS, h2.DATA):
            self._ended.add(frame.stream)

    def decode(self, block: bytes) -> dict[str, str]:
        return {name: value for name, value in self.decoder.decode(block)}

    def goaway_or_close(self, timeout_s: float = 10.0) -> Frame | None:
        """Read until the server sends GOAWAY (returned) or closes (None)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            frame = self.read_frame(max(0.01, deadline - time.monotonic()))
            if frame is None or frame.kind == h2.GOAWAY:
                return frame
        raise AssertionError(f"the server neither sent GOAWAY nor closed within {timeout_s}s")

    def closed_within(self, timeout_s: float) -> bool:
        """True once the server closes the connection (frames before are read and dropped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.read_frame(max(0.01, deadline - time.monotonic())) is None:
                    return True
            except TimeoutError:
                return False
        return False

    def _recv(self, size: int) -> bytes | None:
        while len(self._buf) < size:
            more = self.sock.recv(max(65536, size - len(self._buf)))
            if not more:
                return None
            self._buf += more
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data


def goaway_code(frame: Frame) -> int:
    return struct.unpack(">I", frame.payload[4:8])[0]
