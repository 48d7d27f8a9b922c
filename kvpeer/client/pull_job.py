"""One pull's moving parts, whatever its transport: targets, result, streams, shared state.

:class:`~kvpeer.client.peer.PeerClient` deals a pull's :class:`PullTarget` s over
several streams (threads); each stream is a :class:`RowStream` (the h2 transport's
call, or :class:`GrpcRowStream` over grpcio) and reports into one :class:`PullJob`,
which becomes the caller's :class:`PullResult`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from kvpeer.api.wire import ChunkHeader, decode_chunk


@dataclass(frozen=True)
class PullTarget:
    """Where one row goes: ``index`` into the lookup's keys, its ``key``, and ``dest``.

    ``dest`` is a writable, C-contiguous, 1-D byte view (format ``B``, ``b`` or
    ``c``) of exactly ``chunk_bytes`` bytes, e.g. ``primary.cast("B")[a:b]``.
    """

    index: int
    key: bytes
    dest: memoryview


@dataclass
class PullResult:
    """Outcome of one pull.

    ``loaded[i]`` is True only when target ``i``'s row arrived whole, its key
    matched and the digest of the bytes as written in its ``dest`` matched. The
    bytes of a ``dest`` whose flag is False are undefined (partly or wrongly
    written, or untouched). ``error`` is the first failure, readable, or None.
    ``corrupt`` counts the rows that arrived whole but failed their digest check
    (damaged in transit); they are not loaded. ``same_host_rows``/``same_host_bytes``
    are the loaded rows that came by the same-host fast path
    (:mod:`kvpeer.client.same_host`), the rest came over the network;
    ``fallback`` names why the fast path was not (or not wholly) used, if it was
    not (a :data:`kvpeer.client.same_host.REASONS` label).
    """

    loaded: list[bool]
    bytes_loaded: int = 0
    seconds: float = 0.0
    error: str | None = None
    corrupt: int = 0
    same_host_rows: int = 0
    same_host_bytes: int = 0
    fallback: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and all(self.loaded)


class RowStream(Protocol):
    """One Pull call as :meth:`PeerClient._stream` reads it, whatever the transport.

    Iterating yields each row's header; the row's data is then read into its
    destination (:meth:`read_into`) or dropped (:meth:`skip`) before the next.
    :meth:`cancel` may be called from any thread; :meth:`close` ends the call.
    """

    def __iter__(self) -> Iterator[ChunkHeader]: ...

    def read_into(self, dest: np.ndarray) -> None: ...

    def skip(self) -> None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


class GrpcRowStream:
    """A grpcio Pull call as a :class:`RowStream`: each message is decoded in place, then copied."""

    def __init__(self, call: grpc.Call) -> None:
        self._call = call
        self._data: memoryview | None = None

    def __iter__(self) -> Iterator[ChunkHeader]:
        for message in self._call:
            frame = decode_chunk(message)
            self._data = frame.data
            yield ChunkHeader(frame.index, frame.key, frame.digest, len(frame.data))

    def read_into(self, dest: np.ndarray) -> None:
        np.copyto(dest, np.frombuffer(self._data, dtype=np.uint8))  # releases the GIL
        self._data = None

    def skip(self) -> None:
        self._data = None

    def cancel(self) -> None:
        self._call.cancel()

    def close(self) -> None:
        self._data = None
        self._call.cancel()  # a no-op once the call ended


class PullJob:
    """Shared state of one pull's streams: flags, first error, calls to cancel.

    Stream threads report through it; the caller's thread waits on :attr:`finished`
    and may :meth:`cancel`. One lock guards everything.
    """

    def __init__(self, endpoint: str, size: int, streams: int) -> None:
        self.endpoint = endpoint
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._loaded = [False] * size
        self._bytes = 0
        self._corrupt = 0
        self._error: str | None = None
        self._calls: list[RowStream] = []
        self._cancelled = False
        self._running = streams

    def track(self, call: RowStream) -> bool:
        """Remember a started call so :meth:`cancel` can stop it; False if already cancelled."""
        with self._lock:
            if not self._cancelled:
                self._calls.append(call)
                return True
        call.cancel()
        return False

    def loaded(self, position: int, nbytes: int) -> None:
        with self._lock:
            self._loaded[position] = True
            self._bytes += nbytes

    def fail(self, message: str) -> None:
        with self._lock:
            if self._error is None:
                self._error = message

    def corrupt(self, message: str) -> None:
        """A row failed its digest check: count it, and fail with ``message``."""
        with self._lock:
            self._corrupt += 1
        self.fail(message)

    def cancel(self, reason: str) -> None:
        with self._lock:
            self._cancelled = True
            if self._error is None:
                self._error = reason
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def stream_done(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self.finished.set()

    def result(self, seconds: float) -> PullResult:
        with self._lock:
            error = None if self._error is None else f"pull from {self.endpoint}: {self._error}"
            return PullResult(
                list(self._loaded), self._bytes, seconds, error, corrupt=self._corrupt
            )
