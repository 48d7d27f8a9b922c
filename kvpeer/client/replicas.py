"""The directory replicas a client may call, their health, and the order to try them in.

Several ``kvpeer directory`` processes on one Redis serve the same state: a node may
send any call to any of them, and what it did through one is visible through the
others at once (the state, epochs and lease expiry included, lives in Redis). So a
client lists them all and :class:`DirectoryReplicas` decides which one to ask:

- a replica that answered UNAVAILABLE or DEADLINE_EXCEEDED is *down* for
  ``down_for_s`` (doubling while it stays down, up to 30 s), then *recovering*
  until it answers again; calls try healthy replicas first, then recovering ones,
  then down ones (only when nothing else is left). Recovering replicas get a
  :meth:`DirectoryReplicas.probe` from the background thread, so that a hung
  replica never costs a locate its deadline twice;
- :meth:`DirectoryReplicas.order` with ``sticky`` (the background thread's joins,
  heartbeats and publishes) keeps to the replica that last answered, so one node's
  writes arrive in order; without it (locates) the start rotates, spreading reads;
- every other status (NOT_FOUND, INVALID_ARGUMENT, ...) is the directory's answer,
  the same from every replica: it is returned, not failed over.

Replicas of memory-store directories do not share state; list several only for
directories on the same Redis. Answers carry the id of the store the replica
serves (Join, Locate, Stats). The store the node's last join went to is the
directory's; a replica that answers with another id is *split* (pointed at another
Redis, another database, or a memory store): it is logged as an error and not asked
again, so a node never registers in, or locates from, two directories at once.
:meth:`DirectoryReplicas.check_stores`, run after each join, asks every replica for
its id: a misconfigured replica shows at start rather than at the first failover,
and one that agrees again (a store re-created after a wipe) is used again. When more
replicas answer with another id than with the directory's, that id becomes the
directory's: the store was re-created under all of them (an operator reset it), or
the first answer came from the misconfigured one; a client never ends with every
replica split. With one replica there is nothing to compare: its id may change (a
memory store restarts).

Thread-safe: one lock guards the health figures, never held across an RPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvpeer.api.endpoint import parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.security import Security
from kvpeer.v1 import directory_pb2 as pb
from kvpeer.v1 import directory_pb2_grpc

log = logging.getLogger(__name__)

#: Statuses that mean "this replica could not answer": another one may.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_DOWN_MAX_S = 30.0


def status_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    """The status of a failed call (sync or asyncio); None for an error without one."""
    return exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None


def status_details(exc: grpc.RpcError) -> str:
    """What the server (or gRPC) said of a failed call, sync or asyncio."""
    return exc.details() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else str(exc)


@dataclass
class Replica:
    """One directory endpoint: its channel and health. Figures guarded by the set's lock."""

    target: str
    #: A ``grpc.Channel``, or a ``grpc.aio.Channel`` for an asyncio set.
    channel: Any
    stub: directory_pb2_grpc.DirectoryStub
    down_until: float = 0.0
    down_for_s: float = 0.0
    calls: int = 0
    failures: int = 0
    last_error: str | None = field(default=None, repr=False)
    #: The id of the store it serves, once an answer carried one.
    store_id: str = ""
    #: It serves another store than the directory's: never asked again.
    split: bool = False


class OtherStoreError(grpc.RpcError):
    """Every replica tried was split off during the call (stores changing under it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "replicas serve another store"


def parse_directory_endpoints(raw: Any, key: str = "directory") -> tuple[str, ...]:
    """``host:port``, a comma-separated list of them, or a list; ConfigError naming ``key``."""
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)):
        raise ConfigError(key, f"expected 'host:port' or a list of them, got {raw!r}")
    targets = [
        str(parse_endpoint(item, key=f"{key}[{i}]" if len(items) > 1 else key))
        for i, item in enumerate(items)
        if not isinstance(item, str) or item.strip()
    ]
    if not targets:
        raise ConfigError(key, "no directory endpoint given")
    if len(set(targets)) != len(targets):
        raise ConfigError(key, f"an endpoint is listed twice: {', '.join(targets)}")
    return tuple(targets)


class DirectoryReplicas:
    """One channel per directory replica, with the health that orders them.

    Args:
        endpoints: the replicas' ``host:port`` (see :func:`parse_directory_endpoints`);
            a name that resolves to several addresses is one replica to gRPC, which
            spreads calls over the addresses (``round_robin``) and skips dead ones.
        security: credentials presented to each.
        options: gRPC channel options.
        down_for_s: how long a replica that could not answer is tried last.
        on_failure: called with a replica's target each time a call to it fails
            with a failover status (metrics); from the calling thread.
        aio: asyncio channels, for :meth:`call_async` (routers); :meth:`call`,
            :meth:`probe` and :meth:`check_stores` are then not for use.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        security: Security | None,
        options: list[tuple[str, Any]],
        *,
        down_for_s: float = 1.0,
        on_failure: Callable[[str], None] | None = None,
        aio: bool = False,
    ) -> None:
        security = security or Security()
        open_channel = security.open_aio_channel if aio else security.open_channel
        # An asyncio channel does not attach the token: each call passes it.
        self._metadata = security.call_metadata() if aio else None
        self.replicas = []
        for target in parse_directory_endpoints(endpoints):
            channel = open_channel(target, options)
            self.replicas.append(
                Replica(target, channel, directory_pb2_grpc.DirectoryStub(channel))
            )
        self._down_for_s = down_for_s
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._current = 0
        self._turn = 0
        self._store_id: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(r.target for r in self.replicas)

    def order(self, *, sticky: bool) -> list[Replica]:
        """The replicas in the order to try them: up ones first (see the module docstring)."""
        now = time.monotonic()
        with self._lock:
            if sticky:
                start = self._current
            else:
                start = self._turn
                self._turn = (self._turn + 1) % len(self.replicas)
            turn = [r for r in self.replicas[start:] + self.replicas[:start] if not r.split]
            healthy = [r for r in turn if not r.down_for_s]
            recovering = [r for r in turn if r.down_for_s and r.down_until <= now]
            down = sorted((r for r in turn if r.down_until > now), key=lambda r: r.down_until)
            return healthy + recovering + down

    def probe(self, timeout_s: float) -> None:
        """Ask each recovering replica for Stats; one that answers is healthy again.

        For the background thread (it blocks up to ``timeout_s`` per replica).
        """
        for replica in self.recovering():
            try:
                replica.stub.Stats(pb.StatsRequest(), timeout=timeout_s)
            except grpc.RpcError as exc:
                self._failed(replica, exc)
            else:
                self._answered(replica, current=False)

    async def probe_async(self, timeout_s: float) -> None:
        """:meth:`probe` on asyncio channels (``aio=True``), for a task of the caller's loop."""
        for replica in self.recovering():
            try:
                await replica.stub.Stats(
                    pb.StatsRequest(), timeout=timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                self._failed(replica, exc)
            else:
                self._answered(replica, current=False)

    def recovering(self) -> list[Replica]:
        """The replicas whose down time is over but that have not answered since."""
        now = time.monotonic()
        with self._lock:
            return [r for r in self.replicas if r.down_for_s and r.down_until <= now]

    def check_stores(self, store_id: str, timeout_s: float) -> None:
        """Make ``store_id`` (the last join's) the directory's; ask every other replica.

        For the background thread, after a join (it blocks up to ``timeout_s`` per
        replica). Replicas that serve another store are split; ones that serve this
        one (again) are not.
        """
        if len(self.replicas) < 2 or not store_id:
            return
        with self._lock:
            self._follow(store_id)
            due = [r for r in self.replicas if r.store_id != store_id]
        for replica in due:
            try:
                response = replica.stub.Stats(pb.StatsRequest(), timeout=timeout_s)
            except grpc.RpcError as exc:
                self._failed(replica, exc)
            else:
                if self._same_store(replica, response):
                    self._answered(replica, current=False)

    def call(
        self,
        method: str,
        request: Any,
        *,
        deadline: float,
        sticky: bool,
        per_try_s: float | None = None,
    ) -> Any:
        """``method`` on the first replica that answers before ``deadline`` (monotonic).

        Each try is bounded by the time left and ``per_try_s``. Fails over on
        :data:`FAILOVER_CODES` while time is left; raises the last
        ``grpc.RpcError`` when no replica answered, any other status at once.
        """
        failed: list[grpc.RpcError] = []
        for replica, timeout in self._tries(deadline, sticky, per_try_s, failed):
            try:
                response = getattr(replica.stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                failed.append(self._failed_over(replica, exc))
                continue
            if self._accepted(replica, method, response):
                return response
        raise self._last(failed)

    async def call_async(self, method: str, request: Any, *, deadline: float) -> Any:
        """:meth:`call` on asyncio channels (``aio=True``), not sticky, one try per replica."""
        failed: list[grpc.RpcError] = []
        for replica, timeout in self._tries(deadline, False, None, failed):
            try:
                call = getattr(replica.stub, method)
                response = await call(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                failed.append(self._failed_over(replica, exc))
                continue
            if self._accepted(replica, method, response):
                return response
        raise self._last(failed)

    def health(self) -> dict[str, dict[str, Any]]:
        """Per replica: ``up`` (answered its last call), ``calls``, ``failures``, ``last_error``."""
        with self._lock:
            return {
                r.target: {
                    "up": not r.down_for_s,
                    "calls": r.calls,
                    "failures": r.failures,
                    "last_error": r.last_error,
                    "split": r.split,
                }
                for r in self.replicas
            }

    def close(self) -> None:
        for replica in self.replicas:
            replica.channel.close()

    async def close_async(self) -> None:
        """:meth:`close` for asyncio channels (``aio=True``)."""
        for replica in self.replicas:
            await replica.channel.close()

    def _same_store(self, replica: Replica, response: Any) -> bool:
        """Whether ``replica``'s answer comes from the directory's store; split it if not."""
        store_id = getattr(response, "store_id", "")
        if not store_id or len(self.replicas) < 2:
            return True  # an older directory or Redis down at its start; nothing to compare
        followed = None
        with self._lock:
            replica.store_id = store_id
            known = [r.store_id for r in self.replicas]
            if self._store_id is None or known.count(store_id) > known.count(self._store_id):
                followed = self._store_id
                self._follow(store_id)
            reference = self._store_id
            newly = store_id != reference and not replica.split
            replica.split = store_id != reference
            agreeing = [r.target for r in self.replicas if r.store_id == reference]
        if followed is not None:
            log.warning(
                "directory replicas %s: most now serve store %s, not %s (it was re-created, "
                "or the first answer came from a misconfigured replica): following it",
                ", ".join(self.targets),
                reference,
                followed,
            )
        if newly:
            log.error(
                "directory replica %s serves another store (id %s) than %s (id %s): the "
                "replicas of one directory must use the same --store (the same Redis "
                "database; a memory store is never shared); not using %s",
                replica.target,
                store_id,
                ", ".join(agreeing),
                reference,
                replica.target,
            )
        return store_id == reference

    def _follow(self, store_id: str) -> None:
        """Make ``store_id`` the directory's: split the replicas known to serve another.

        Under the lock.
        """
        self._store_id = store_id
        for r in self.replicas:
            r.split = bool(r.store_id) and r.store_id != store_id

    def _tries(
        self, deadline: float, sticky: bool, per_try_s: float | None, failed: list[Any]
    ) -> Iterator[tuple[Replica, float]]:
        """Each replica to try, in :meth:`order`, with its timeout; stops at ``deadline``
        once a try has ``failed`` (the first one always gets its chance)."""
        for replica in self.order(sticky=sticky):
            remaining = deadline - time.monotonic()
            if remaining <= 0 and failed:
                return
            timeout = remaining if per_try_s is None else min(remaining, per_try_s)
            yield replica, max(0.001, timeout)

    def _failed_over(self, replica: Replica, exc: grpc.RpcError) -> grpc.RpcError:
        """``exc`` from ``replica``: returned when another replica may answer, else raised."""
        if status_code(exc) not in FAILOVER_CODES:
            self._answered(replica)
            raise exc
        self._failed(replica, exc)
        return exc

    def _accepted(self, replica: Replica, method: str, response: Any) -> bool:
        """Whether to return ``replica``'s answer: not when it comes from another store."""
        if method == "Join":
            with self._lock:  # a join defines the directory: see check_stores
                replica.store_id = getattr(response, "store_id", "")
        elif not self._same_store(replica, response):
            return False
        self._answered(replica)
        return True

    def _last(self, failed: list[grpc.RpcError]) -> grpc.RpcError:
        """What a call that got no answer raises: the last failure."""
        if failed:
            return failed[-1]
        return OtherStoreError(
            f"directory replicas {', '.join(self.targets)} changed stores during the "
            "call: see the errors logged above"
        )

    def _answered(self, replica: Replica, *, current: bool = True) -> None:
        """``replica`` answered: healthy again; with ``current``, sticky calls go to it."""
        with self._lock:
            replica.calls += 1
            replica.down_until = 0.0
            replica.down_for_s = 0.0
            if current:
                self._current = self.replicas.index(replica)

    def _failed(self, replica: Replica, exc: grpc.RpcError) -> None:
        details = status_details(exc)
        with self._lock:
            replica.calls += 1
            replica.failures += 1
            replica.last_error = details
            replica.down_for_s = min(_DOWN_MAX_S, max(self._down_for_s, replica.down_for_s * 2))
            replica.down_until = time.monotonic() + replica.down_for_s
        if self._on_failure is not None:
            self._on_failure(replica.target)
