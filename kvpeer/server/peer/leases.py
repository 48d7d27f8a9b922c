"""The peer server's lease table: who holds which pinned chunks, and until when.

A Lookup with ``hold`` pins its hits in the :class:`ChunkSource` and registers the
answer here under a random, unguessable lease id. The pin ends exactly once, at
the first of: Release, expiry (the TTL passed), or :meth:`LeaseTable.close` at
server stop. It never ends while a Pull is reading the lease's rows: a lease that
is released or expires during a Pull leaves the table at once (new Pulls get
NOT_FOUND) and is unpinned when its last Pull ends. Pulls have deadlines, so that
wait is bounded.

Expiry runs on one reaper thread that sleeps on a condition until the next
expiry; adding an earlier lease or closing the table wakes it.
"""

from __future__ import annotations

import heapq
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvpeer.api.errors import KVPeerError
from kvpeer.server.peer.chunk_source import PinnedChunks

log = logging.getLogger(__name__)


class LeaseNotFound(KVPeerError):
    """No live lease has this id (never issued, released, expired or closed)."""


class TooManyLeases(KVPeerError):
    """The table holds its maximum number of live leases."""


@dataclass(eq=False)
class Lease:
    """One Lookup's pinned answer. Read-only to callers except through the table."""

    lease_id: str
    keys: tuple[bytes, ...]
    pinned: PinnedChunks
    expires_at: float
    #: Pulls currently reading the rows (guarded by the table's lock).
    pulls: int = 0
    #: Out of the table (released, expired or closed); unpin when ``pulls`` is 0.
    retired: bool = False

    @property
    def hits(self) -> Sequence[bool]:
        return self.pinned.hits

    def row(self, index: int) -> memoryview:
        """The pinned row of hit ``index``; valid while a Pull of this lease is open."""
        return self.pinned.rows[index]


@dataclass
class LeaseCounters:
    """Totals since start, for the server's stats."""

    created: int = 0
    released: int = 0
    expired: int = 0
    closed: int = 0
    revoked: int = 0


class LeaseTable:
    """Live leases, their expiry and their Pull counts.

    Thread-safety: every method may be called from any gRPC handler thread; one
    lock guards the table. Unpinning (``PinnedChunks.release``, which calls into the
    source) always runs outside that lock.

    Args:
        ttl_s: lifetime of a lease from its creation.
        max_leases: live leases beyond this are refused with :class:`TooManyLeases`.
        clock: monotonic clock, in seconds.
    """

    def __init__(
        self,
        ttl_s: float,
        max_leases: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_leases < 1:
            raise ValueError(f"need ttl_s > 0 and max_leases >= 1, got {ttl_s}, {max_leases}")
        self.ttl_s = ttl_s
        self.max_leases = max_leases
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._live: dict[str, Lease] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries are skipped
        self._closed = False
        self.counters = LeaseCounters()
        self._reaper = threading.Thread(target=self._reap, name="kvpeer-lease-reaper", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def full(self) -> bool:
        """Whether :meth:`add` would refuse now (a hint: it may change at once)."""
        with self._lock:
            return len(self._live) >= self.max_leases

    def add(self, keys: Sequence[bytes], pinned: PinnedChunks) -> Lease:
        """Register a pinned answer; the table now owns ``pinned`` and will release it.

        Raises:
            TooManyLeases: the table is full (``pinned`` is released before raising).
            LeaseNotFound: the table is closed (``pinned`` is released).
        """
        with self._lock:
            refusal: KVPeerError | None = None
            if self._closed:
                refusal = LeaseNotFound("the server is stopping")
            elif len(self._live) >= self.max_leases:
                refusal = TooManyLeases(
                    f"{len(self._live)} leases are live, the limit is {self.max_leases}: "
                    "release leases after pulling them"
                )
            else:
                expires_at = self._clock() + self.ttl_s
                lease = Lease(secrets.token_urlsafe(18), tuple(keys), pinned, expires_at)
                self._live[lease.lease_id] = lease
                heapq.heappush(self._expiries, (expires_at, lease.lease_id))
                self.counters.created += 1
                if self._expiries[0][1] == lease.lease_id:
                    self._wake.notify()
        if refusal is not None:
            pinned.release()
            raise refusal
        return lease

    def begin_pull(self, lease_id: str) -> Lease:
        """Mark a Pull as reading ``lease_id``; pair with exactly one :meth:`end_pull`.

        Raises:
            LeaseNotFound: unknown, released or expired lease.
        """
        with self._lock:
            lease = self._live.get(lease_id)
            if lease is None or self._clock() >= lease.expires_at:
                raise LeaseNotFound(_not_found(lease_id))
            lease.pulls += 1
            return lease

    def end_pull(self, lease: Lease) -> None:
        """A Pull stopped reading; unpin if the lease was retired meanwhile."""
        with self._lock:
            lease.pulls -= 1
            unpin = lease.retired and lease.pulls == 0
        if unpin:
            _unpin(lease)

    def is_live(self, lease_id: str) -> bool:
        """Whether ``lease_id`` is in the table and unexpired (never released, expired or revoked).

        A lease that leaves the table never comes back, so True means the lease
        was live all along since it was created (the same-host fast path's check).
        """
        with self._lock:
            lease = self._live.get(lease_id)
            return lease is not None and self._clock() < lease.expires_at

    def release(self, lease_id: str) -> None:
        """Release a lease (deferred while a Pull reads it).

        Raises:
            LeaseNotFound: unknown, already released or expired lease.
        """
        with self._lock:
            lease = self._live.get(lease_id)
            if lease is None or self._clock() >= lease.expires_at:
                raise LeaseNotFound(_not_found(lease_id))
            unpin = self._retire(lease)
            self.counters.released += 1
        if unpin:
            _unpin(lease)

    def revoke_all(self) -> list[Lease]:
        """Retire every live lease now (the owner of the chunks needs them back).

        Leases nobody is pulling are unpinned before this returns; the ones being
        pulled are returned, and unpin when their Pulls end (the caller ends them).
        """
        with self._lock:
            leases = list(self._live.values())
            unpin = [lease for lease in leases if self._retire(lease)]
            self.counters.revoked += len(leases)
        for lease in unpin:
            _unpin(lease)
        return [lease for lease in leases if lease not in unpin]

    def close(self) -> None:
        """Stop the reaper and retire every lease (those being pulled unpin when done)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            leases = list(self._live.values())
            unpin = [lease for lease in leases if self._retire(lease)]
            self.counters.closed += len(leases)
            self._wake.notify()
        for lease in unpin:
            _unpin(lease)
        if self._reaper is not threading.current_thread():
            self._reaper.join()

    # -- private -------------------------------------------------------------

    def _retire(self, lease: Lease) -> bool:
        """Take ``lease`` out of the table (lock held); True when the caller must unpin."""
        del self._live[lease.lease_id]
        lease.retired = True
        return lease.pulls == 0

    def _reap(self) -> None:
        """Reaper thread: sleep until the next expiry, retire what expired, repeat."""
        while True:
            due: list[Lease] = []
            with self._lock:
                while not self._closed:
                    now = self._clock()
                    while self._expiries and self._expiries[0][0] <= now:
                        _, lease_id = heapq.heappop(self._expiries)
                        lease = self._live.get(lease_id)
                        if lease is not None:
                            due.append(lease)
                    if due:
                        break
                    timeout = self._expiries[0][0] - now if self._expiries else None
                    self._wake.wait(timeout)
                if self._closed:
                    return
                unpin = [lease for lease in due if self._retire(lease)]
                self.counters.expired += len(due)
            for lease in unpin:
                _unpin(lease)


def _unpin(lease: Lease) -> None:
    """Release a retired lease's pins; a failing source must not kill the caller's thread."""
    try:
        lease.pinned.release()
    except Exception:
        log.exception("releasing the pins of lease %s failed", lease.lease_id)


def _not_found(lease_id: str) -> str:
    shown = lease_id if len(lease_id) <= 40 else lease_id[:40] + "..."
    return f"lease {shown!r} is unknown, released or expired: look the keys up again"
