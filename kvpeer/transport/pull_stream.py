"""One Pull's reading of a lease's pinned rows, shared by both listeners that serve Pull.

:meth:`KVPeerServicer.open_pull <kvpeer.server.peer.service.KVPeerServicer.open_pull>`
validates a request and returns a :class:`PullStream`; the grpcio servicer
(:mod:`kvpeer.server.peer.service`) and the fast Pull listener
(:mod:`kvpeer.transport.pull_server`) both send its rows, so leases, statuses, stats
and revocation behave the same on either port.

The stream reads any :class:`PinnedRows` (the chunk server's
:class:`~kvpeer.server.peer.leases.Lease` is one), so the transport does not
depend on the chunk server that uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import grpc

from kvpeer.api.wire import chunk_header, digest

#: How a Pull whose lease was revoked ends (UNAVAILABLE), on either listener.
REVOKED_MESSAGE = "the node took its chunks back (KV cache reset): look the keys up again"


class PinnedRows(Protocol):
    """Rows that stay pinned while a :class:`PullStream` reads them."""

    #: The key of each row, by index.
    keys: tuple[bytes, ...]

    def row(self, index: int) -> memoryview:
        """Row ``index``'s pinned bytes (readable until the pin is released)."""
        ...


class Refusal(Exception):
    """Ends a call with ``code`` and ``message``; raised by validation helpers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PullStream:
    """One Pull's reading of a lease's pinned rows, whichever listener sends them.

    The listener's sending thread takes :attr:`lock`, calls :meth:`next_row`,
    sends the row (it may read the row's memory until it releases the lock), and
    calls :meth:`count_row`. :meth:`close` and :meth:`revoke` come from other
    threads (gRPC's call-end callback, :meth:`KVPeerServicer.revoke_leases`):
    they take the lock, so the lease's Pull count drops only once no row is read
    any more. ``close`` is idempotent; the listener makes sure it runs once the
    call ends.

    A listener whose sends may wait on a slow client registers a waker
    (:meth:`set_waker`): :meth:`revoke` sets :attr:`revoked` and calls it before
    taking the lock, and the sender, seeing the flag, stops at once.
    """

    def __init__(
        self,
        lease: PinnedRows,
        indices: list[int],
        end_pull: Callable[[PullStream], None],
        count: Callable[[str, int], None],
    ) -> None:
        self.lease = lease
        self._indices = iter(indices)
        self._end_pull = end_pull
        self._count = count
        self.lock = threading.Lock()
        self._open = True
        #: Set by :meth:`revoke` (before it takes the lock); the call ends UNAVAILABLE.
        self.revoked = False
        self._waker: Callable[[], None] | None = None

    def set_waker(self, waker: Callable[[], None]) -> None:
        """Have :meth:`revoke` call ``waker`` (any thread) before it waits for the lock."""
        self._waker = waker

    def next_row(self) -> tuple[bytes, memoryview] | None:
        """The next row's ``Chunk`` header (digest computed now) and its pinned bytes.

        Call with :attr:`lock` held. None when the stream is done or closed (then it
        is closed); the row may be read until the lock is released.
        """
        index = next(self._indices, None) if self._open else None
        if index is None:
            self.close_locked()
            return None
        lease = self.lease
        row = lease.row(index)
        return chunk_header(index, lease.keys[index], digest(row), len(row)), row

    def count_row(self, nbytes: int) -> None:
        """Count one row sent (chunks_served, bytes_served)."""
        self._count("chunks_served", 1)
        self._count("bytes_served", nbytes)

    def close(self) -> None:
        with self.lock:
            self.close_locked()

    def revoke(self) -> None:
        """Stop reading rows (waits for a row being sent); the call ends UNAVAILABLE."""
        self.revoked = True
        waker = self._waker
        if waker is not None:
            waker()
        with self.lock:
            self.close_locked()

    def close_locked(self) -> None:
        """:meth:`close` for a caller holding :attr:`lock`."""
        if self._open:
            self._open = False
            self._end_pull(self)
