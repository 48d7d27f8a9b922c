"""Byte views of rows of vLLM's primary tier.

vLLM hands every tier the same 2-D ``memoryview`` of its shared-memory primary tier
(shape ``(num_chunks, row_stride)``). Rows cannot be taken as ``view[c]`` (vLLM
0.33.0 raises NotImplementedError for multi-dimensional sub-views), so they are
sliced out of one flat ``cast("B")`` view. Each slice is an export of that flat
view: it must be released before the flat view can be, and the flat view must be
released before vLLM can unmap the primary tier (else it warns that the buffers
are still exported and keeps ``/dev/shm`` mapped). :class:`PrimaryRows` counts
the slices it hands out so that :meth:`close` can say what leaked.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PrimaryRows:
    """Row views over vLLM's primary tier. Thread-safe."""

    def __init__(self, primary_kv_view: memoryview) -> None:
        self.chunk_bytes: int = primary_kv_view.strides[0]
        self.num_chunks: int = primary_kv_view.shape[0]
        self._flat: memoryview | None = primary_kv_view.cast("B")
        self._lock = threading.Lock()
        self._open_views = 0

    def row(self, chunk_id: int) -> memoryview:
        """A writable view of row ``chunk_id``; give it back with :meth:`release`."""
        cid = int(chunk_id)
        if not 0 <= cid < self.num_chunks:
            raise IndexError(f"chunk id {cid} outside the primary tier's {self.num_chunks} rows")
        with self._lock:
            if self._flat is None:
                raise RuntimeError("primary rows are closed")
            self._open_views += 1
            return self._flat[cid * self.chunk_bytes : (cid + 1) * self.chunk_bytes]

    def release(self, view: memoryview) -> None:
        """Release a view returned by :meth:`row`."""
        view.release()
        with self._lock:
            self._open_views -= 1

    @property
    def open_views(self) -> int:
        return self._open_views

    def close(self) -> None:
        """Release the flat view; call after every row view is released."""
        with self._lock:
            flat, self._flat = self._flat, None
            leaked = self._open_views
        if flat is None:
            return
        try:
            flat.release()
        except BufferError:
            log.error(
                "%d primary row views still open at shutdown: vLLM will keep the "
                "shared memory mapped",
                leaked,
            )
