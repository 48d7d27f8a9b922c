"""The consumer's same-host fast path: copy a lease's rows out of the holder's shared-memory file.

When a peer runs on the same kernel (same boot id in the handshake) and offers
its primary region (``kvpeer.v1.Region``), :class:`SameHostPath` opens that file
read-only (``O_NOFOLLOW``, only under ``/dev/shm``) and keeps the descriptor while
its identity — ``st_dev``, ``st_ino``, size, engine id — matches what the peer
said; it is re-checked at every handshake. A pull then goes:

1. ``MapRows(lease, indices)`` per batch of rows (the authorised, leased call:
   without a live lease from an authorised Lookup there are no offsets), which
   answers each row's key, file offset, length and digest; every field is checked
   (index asked for, key, length = ``chunk_bytes``, offset + length within the
   region and within the file's size now) before a byte is read;
2. each row is copied with ``preadv`` from the holder's file into the consumer's
   destination row, in pieces of :data:`PIECE_BYTES`, each hashed (XXH3-128,
   streaming) right after its copy while it is in cache; the digest must equal
   MapRows's. Batches run on ``streams`` threads (``preadv`` and XXH3 release the GIL);
3. ``CheckLease(lease)`` after the last copy: only if the lease was live all
   along (not released, expired, revoked by a cache reset, or unknown to a
   restarted holder) do the copied rows count as loaded.

Why ``preadv`` and not a mapping of the holder's file: a mapped read of a file
that was truncated meanwhile raises SIGBUS and kills the process (here: vLLM's
engine); ``preadv`` returns a short count, which fails the row cleanly. It costs
some speed against ``memcpy`` (kvpeer bench shows both).

Anything that rules the fast path out before bytes are read (another host, no
region, the file does not open or is another file, the holder refuses MapRows)
or shows the holder's file is no longer the region (replaced, truncated) falls
back to the network pull for the rows not yet loaded, with the reason in
:attr:`PullResult.fallback` and a log line. A holder that died, reset its cache
or restarted fails the rows as a network pull would (no fallback: the lease is gone).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import xxhash

from kvpeer.api.same_host import Host, SharedRegion, allowed_path, this_host
from kvpeer.client.pull_job import PullResult, PullTarget
from kvpeer.v1 import peer_pb2

log = logging.getLogger(__name__)

#: Bytes copied (and then hashed from cache) at a time.
PIECE_BYTES = 1 << 20
#: Rows per MapRows call: the holder hashes a batch while the consumer copies another.
BATCH_ROWS = 16
#: Statuses of MapRows after which the network pull is tried instead.
_FALLBACK_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED})

#: Reasons (metric labels) the fast path was not used, or was left for the network.
REASONS = (
    "off",
    "other_host",
    "no_region",
    "path_not_allowed",
    "open_failed",
    "identity_mismatch",
    "holder_refused",
    "identity_changed",
    "region_truncated",
    "bad_offsets",
)

#: A unary call: (request, timeout=...) -> response.
Rpc = Callable[..., object]
#: The network pull of a subset of targets (PeerClient's own pull).
NetworkPull = Callable[
    [str, Sequence[PullTarget], int, float, "threading.Event | None"], PullResult
]


@dataclass(frozen=True)
class _Opened:
    fd: int
    region: SharedRegion


class _Fallback(Exception):
    """Leave the rest of this pull to the network; ``reason`` is a :data:`REASONS` label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SameHostPath:
    """One peer's same-host fast path, consumer side. Thread-safe.

    :meth:`offer` runs at each handshake (the client's handshake lock held);
    :meth:`pull` on the caller's thread (the tier's puller thread), with
    ``streams`` threads of its own. ``on_stale`` (any thread) asks the client to
    handshake again, after the holder's file turned out not to be the region.

    Args:
        endpoint: the peer, for logs.
        chunk_bytes: bytes per row.
        enabled: False (``same_host: off``) never uses the fast path.
        map_rows, check_lease: the peer's MapRows and CheckLease calls.
        on_stale: called when the region changed under us.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        chunk_bytes: int,
        enabled: bool,
        map_rows: Rpc,
        check_lease: Rpc,
        on_stale: Callable[[], None],
    ) -> None:
        self._endpoint = endpoint
        self._chunk_bytes = chunk_bytes
        self._enabled = enabled
        self._map_rows = map_rows
        self._check_lease = check_lease
        self._on_stale = on_stale
        self._lock = threading.Lock()
        self._opened: _Opened | None = None
        #: Why the fast path is not in use (a REASONS label), or "" while it is.
        self.reason = "off" if not enabled else "no_region"
        self._said = ""

    # -- handshake ------------------------------------------------------------------

    def offer(self, response: peer_pb2.HandshakeResponse) -> None:
        """Decide from a handshake whether the fast path can be used, opening the region if so."""
        if not self._enabled:
            return
        reason, detail, opened = self._try_open(response)
        with self._lock:
            previous, self._opened = self._opened, opened
            self.reason = reason
        if previous is not None and (opened is None or previous.fd != opened.fd):
            os.close(previous.fd)
        self._say(reason, detail)

    def _try_open(self, response: peer_pb2.HandshakeResponse) -> tuple[str, str, _Opened | None]:
        theirs = Host.from_proto(response.host)
        if not this_host().same_kernel(theirs):
            return "other_host", f"it runs on another host ({theirs.hostname or 'unnamed'})", None
        region = SharedRegion.from_proto(response.region) if response.HasField("region") else None
        if region is None:
            return "no_region", "it offers no shared-memory region", None
        if region.row_bytes != self._chunk_bytes:
            return "identity_mismatch", f"its region's rows are {region.row_bytes} bytes", None
        if not allowed_path(region.path):
            return "path_not_allowed", f"its region {region.path[:200]!r} is not in /dev/shm", None
        with self._lock:
            current = self._opened
        if (
            current is not None
            and current.region.same_file(region)
            and region.matches(os.fstat(current.fd))
        ):
            return "", f"region {region.describe()}", current
        try:
            fd = os.open(region.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            return "open_failed", f"cannot open {region.path}: {exc.strerror}", None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            return "open_failed", f"cannot stat {region.path}: {exc.strerror}", None
        if not region.matches(st):
            os.close(fd)
            return (
                "identity_mismatch",
                f"{region.path} is not its region (inode {st.st_ino}, {st.st_size} bytes; "
                f"it said inode {region.st_ino}, {region.size} bytes)",
                None,
            )
        return "", f"region {region.describe()}", _Opened(fd, region)

    def _say(self, reason: str, detail: str) -> None:
        """Log the fast path's state for this peer when it changes."""
        said = f"{reason}:{detail}"
        if said == self._said:
            return
        self._said = said
        if reason:
            log.info(
                "same-host fast path to %s not used (%s): %s; pulling over the network",
                self._endpoint,
                reason,
                detail,
            )
        else:
            log.info("same-host fast path to %s in use: %s", self._endpoint, detail)

    @property
    def usable(self) -> bool:
        return self._opened is not None

    def drop(self, reason: str, detail: str) -> None:
        """Stop using the region (it changed); handshake again to re-check it."""
        with self._lock:
            opened, self._opened = self._opened, None
            self.reason = reason
        if opened is not None:
            os.close(opened.fd)
            log.warning(
                "same-host fast path to %s dropped (%s): %s; falling back to the network",
                self._endpoint,
                reason,
                detail,
            )
            self._said = ""
            self._on_stale()

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, None
        if opened is not None:
            os.close(opened.fd)

    # -- pull ---------------------------------------------------------------------

    def pull(
        self,
        lease_id: str,
        targets: Sequence[PullTarget],
        *,
        streams: int,
        timeout_s: float,
        cancel: threading.Event | None,
        network: NetworkPull,
    ) -> PullResult:
        """Copy ``targets`` from the holder's region; fall back to ``network`` when needed.

        Never raises for a peer's failure: as :meth:`PeerClient.pull`, the result's
        ``loaded`` flags say which rows are in place and verified.
        """
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        opened = self._opened
        if opened is None:
            result = network(lease_id, targets, streams, timeout_s, cancel)
            if self._enabled:
                result.fallback = self.reason or "no_region"
            return result
        copy = _Copy(self, opened, lease_id, targets, deadline, cancel)
        copy.run(max(1, streams))
        if copy.fallback is not None:
            reason, detail = copy.fallback
            if reason in ("identity_changed", "region_truncated", "bad_offsets", "holder_refused"):
                self.drop(reason, detail)
            else:
                log.info(
                    "same-host copy from %s left to the network (%s): %s",
                    self._endpoint,
                    reason,
                    detail,
                )
        loaded = copy.loaded
        nbytes = sum(self._chunk_bytes for flag in loaded if flag)
        error = copy.error
        if any(loaded):  # rows count only if the lease was live all along
            gone = self._confirm(lease_id, deadline)
            if gone is not None:
                loaded = [False] * len(loaded)
                nbytes = 0
                error = error or gone
        same_rows = sum(loaded)
        result = PullResult(
            loaded,
            nbytes,
            0.0,
            error,
            corrupt=copy.corrupt,
            same_host_rows=same_rows,
            same_host_bytes=nbytes,
        )
        rest = [t for t, flag in zip(targets, loaded, strict=True) if not flag]
        if copy.fallback is not None and error is None and rest:
            remaining = max(0.1, deadline - time.monotonic())
            more = network(lease_id, rest, streams, remaining, cancel)
            flags = iter(more.loaded)
            result.loaded = [flag or next(flags) for flag in loaded]
            result.bytes_loaded += more.bytes_loaded
            result.error = more.error
            result.corrupt += more.corrupt
            result.fallback = copy.fallback[0]
        result.seconds = time.perf_counter() - started
        return result

    def _confirm(self, lease_id: str, deadline: float) -> str | None:
        """None if the lease is still live after the copy, else why the rows must not count."""
        try:
            self._check_lease(
                peer_pb2.CheckLeaseRequest(lease_id=lease_id),
                timeout=max(0.1, deadline - time.monotonic()),
            )
        except grpc.RpcError as exc:
            return (
                f"same-host copy from {self._endpoint}: the lease did not survive the copy "
                f"({_describe(exc)}); the copied rows are not kept"
            )
        return None


class _Copy:
    """One pull's copy: batches dealt to threads, flags, first error or fallback."""

    def __init__(
        self,
        path: SameHostPath,
        opened: _Opened,
        lease_id: str,
        targets: Sequence[PullTarget],
        deadline: float,
        cancel: threading.Event | None,
    ) -> None:
        self._path = path
        self._fd = opened.fd
        self._region = opened.region
        self._lease_id = lease_id
        self._targets = targets
        self._deadline = deadline
        self._cancel = cancel
        self._lock = threading.Lock()
        self.loaded = [False] * len(targets)
        self.corrupt = 0
        self.error: str | None = None
        self.fallback: tuple[str, str] | None = None
        self._batches: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        positions = list(range(len(targets)))
        for start in range(0, len(positions), BATCH_ROWS):
            self._batches.put(positions[start : start + BATCH_ROWS])

    def run(self, streams: int) -> None:
        count = min(streams, -(-len(self._targets) // BATCH_ROWS))
        if count <= 1:
            self._work()
            return
        threads = [
            threading.Thread(target=self._work, name=f"kvpeer-copy-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _stopped(self) -> bool:
        if self._cancel is not None and self._cancel.is_set():
            self._fail("the pull was cancelled")
        if time.monotonic() > self._deadline:
            self._fail("the pull's deadline passed")
        return self.error is not None or self.fallback is not None

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message

    def _leave(self, reason: str, message: str) -> None:
        with self._lock:
            if self.fallback is None:
                self.fallback = (reason, message)

    def _work(self) -> None:
        while not self._stopped():
            try:
                batch = self._batches.get_nowait()
            except queue.Empty:
                return
            try:
                self._batch(batch)
            except _Fallback as exc:
                self._leave(exc.reason, str(exc))
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in _FALLBACK_CODES:
                    self._leave("holder_refused", _describe(exc))
                else:
                    self._fail(f"MapRows: {_describe(exc)}")
            except Exception as exc:  # a bug must not escape a copy thread unreported
                log.exception("same-host copy failed")
                self._fail(f"{type(exc).__name__}: {exc}")

    def _batch(self, batch: list[int]) -> None:
        targets = self._targets
        request = peer_pb2.MapRowsRequest(
            lease_id=self._lease_id, indices=[targets[p].index for p in batch]
        )
        response = self._path._map_rows(
            request, timeout=max(0.01, self._deadline - time.monotonic())
        )
        assert isinstance(response, peer_pb2.MapRowsResponse)
        plan = self._check(batch, response)
        for position, offset, row_digest in plan:
            if self._stopped():
                return
            dest = targets[position].dest
            got = _copy_row(self._fd, offset, dest)
            if got is None:
                raise _Fallback(
                    "region_truncated",
                    f"{self._region.path} ended before row {targets[position].index} "
                    "(truncated meanwhile)",
                )
            if got != row_digest:
                with self._lock:
                    self.corrupt += 1
                self._fail(
                    f"row {targets[position].index}: digest mismatch in the same-host copy; "
                    "not loaded"
                )
                return
            with self._lock:
                self.loaded[position] = True

    def _check(
        self, batch: list[int], response: peer_pb2.MapRowsResponse
    ) -> list[tuple[int, int, bytes]]:
        """Every row of ``response`` checked against the request and the file, before any copy."""
        region = self._region
        theirs = SharedRegion.from_proto(response.region)
        if theirs is None or not region.same_file(theirs):
            raise _Fallback(
                "identity_changed",
                f"the holder now describes its region as "
                f"{theirs.describe() if theirs else 'unusable'}, not {region.describe()}",
            )
        size = os.fstat(self._fd).st_size
        limit = min(region.size, size)
        if size < region.size:
            raise _Fallback(
                "region_truncated", f"{region.path} has {size} bytes, the holder said {region.size}"
            )
        wanted = {self._targets[p].index: p for p in batch}
        if len(response.rows) != len(batch):
            raise _Fallback(
                "bad_offsets", f"MapRows answered {len(response.rows)} rows for {len(batch)}"
            )
        plan = []
        for row in response.rows:
            position = wanted.pop(row.index, None)
            if position is None:
                raise _Fallback("bad_offsets", f"MapRows named row {row.index}, not asked for")
            if row.key != self._targets[position].key:
                raise _Fallback("bad_offsets", f"MapRows gave row {row.index} another key")
            if row.length != self._path._chunk_bytes or len(row.digest) != 16:
                raise _Fallback("bad_offsets", f"MapRows row {row.index}: bad length or digest")
            if row.offset + row.length > limit:
                raise _Fallback(
                    "bad_offsets",
                    f"MapRows row {row.index} at {row.offset}+{row.length} lies outside "
                    f"the region's {limit} bytes",
                )
            plan.append((position, row.offset, row.digest))
        return plan


def _copy_row(fd: int, offset: int, dest: memoryview) -> bytes | None:
    """Copy ``len(dest)`` bytes at ``offset`` of ``fd`` into ``dest``; their XXH3-128, or None if short."""
    hasher = xxhash.xxh3_128()
    with memoryview(dest) as flat:
        size = flat.nbytes
        pos = 0
        while pos < size:
            end = min(size, pos + PIECE_BYTES)
            with flat[pos:end] as piece:
                try:
                    got = os.preadv(fd, [piece], offset + pos)
                except OSError:
                    return None
                if got != end - pos:
                    return None
                hasher.update(piece)
            pos = end
    return hasher.digest()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
