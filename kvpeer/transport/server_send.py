"""What a connection of the fast Pull listener writes to its socket, and how.

Part of :mod:`kvpeer.transport.pull_server`. :class:`OutboundFrames` is the writing
half of :class:`~kvpeer.transport.server_connection.ServerConnection`, mixed into it
and run on the connection's thread: control frames and header blocks are queued
(frame handlers queue too, and never send), then written ahead of the next DATA.

Plaintext connections send each DATA frame of a row as one
``sendmsg([frame header, gRPC prefix + Chunk header, memoryview(row)])``, so the
kernel's copy is the only one. ``ssl`` has no ``sendmsg``: TLS connections send
the pieces one after another, the small ones joined into one record (OpenSSL
copies while it encrypts anyway).

Bounds against hostile clients: control frames owed to a client that does not
read them are capped at 1 MiB (then GOAWAY(ENHANCE_YOUR_CALM)).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

from kvpeer.transport import frames as h2
from kvpeer.transport.server_frames import Closed, H2ConnectionError

#: Control frames owed to a client (ACKs, window updates) beyond this: it does not read.
MAX_OUTBOX = 1 << 20
#: Largest piece given to one ``SSLSocket.send`` (OpenSSL wants a retry to repeat it).
_TLS_WRITE = 256 << 10
#: Pieces shorter than this are joined before TLS sends them (headers, control frames).
_SMALL_PIECE = 16 << 10


class OutboundFrames:
    """The writing half of a :class:`~kvpeer.transport.server_connection.ServerConnection`.

    A mixin: it uses the connection's socket, outbox, HPACK encoder and peer
    settings (set in ``ServerConnection.__init__``), and waits with its ``_wait``.
    """

    def _queue(self, data: bytes, *, force: bool = False) -> None:
        """Queue a control frame for the next write (frame handlers and the serving code)."""
        if self._outbox_bytes + len(data) > MAX_OUTBOX and not force:
            raise H2ConnectionError(
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
        """Send the queued control frames; raise :class:`Closed` if the client does not take them by ``by``."""
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
                raise Closed(f"sending failed: {exc}") from None
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
