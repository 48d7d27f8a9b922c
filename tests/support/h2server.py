"""A scripted HTTP/2 server for pull tests: it answers a Pull with exactly the bytes a test wrote.

A real peer server never sends a duplicate row, a short row or a broken frame, so
the tests that check how clients survive such a peer need one that does. The
helpers build the pieces (:func:`frame`, :func:`grpc_message`, :func:`response`),
:class:`ScriptedServer` serves them:

    reply = response([grpc_message(encode_chunk(0, key, row))])
    with ScriptedServer(reply) as server:
        client = PeerClient(server.endpoint, ...)

Each connection: the server sends an empty SETTINGS frame, reads the client's
preface and frames until the client's request on stream 1 is complete (or, with
``answer_at_once``, sends nothing first and answers right away), writes ``reply``, then keeps reading (and discarding) until the
client leaves, or closes after the reply with ``close_after``, or closes when the
client starts a second call on the connection with ``close_on_reuse``. Both transports
(grpcio's and kvpeer.transport.pull_client) open stream 1 first on a fresh connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Sequence

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def grpc_message(payload: bytes, *, compressed: bool = False) -> bytes:
    """``payload`` with gRPC's 5-byte length prefix."""
    return bytes((int(compressed),)) + struct.pack(">I", len(payload)) + payload


def settings(**values: int) -> bytes:
    """A SETTINGS frame; keys are setting ids as ``s4=...`` (e.g. ``s5=16384``)."""
    return frame(
        SETTINGS, 0, 0, b"".join(struct.pack(">HI", int(k[1:]), v) for k, v in values.items())
    )


def response(
    messages: Sequence[bytes],
    *,
    status: int = 0,
    message: str = "",
    trailers: bool = True,
    max_frame: int = 16384,
) -> bytes:
    """A whole answer to stream 1: server SETTINGS (+ ACK), response headers, ``messages``
    in DATA frames of ``max_frame`` bytes, then trailers with ``status`` (none unless
    ``trailers``). Keep answers under 64 KiB: that is all a client's windows must allow."""
    encoder = hpack.Encoder()
    body = b"".join(messages)
    out = [
        settings(),
        frame(SETTINGS, ACK, 0),
        headers(encoder, [(":status", "200"), ("content-type", "application/grpc")]),
    ]
    out += [frame(DATA, 0, 1, body[i : i + max_frame]) for i in range(0, len(body), max_frame)]
    if trailers:
        fields = [("grpc-status", str(status))]
        if message:
            fields.append(("grpc-message", message))
        out.append(headers(encoder, fields, end_stream=True))
    return b"".join(out)


def headers(
    encoder: hpack.Encoder, fields: list[tuple[str, str]], *, end_stream: bool = False
) -> bytes:
    """A HEADERS frame on stream 1 carrying ``fields``."""
    flags = END_HEADERS | (END_STREAM if end_stream else 0)
    return frame(HEADERS, flags, 1, encoder.encode(fields))


class ScriptedServer:
    """Answers every connection with ``reply`` (see the module docstring); a context manager.

    Thread-safety: one thread per connection; :meth:`stop` closes every socket and
    joins them. ``received`` collects what clients sent, for tests that check it.
    """

    def __init__(
        self,
        reply: bytes,
        *,
        close_after: bool = False,
        answer_at_once: bool = False,
        close_on_reuse: bool = False,
    ) -> None:
        self._reply = reply
        self._close_after = close_after
        self._answer_at_once = answer_at_once
        self._close_on_reuse = close_on_reuse
        self._lock = threading.Lock()
        self.received = bytearray()
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if not self._answer_at_once:
                sock.sendall(settings())  # grpc-core sends no call before it has the server's
                self._read_request(sock)
            sock.sendall(self._reply)
            if self._close_after:
                sock.shutdown(socket.SHUT_RDWR)
                return
            if self._close_on_reuse:
                self._read_frames(sock, until=lambda kind, stream: kind == HEADERS and stream > 1)
                sock.shutdown(socket.SHUT_RDWR)  # as if it went away while the client was idle
                return
            while more := sock.recv(65536):
                with self._lock:
                    self.received += more
        except OSError:
            return

    def _read_request(self, sock: socket.socket) -> None:
        """Read the preface and frames until a frame on stream 1 ends the request."""
        self._recv_exact(sock, len(PREFACE))
        self._read_frames(sock, until=lambda _kind, stream: stream == 1, end_stream=True)

    def _read_frames(self, sock: socket.socket, *, until, end_stream: bool = False) -> None:
        """Read frames until ``until(kind, stream)`` holds (for one with END_STREAM if asked)."""
        while True:
            header = self._recv_exact(sock, 9)
            length = int.from_bytes(header[:3], "big")
            kind, flags = header[3], header[4]
            stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            self._recv_exact(sock, length)
            if until(kind, stream) and (flags & END_STREAM or not end_stream):
                return

    def _recv_exact(self, sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = sock.recv(size - len(data))
            if not more:
                raise OSError("client left")
            data += more
        with self._lock:
            self.received += data
        return data
