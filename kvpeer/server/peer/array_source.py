"""A standalone :class:`ChunkSource`: ``num_chunks`` rows of ``chunk_bytes`` keyed by opaque bytes.

The peer server's tests, the benchmarks and the demo's raw mode serve from this
instead of vLLM's primary tier. It behaves like a primary tier where it matters
to the server: rows are pinned while a lease holds them, a pinned row is never
overwritten, and evicting a pinned key is deferred until its last pin goes.

The buffer is a fresh numpy array, or any writable buffer the caller owns (for
example a ``multiprocessing.shared_memory.SharedMemory``'s ``buf``, so another
process can fill the rows). The source and every row view it handed out export
that buffer: drop them (and release their pins) before closing the shared memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvpeer.api.errors import KVPeerError
from kvpeer.api.same_host import RegionOffer, SharedRegion
from kvpeer.server.peer.chunk_source import ChunkSource, PinnedChunks


class RowPinnedError(KVPeerError):
    """A write would change a row that a lease still pins."""


class SourceFullError(KVPeerError):
    """Every row holds a key; evict one before putting another."""


@dataclass
class _Row:
    key: bytes
    pins: int = 0
    #: False while :meth:`ArrayChunkSource.put` writes the row's bytes: no hits then.
    ready: bool = False
    #: Evicted while pinned or being written: free the row once that ends, hit no more.
    evicting: bool = False


class ArrayChunkSource(ChunkSource):
    """Rows of a 2-D byte array, addressed by key, with pin counts.

    Thread-safety: every method may be called from any thread; one lock guards the
    key table and one condition wakes lookups that wait for keys (``wait_s``).
    Row bytes are written outside the lock but only into unpinned rows that no
    key maps to yet, or that :meth:`put` has just claimed.

    Args:
        num_chunks: rows in the buffer.
        chunk_bytes: bytes per row.
        buffer: optional writable buffer of at least ``num_chunks * chunk_bytes``
            bytes to use instead of a new zeroed array.
    """

    def __init__(
        self, num_chunks: int, chunk_bytes: int, *, buffer: memoryview | bytearray | None = None
    ) -> None:
        if num_chunks < 1 or chunk_bytes < 1:
            raise ValueError(
                f"need num_chunks >= 1 and chunk_bytes >= 1, got {num_chunks}, {chunk_bytes}"
            )
        size = num_chunks * chunk_bytes
        if buffer is None:
            flat = np.zeros(size, dtype=np.uint8)
        else:
            flat = np.frombuffer(buffer, dtype=np.uint8, count=size)
            if not flat.flags.writeable:
                raise ValueError("buffer must be writable")
        self._array = flat.reshape(num_chunks, chunk_bytes)
        self._chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._stored = threading.Condition(self._lock)
        self._rows: dict[int, _Row] = {}
        self._index: dict[bytes, int] = {}
        self._free = list(range(num_chunks - 1, -1, -1))
        self._closed = False
        #: The same-host fast path's region: found when the buffer maps a /dev/shm file.
        self._offer = RegionOffer(self._array, row_bytes=chunk_bytes)

    # -- ChunkSource ---------------------------------------------------------

    @property
    def chunk_bytes(self) -> int:
        return self._chunk_bytes

    @property
    def num_chunks(self) -> int:
        return self._array.shape[0]

    def lookup(
        self,
        keys: Sequence[bytes],
        *,
        hold: bool,
        handoff_id: str = "",
        wait_s: float = 0.0,
        timeout_s: float = 5.0,
    ) -> PinnedChunks:
        """Answer which keys are held; with ``hold`` pin the hits.

        With ``wait_s`` > 0 waits (up to ``min(wait_s, timeout_s)``) until every key
        is stored, then answers with what is there. ``handoff_id`` is not used: this
        source has no notion of handoffs.
        """
        deadline = time.monotonic() + max(0.0, min(wait_s, timeout_s))
        with self._stored:
            while not self._closed and not all(self._holds(k) for k in keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._stored.wait(remaining)
            hits = [not self._closed and self._holds(k) for k in keys]
            if not hold:
                return PinnedChunks(hits=hits, rows={})
            rows = {i: self._index[k] for i, k in enumerate(keys) if hits[i]}
            for row in rows.values():
                self._rows[row].pins += 1
        pinned = list(rows.values())
        views = {i: memoryview(self._array[row]).toreadonly() for i, row in rows.items()}
        return PinnedChunks(hits=hits, rows=views, _release=lambda: self._unpin(pinned))

    def region(self) -> SharedRegion | None:
        """The /dev/shm file the buffer maps, if it does (same-host fast path)."""
        return self._offer.get()

    def close(self) -> None:
        """Answer every later lookup with misses; pins already handed out stay valid."""
        with self._stored:
            self._closed = True
            self._stored.notify_all()

    # -- filling and eviction -----------------------------------------------

    def put(self, key: bytes, data: bytes | memoryview | np.ndarray | None = None) -> int:
        """Store ``data`` (exactly ``chunk_bytes``) under ``key``; return its row.

        A key already stored is overwritten in place (it does not hit meanwhile).
        ``data=None`` only claims the row, zeroed or not: fill it through :meth:`row`
        first, or use :meth:`put_row`.

        Raises:
            RowPinnedError: the key's row is pinned by a lease.
            SourceFullError: the key is new and no row is free.
        """
        source = self._check_data(data)
        with self._lock:
            row = self._index.get(key)
            if row is None:
                if not self._free:
                    raise SourceFullError(
                        f"all {self.num_chunks} rows hold keys; evict one before putting another"
                    )
                row = self._free.pop()
                self._rows[row] = _Row(key)
                self._index[key] = row
            else:
                self._claim(self._rows[row], f"key {key.hex()}")
        self._write(row, source)
        return row

    def put_row(
        self, row: int, key: bytes, data: bytes | memoryview | np.ndarray | None = None
    ) -> None:
        """Store ``key`` in a chosen ``row`` (e.g. to mirror another node's layout).

        The row must be free, or hold ``key`` unpinned.

        Raises:
            RowPinnedError: the row is pinned.
            KVPeerError: the row holds another key, or ``key`` lives in another row.
        """
        if not 0 <= row < self.num_chunks:
            raise IndexError(f"row {row} out of range [0, {self.num_chunks})")
        source = self._check_data(data)
        with self._lock:
            entry = self._rows.get(row)
            if entry is not None and entry.key != key:
                raise KVPeerError(f"row {row} holds key {entry.key.hex()}; evict it first")
            if entry is None:
                if key in self._index:
                    raise KVPeerError(f"key {key.hex()} is stored in row {self._index[key]}")
                self._free.remove(row)
                self._rows[row] = _Row(key)
                self._index[key] = row
            else:
                self._claim(entry, f"row {row}")
        self._write(row, source)

    def evict(self, key: bytes) -> bool:
        """Forget ``key``. True if its row is free now, False if deferred or unknown.

        A pinned key stops hitting at once; its row is freed when the last pin goes.
        """
        with self._lock:
            row = self._index.pop(key, None)
            if row is None:
                return False
            entry = self._rows[row]
            if entry.pins or not entry.ready:
                entry.evicting = True
                return False
            self._free_row(row)
            return True

    def row(self, index: int) -> np.ndarray:
        """The writable row ``index`` (a numpy view), for filling rows in bulk."""
        return self._array[index]

    def pin_count(self, key: bytes) -> int:
        """Current pins of ``key``'s row (0 for unknown keys)."""
        with self._lock:
            row = self._index.get(key)
            return 0 if row is None else self._rows[row].pins

    def total_pins(self) -> int:
        """Pins over every row, including rows of keys evicted while pinned."""
        with self._lock:
            return sum(entry.pins for entry in self._rows.values())

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._index

    # -- private -------------------------------------------------------------

    def _holds(self, key: bytes) -> bool:
        row = self._index.get(key)
        return row is not None and self._rows[row].ready

    def _check_data(self, data: bytes | memoryview | np.ndarray | None) -> np.ndarray | None:
        if data is None:
            return None
        array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        if array.nbytes != self._chunk_bytes:
            raise ValueError(f"a row is {self._chunk_bytes} bytes, got {array.nbytes}")
        return array.reshape(-1).view(np.uint8)

    def _claim(self, entry: _Row, what: str) -> None:
        """Take an existing row for writing (caller holds the lock)."""
        if entry.pins:
            raise RowPinnedError(
                f"{what} is pinned by {entry.pins} lease(s); release them before overwriting it"
            )
        if not entry.ready:
            raise KVPeerError(f"{what} is being written by another put")
        entry.ready = False

    def _write(self, row: int, source: np.ndarray | None) -> None:
        """Copy ``source`` into a claimed row, then let lookups hit it."""
        if source is not None:
            self._array[row] = source
        with self._stored:
            entry = self._rows[row]
            entry.ready = True
            if entry.evicting:
                self._free_row(row)
            self._stored.notify_all()

    def _free_row(self, row: int) -> None:
        del self._rows[row]
        self._free.append(row)

    def _unpin(self, rows: Sequence[int]) -> None:
        with self._lock:
            for row in rows:
                entry = self._rows[row]
                entry.pins -= 1
                if entry.pins == 0 and entry.evicting:
                    self._free_row(row)
