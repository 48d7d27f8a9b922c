"""The directory client a kvpeer node uses: join, heartbeat, batched publish, locate.

One :class:`DirectoryClient` per node. Its background thread keeps the node
registered and the directory's view of the node's keys up to date; callers only
queue changes (:meth:`DirectoryClient.publish`, :meth:`DirectoryClient.withdraw`,
never blocking) and ask questions (:meth:`DirectoryClient.locate`, a blocking RPC
with a deadline that answers "nobody has it" when the directory cannot be asked).

The client remembers what it has published (minus what it withdrew). Whenever the
directory forgets the node — it restarted with a memory store, the lease ran out,
or a call is refused with NOT_FOUND / FAILED_PRECONDITION — the thread joins
again (new epoch) and re-publishes everything it holds, in batches.

Its answers are :mod:`kvpeer.client.location`'s :class:`Location` and
:class:`Holder`; :func:`~kvpeer.client.location.longest_run` picks among them.

Why hand-written, not ``tenacity`` (issue 14): nothing here is a blocking call
retried in a loop. The re-join back-off is a deadline (``_retry_at``, with
jitter) in the background thread's event loop, which also heartbeats, sends
queued publishes and wakes on new work while it waits; a ``tenacity`` decorator
would block that thread (or need the loop rebuilt around it) for a few lines of
arithmetic. Channel reconnects are grpc-core's own (``grpc.*_reconnect_backoff_ms``
options below) and the Redis store uses redis-py's ``Retry``: both libraries
already. No speed is at stake, so none was measured.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import grpc

from kvpeer.api.endpoint import parse_endpoint
from kvpeer.api.errors import ConfigError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.api.limits import MAX_KEY_BYTES, MAX_KEYS_PER_CALL
from kvpeer.api.security import Security
from kvpeer.client.location import Holder, Location
from kvpeer.client.replicas import (
    FAILOVER_CODES,
    DirectoryReplicas,
    status_code,
    status_details,
)
from kvpeer.client.score import load_message
from kvpeer.v1 import directory_pb2 as pb

log = logging.getLogger(__name__)

# Statuses after which the node must join again: the directory does not know this
# registration (NOT_FOUND) or it has been replaced (FAILED_PRECONDITION).
_REJOIN = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})
# Statuses that mean "could not ask" (after every replica was tried): worth a back-off.
_UNREACHABLE = FAILOVER_CODES
_CHANNEL_OPTIONS = [
    # Notice a directory that comes back within a second or two, not minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 16 << 20),
    # A name that resolves to several addresses: spread over them, skip dead ones.
    ("grpc.lb_policy_name", "round_robin"),
]
_RETRY_INITIAL_S = 0.1
_RETRY_MAX_S = 5.0


def _check_keys(keys: Iterable[bytes]) -> list[bytes]:
    """``keys`` as a list; ValueError (a caller's bug) for anything but 1..64 bytes."""
    out = list(keys)
    for key in out:
        if not isinstance(key, bytes) or not 1 <= len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"directory keys are 1 to {MAX_KEY_BYTES} bytes, got {key!r:.80}")
    return out


def _describe(exc: grpc.RpcError) -> str:
    code = status_code(exc)
    return f"{code.name if code else 'ERROR'}: {status_details(exc)}"


class DirectoryClient:
    """Keeps one node registered with the directory and asks it who holds keys.

    Threads: :meth:`publish`, :meth:`withdraw`, :meth:`locate`, :meth:`flush`,
    :meth:`stats` and the properties may be called from any thread. State shared
    with the background thread lives under ``self._cond``'s lock, held only for
    queue operations, never across an RPC.

    Args:
        endpoint: ``host:port`` of the directory, or several (a list or a
            comma-separated string): replicas on one Redis, any of which may serve
            any call (:mod:`kvpeer.client.replicas`: health, failover, spreading).
        node_id: this node's id, unique in the cluster.
        advertise: ``host:port`` peers dial to reach this node's KVPeer service.
        fingerprint: this node's compatibility fingerprint (its namespace).
        security: TLS / token for the directory connection.
        rpc_timeout_s: deadline of every RPC (and of a whole :meth:`locate`).
        publish_batch_keys: most keys per Publish/Withdraw call.
        publish_interval_s: how long queued keys wait for more to fill a batch.
        publish: False for a node that must not publish (e.g. a hash seed no
            other node can match); it neither joins nor publishes but still locates.
        locate_backoff_s: after a Locate could not reach the directory, further
            locates answer "nobody has it" at once for this long (unless the
            background thread reaches the directory first).
        load: the node's load figures, sent with each heartbeat for routers (see
            :func:`kvpeer.client.score.load_message`); None sends none.
        on_replica_failure: called with a replica's ``host:port`` whenever a call
            to it could not be answered (and was tried on the next one): metrics.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        node_id: str,
        advertise: str,
        fingerprint: Fingerprint,
        security: Security | None = None,
        rpc_timeout_s: float = 5.0,
        publish_batch_keys: int = 1024,
        publish_interval_s: float = 0.05,
        publish: bool = True,
        locate_backoff_s: float = 1.0,
        load: Callable[[], Mapping[str, int]] | None = None,
        on_replica_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._replicas = DirectoryReplicas(
            endpoint, security, _CHANNEL_OPTIONS, on_failure=on_replica_failure
        )
        self._target = ", ".join(self._replicas.targets)
        if not node_id or any(c.isspace() for c in node_id):
            raise ConfigError("node_id", f"expected a name without spaces, got {node_id!r}")
        if publish and parse_endpoint(advertise, key="advertise").is_wildcard:
            raise ConfigError("advertise", f"{advertise!r} is not an address peers can dial")
        if not 1 <= publish_batch_keys <= MAX_KEYS_PER_CALL:
            raise ConfigError(
                "publish_batch_keys", f"{publish_batch_keys} is not in 1..{MAX_KEYS_PER_CALL}"
            )
        if rpc_timeout_s <= 0:
            raise ConfigError("rpc_timeout_s", f"must be positive, got {rpc_timeout_s}")
        self.node_id = node_id
        self.advertise = advertise
        self.fingerprint = fingerprint
        self._publishes = publish
        self._rpc_timeout = rpc_timeout_s
        self._batch_keys = publish_batch_keys
        self._interval = publish_interval_s
        self._locate_backoff = locate_backoff_s
        self._load = load

        self._cond = threading.Condition()
        # Everything below is guarded by self._cond.
        self._held: dict[bytes, None] = {}  # published minus withdrawn (ordered)
        self._pending: dict[bytes, bool] = {}  # key -> True publish / False withdraw
        self._pending_since = 0.0
        self._inflight = False
        self._flush_waiters = 0
        self._epoch: int | None = None
        self._lease_s = 0.0
        self._heartbeat_at = 0.0
        self._retry_at = 0.0
        self._retry_delay = _RETRY_INITIAL_S
        self._connected = False
        self._last_error: str | None = None
        self._locate_blocked_until = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = dict.fromkeys(
            (
                "published",
                "withdrawn",
                "publish_calls",
                "withdraw_calls",
                "locate_calls",
                "locate_keys",
                "locate_found",
                "locate_skipped",
                "joins",
                "rejoins",
                "heartbeats",
                "errors",
            ),
            0,
        )

    # -- public API ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The last call to the directory succeeded (and, if publishing, the node is joined)."""
        with self._cond:
            return self._connected and (self._epoch is not None or not self._publishes)

    @property
    def epoch(self) -> int | None:
        """The node's current epoch; None while not joined."""
        with self._cond:
            return self._epoch

    @property
    def last_error(self) -> str | None:
        with self._cond:
            return self._last_error

    def start(self) -> None:
        """Start the background thread (join, heartbeat, send queued changes). Idempotent.

        A client with ``publish=False`` has nothing to keep up and starts no thread.
        """
        with self._cond:
            if self._thread is not None or self._stopping or not self._publishes:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"kvpeer-directory-{self.node_id}", daemon=True
            )
        self._thread.start()

    def publish(self, keys: Iterable[bytes]) -> None:
        """Queue ``keys`` for publishing; returns at once. Thread-safe.

        Raises ValueError for keys that are not 1..64 bytes. A no-op when the client
        was made with ``publish=False``.
        """
        if not self._publishes:
            return
        keys = _check_keys(keys)
        with self._cond:
            if not self._pending:
                self._pending_since = time.monotonic()
            for key in keys:
                self._held[key] = None
                self._pending[key] = True
            self._cond.notify_all()

    def withdraw(self, keys: Iterable[bytes]) -> None:
        """Queue ``keys`` for withdrawal (keys never published are ignored); returns at once."""
        if not self._publishes:
            return
        keys = _check_keys(keys)
        with self._cond:
            if not self._pending:
                self._pending_since = time.monotonic()
            for key in keys:
                if key in self._held:
                    del self._held[key]
                    self._pending[key] = False
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued publish/withdraw has been sent; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while not self._flushed():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def locate(self, keys: Sequence[bytes], *, timeout_s: float | None = None) -> Location:
        """Who holds each key (this node left out), in one or more Locate calls.

        Blocks for at most ``timeout_s`` (default: the RPC timeout) over all calls.
        When the directory cannot be asked, returns ``Location(ok=False)`` with
        every entry ``[]`` — never raises for that. Raises ValueError for keys that
        are not 1..64 bytes.
        """
        keys = _check_keys(keys)
        if not keys:
            return Location([], True)
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                return self._nobody(keys, "the directory client is closed")
            self._stats["locate_calls"] += 1
            self._stats["locate_keys"] += len(keys)
            blocked_for = self._locate_blocked_until - now
            if blocked_for > 0:
                self._stats["locate_skipped"] += 1
                return self._nobody(
                    keys, f"{self._last_error} (not asking again for {blocked_for:.1f} s)"
                )
        deadline = now + (timeout_s if timeout_s is not None else self._rpc_timeout)
        holders: list[list[Holder]] = []
        known: dict[tuple[str, int], Holder] = {}
        for start in range(0, len(keys), MAX_KEYS_PER_CALL):
            batch = keys[start : start + MAX_KEYS_PER_CALL]
            request = pb.LocateRequest(
                fingerprint=self.fingerprint.digest, keys=batch, exclude_node_id=self.node_id
            )
            try:
                response = self._replicas.call("Locate", request, deadline=deadline, sticky=False)
            except grpc.RpcError as exc:
                return self._locate_failed(keys, exc)
            except ValueError:  # close() closed the channel meanwhile
                return self._nobody(keys, "the directory client is closed")
            rows = self._holders(response, len(batch), known)
            if rows is None:
                return self._nobody(keys, f"directory at {self._target} sent a malformed answer")
            holders += rows
        found = sum(1 for row in holders if row)
        with self._cond:
            self._stats["locate_found"] += found
            self._reachable()
        return Location(holders, True)

    def stats(self) -> dict[str, int]:
        """Counters: keys published/withdrawn, calls, joins, rejoins, errors, queue sizes."""
        with self._cond:
            return {**self._stats, "queued": len(self._pending), "held": len(self._held)}

    def replica_health(self) -> dict[str, dict[str, object]]:
        """Per directory endpoint: ``up``, ``calls``, ``failures``, ``last_error``."""
        return self._replicas.health()

    def close(self) -> None:
        """Leave (best effort, short deadline), stop the thread, close the channel.

        Bounded: at most about one second plus the thread's exit. Idempotent.
        """
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            epoch = self._epoch
            self._cond.notify_all()
        if epoch is not None:
            try:
                self._replicas.call(
                    "Leave",
                    pb.LeaveRequest(node_id=self.node_id, epoch=epoch),
                    deadline=time.monotonic() + min(1.0, self._rpc_timeout),
                    sticky=True,
                )
            except grpc.RpcError as exc:
                log.debug("leave failed: %s", _describe(exc))
        self._replicas.close()  # also ends an RPC the thread may be waiting on
        if self._thread is not None:
            self._thread.join(timeout=self._rpc_timeout + 1.0)

    def __enter__(self) -> DirectoryClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locate helpers --------------------------------------------------------

    @staticmethod
    def _holders(
        response: pb.LocateResponse, count: int, known: dict[tuple[str, int], Holder]
    ) -> list[list[Holder]] | None:
        """Rows of Holders from a response; None if it does not match the request."""
        if len(response.holders) != count:
            return None
        nodes = []
        for ref in response.nodes:
            holder = known.get((ref.node_id, ref.epoch))
            if holder is None:
                holder = known[(ref.node_id, ref.epoch)] = Holder(
                    ref.node_id, ref.endpoint, ref.epoch
                )
            nodes.append(holder)
        try:
            return [[nodes[i] for i in kh.nodes] for kh in response.holders]
        except IndexError:
            return None

    def _nobody(self, keys: Sequence[bytes], error: str) -> Location:
        return Location([[] for _ in keys], False, error)

    def _locate_failed(self, keys: Sequence[bytes], exc: grpc.RpcError) -> Location:
        error = f"directory at {self._target}: {_describe(exc)}"
        with self._cond:
            self._stats["errors"] += 1
            self._last_error = error
            if status_code(exc) in _UNREACHABLE:
                self._connected = False
                self._locate_blocked_until = time.monotonic() + self._locate_backoff
        return self._nobody(keys, error)

    def _reachable(self) -> None:
        """Note a successful call (lock held): lift the locate back-off."""
        self._connected = True
        self._locate_blocked_until = 0.0
        self._retry_delay = _RETRY_INITIAL_S

    # -- background thread -----------------------------------------------------

    def _flushed(self) -> bool:
        return (
            not self._pending and not self._inflight and (self._epoch is not None or not self._held)
        )

    def _run(self) -> None:
        """Thread body: wait for work, do one RPC outside the lock, repeat until close()."""
        while True:
            with self._cond:
                work = self._next_work()
                if work is None:
                    return
            try:
                work()
            except ValueError:  # the channel was closed by close() mid-call
                if not self._stopping:
                    raise
                return

    def _next_work(self) -> Callable[[], None] | None:
        """Block (lock held, waiting on the condition) until there is work; None to stop."""
        while not self._stopping:
            now = time.monotonic()
            wake: float | None = None
            if now < self._retry_at:
                wake = self._retry_at
            elif self._epoch is None:
                return self._join
            elif now >= self._heartbeat_at:
                return self._heartbeat
            else:
                wake = self._heartbeat_at
                if self._pending:
                    due = self._pending_since + self._interval
                    if len(self._pending) >= self._batch_keys or self._flush_waiters or now >= due:
                        return self._send_batch
                    wake = min(wake, due)
            self._cond.wait(None if wake is None else max(0.0, wake - now))
        return None

    def _failed(self, what: str, exc: grpc.RpcError) -> None:
        """Record a failed background call (lock held): re-join, or retry after a back-off."""
        if status_code(exc) in _REJOIN and self._epoch is not None:
            log.info(
                "directory forgot node %s (%s: %s): joining again",
                self.node_id,
                what,
                exc.details(),
            )
            self._epoch = None
            return
        self._stats["errors"] += 1
        error = f"directory at {self._target}: {what}: {_describe(exc)}"
        if self._connected or error != self._last_error:
            log.warning("%s", error)
        self._last_error = error
        self._connected = False
        self._retry_at = time.monotonic() + self._retry_delay * random.uniform(0.8, 1.2)
        self._retry_delay = min(_RETRY_MAX_S, self._retry_delay * 2)

    def _call(self, method: str, request: object) -> object:
        """A background call: to the replica that answered last, the others if it cannot.

        Each replica gets a whole RPC timeout (nothing waits on this thread).
        Publish, Withdraw and Heartbeat are idempotent; a Join that reached a
        replica whose answer was lost only leaves an epoch the next Join fences.
        """
        deadline = time.monotonic() + self._rpc_timeout * len(self._replicas.replicas)
        return self._replicas.call(
            method, request, deadline=deadline, sticky=True, per_try_s=self._rpc_timeout
        )

    def _join(self) -> None:
        request = pb.JoinRequest(
            node_id=self.node_id, endpoint=self.advertise, fingerprint=self.fingerprint.to_proto()
        )
        try:
            response = self._call("Join", request)
        except grpc.RpcError as exc:
            with self._cond:
                self._failed("join", exc)
            return
        with self._cond:
            first = self._stats["joins"] == 0
            self._stats["joins"] += 1
            if not first:
                self._stats["rejoins"] += 1
            self._epoch = response.epoch
            self._lease_s = response.lease_ttl_ms / 1000
            self._heartbeat_at = time.monotonic() + self._lease_s / 3
            # A new epoch holds nothing yet: publish everything held, drop withdrawals.
            self._pending = dict.fromkeys(self._held, True)
            self._pending_since = 0.0
            self._reachable()
            self._cond.notify_all()
        log.info(
            "node %s joined directory %s: epoch %d, lease %.1f s, %d keys to publish",
            self.node_id,
            self._target,
            response.epoch,
            self._lease_s,
            len(self._held),
        )
        self._replicas.check_stores(response.store_id, self._rpc_timeout)  # a split replica?

    def _heartbeat(self) -> None:
        with self._cond:
            epoch = self._epoch
        try:
            response = self._call(
                "Heartbeat",
                pb.HeartbeatRequest(
                    node_id=self.node_id, epoch=epoch, load=load_message(self._load)
                ),
            )
        except grpc.RpcError as exc:
            with self._cond:
                self._failed("heartbeat", exc)
            return
        with self._cond:
            self._stats["heartbeats"] += 1
            self._lease_s = response.lease_ttl_ms / 1000
            self._heartbeat_at = time.monotonic() + self._lease_s / 3
            self._reachable()
        self._replicas.probe(self._rpc_timeout)  # replicas that failed: back yet?

    def _take_batch(self) -> tuple[bool, list[bytes]]:
        """Pop up to a batch of queued keys with the same operation (lock held)."""
        op = next(iter(self._pending.values()))
        keys = []
        for key, key_op in self._pending.items():
            if key_op == op:
                keys.append(key)
                if len(keys) == self._batch_keys:
                    break
        for key in keys:
            del self._pending[key]
        return op, keys

    def _send_batch(self) -> None:
        with self._cond:
            op, keys = self._take_batch()
            epoch = self._epoch
            self._inflight = True
        method, request_type = (
            ("Publish", pb.PublishRequest) if op else ("Withdraw", pb.WithdrawRequest)
        )
        try:
            self._call(method, request_type(node_id=self.node_id, epoch=epoch, keys=keys))
        except grpc.RpcError as exc:
            with self._cond:
                self._inflight = False
                if status_code(exc) in _REFUSED_BATCH:  # sending it again would be refused again
                    log.error("directory refused a batch of %d keys: %s", len(keys), _describe(exc))
                    self._stats["errors"] += 1
                else:
                    for key in keys:  # a newer operation on a key wins
                        self._pending.setdefault(key, op)
                    self._failed("publish" if op else "withdraw", exc)
                self._cond.notify_all()
            return
        with self._cond:
            self._inflight = False
            self._stats["published" if op else "withdrawn"] += len(keys)
            self._stats["publish_calls" if op else "withdraw_calls"] += 1
            self._reachable()
            self._cond.notify_all()


#: Statuses that refuse a publish/withdraw batch for what it is, not for the moment.
_REFUSED_BATCH = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
