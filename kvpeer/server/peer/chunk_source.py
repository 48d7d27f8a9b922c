"""Where the peer chunk server gets its bytes: the :class:`ChunkSource` contract.

The KVPeer servicer knows nothing about vLLM. It asks a ChunkSource which keys it
holds and, for a lease, to keep those rows pinned: their bytes must not change
until the pin is released, because Pull streams straight out of them without
copying them first. Two sources exist:

- :class:`kvpeer.server.peer.array_source.ArrayChunkSource`: a standalone buffer of
  ``num_chunks x chunk_bytes`` (numpy or shared memory) keyed by opaque bytes;
  used by the benchmarks, the demo's raw mode and the tests of the server itself;
- :class:`kvpeer.tier.primary_source.PrimaryChunkSource`: vLLM's primary tier,
  resolved through ``ParentManager`` inside ``serve_external_requests``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvpeer.api.same_host import SharedRegion


@dataclass
class PinnedChunks:
    """A source's answer to one lookup.

    ``hits[i]`` says whether ``keys[i]`` is held. ``rows`` maps each hit index to a
    read-only view of exactly ``chunk_bytes`` bytes, stable until :meth:`release`.
    ``release`` must be called exactly once by the holder of the answer (the
    server's lease table); calling it again is a no-op.
    """

    hits: Sequence[bool]
    rows: Mapping[int, memoryview]
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class ChunkSource(ABC):
    """Contract between the peer server and the memory it serves.

    Thread-safety: :meth:`lookup` and :meth:`PinnedChunks.release` are called
    from gRPC handler threads and from the server's lease reaper, concurrently;
    implementations synchronise themselves.
    """

    @property
    @abstractmethod
    def chunk_bytes(self) -> int:
        """Size of every row; equals the handshake's ``chunk_bytes``."""

    @abstractmethod
    def lookup(
        self,
        keys: Sequence[bytes],
        *,
        hold: bool,
        handoff_id: str = "",
        wait_s: float = 0.0,
        timeout_s: float = 5.0,
    ) -> PinnedChunks:
        """Answer which ``keys`` are held; with ``hold``, pin the hits.

        May block the calling (gRPC) thread up to ``timeout_s`` seconds while the
        answer is worked out, plus up to ``wait_s`` for keys of ``handoff_id``
        that are not stored yet. Without ``hold`` the answer's ``rows`` is empty
        and nothing stays pinned.

        Raises:
            LookupRefused: the source will not answer (e.g. a timed-out handoff);
                the server maps it to a gRPC status with the message.
        """

    def region(self) -> SharedRegion | None:
        """The shared-memory file every pinned row lies in, for the same-host fast path.

        None (the default) offers no fast path: consumers on the same host pull over
        the network. An implementation re-checks that the file is still the one it
        mapped (:meth:`SharedRegion.still_at_path`) and answers None when not. Called
        from gRPC handler threads (handshake, MapRows); must not block.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop answering; pins already handed out stay valid until released."""


class LookupRefused(Exception):
    """A source refuses a lookup; ``code`` names the gRPC status to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name, e.g. "NOT_FOUND"
