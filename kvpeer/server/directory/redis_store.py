"""The directory's state in Redis, shared by every directory replica pointed at it.

Each :class:`RedisStore` call is Lua scripts run with ``EVALSHA``: a write is one
script (a join two: the epoch, then the registration), atomic in Redis, and a read
one script per shard, pipelined. Redis's clock (``TIME``) is the only clock, so
replicas on hosts with skewed clocks agree on leases.

**Shards** (:mod:`.redis_layout`): each node lives in one shard, a whole directory
under its own prefix, so a node's writes are one script in one slot and reads ask
every shard. One Redis is one shard. On a **Redis Cluster**
(``redis+cluster://host:port,host:port/``) there is a shard per primary by default,
each under its own hash tag, so writes spread over the primaries; the client follows
MOVED/ASK and failovers. With ``?wait=N`` each write is acknowledged only once N
replicas have it (``WAIT``), so an entry the store acknowledged survives its
primary's death; without it (the default) a write acknowledged just before a primary
dies may be lost with it (the node's publisher re-publishes when it next has to
re-join).

Key schema. ``C`` is the control prefix (``kvpeer:`` by default, ``{kvpeer}:`` on a
cluster); ``P`` is a shard's prefix (``C`` itself when there is one shard)::

    C epoch              string  epoch counter: seeded from TIME in microseconds the
                                 first time, then INCR. Epochs are unique across
                                 nodes, shards and replicas, so an epoch names a
                                 registration
    C layout             string  "kvpeer-directory/1 shards=S", see redis_layout
    P n:<node id>        string  the node's current epoch
    P r:<epoch>          hash    registration: node, endpoint, fp (digest),
                                 fpb (Fingerprint protobuf bytes), exp (lease end, ms),
                                 and once a heartbeat carried a load: lp, lr, ll
                                 (pinned rows, running requests, peer leases), lat (ms)
    P leases             zset    epoch -> lease end (ms); finds expired registrations
    P nk:<epoch>         set     keys the registration holds
    P k:<fp>             hash    <key> -> epochs of the shard's registrations holding
                                 <key> in namespace <fp>, separated by spaces
    P gc                 hash    epoch -> fp of ended registrations whose entries
                                 the sweeper still has to free

An entry counts only while ``r:<epoch>`` exists and its lease has not ended; a
re-join, a leave or an expiry deletes ``r:<epoch>``, which fences the old entries
at once, and :meth:`RedisStore.sweep` frees them later in bounded slices.

Why this shape: a 1,000-key Locate is one script per shard doing one ``HMGET``
and, per distinct value (a handful: most keys share their holders), one
registration lookup; publishing 1,000 keys is one ``HMGET``, one ``HSET`` and one ``SADD``. One
hash per namespace (rather than a Redis key per entry) lets both take the keys as
they arrive, without composing a key name for each. Keys travel packed into one
argument (parsing a thousand arguments costs more in redis-py than the lookup in
Redis), and the Locate answer is one string for the same reason. Keys are raw
bytes in hash fields and set members (binary-safe). Numbers that go back into Redis are
formatted with ``%.0f`` (exact below 2**53), never Lua's default formatting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from kvpeer.api.errors import ConfigError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.server.directory import redis_layout as layout
from kvpeer.server.directory import redis_scripts as scripts
from kvpeer.server.directory.store import (
    MAX_KEYS_PER_NODE,
    DirectoryStore,
    Located,
    MisconfiguredStoreError,
    NamespaceStats,
    NodeLoad,
    NodeRecord,
    NodeRef,
    ScoredNode,
    StaleEpochError,
    StoreUnavailableError,
    TooManyKeysError,
    UnknownNodeError,
    sort_scores,
)
from kvpeer.v1 import fingerprint_pb2

log = logging.getLogger(__name__)

#: How long a write waits for ``?wait=N`` replicas before it is refused.
WAIT_TIMEOUT_MS = 1000
#: How often a join takes a fresh epoch when concurrent joins of its node overtake it.
JOIN_ATTEMPTS = 5


class RedisStore(DirectoryStore):
    """Directory state in Redis (``redis://host:port/db``); see the module docstring.

    Thread-safe through redis-py's connection pool. Calls fail fast with
    :class:`StoreUnavailableError` ("redis at host:port unreachable: ...") while
    Redis is down and work again, without a restart, once it is back.

    The start checks of :mod:`.redis_layout` run here; on one Redis that is down at
    start they run at the first call that reaches it (and refuse every call with
    :class:`MisconfiguredStoreError` if they fail then).

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS), or
            ``redis+cluster://[user:password@]host:port,host:port/[?wait=N][&shards=N]``.
        prefix: the control prefix, prepended to every Redis key, so several
            directories (or tests) can share one Redis database; on a cluster it must
            hold a ``{hash tag}`` (default ``{kvpeer}:``).
        timeout_s: socket timeout of each Redis call.
        sweep_batch: most entries one :meth:`sweep` frees per shard (one script blocks
            Redis for its duration: a few milliseconds at the default).

    Raises:
        ConfigError: naming ``key``, for a malformed URL or a failed start check.
        StoreUnavailableError: a cluster none of whose nodes answers.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        timeout_s: float = 2.0,
        sweep_batch: int = 2000,
        max_keys_per_node: int = MAX_KEYS_PER_NODE,
        key: str = "store",
    ) -> None:
        self._max_keys_per_node = max_keys_per_node
        self._target = target = layout.parse_store_url(url, key)
        self._address, self.name = target.address, target.name
        self._key = key
        timeouts = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": min(timeout_s, 1.0),
            "decode_responses": False,
        }
        if target.cluster:
            prefix = "{kvpeer}:" if prefix is None else prefix
            if not layout.has_hash_tag(prefix):
                raise ConfigError(
                    key,
                    f"prefix {prefix!r} has no {{hash tag}}: on a cluster each shard's keys "
                    "must share one slot (e.g. '{kvpeer}:')",
                )
            try:
                self._redis: Any = RedisCluster(
                    startup_nodes=target.nodes,
                    retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 3),
                    # Coverage is checked below, with a message that says what to do.
                    require_full_coverage=False,
                    **target.credentials,
                    **timeouts,
                )
            except (redis.RedisError, RedisClusterException) as exc:
                raise StoreUnavailableError(
                    f"redis cluster at {self._address} unreachable: {exc}"
                ) from exc
        else:
            try:
                self._redis = redis.Redis.from_url(
                    url, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1), **timeouts
                )
            except ValueError as exc:
                raise ConfigError(key, f"invalid Redis URL {url!r}: {exc}") from exc
        self._control = (prefix or "kvpeer:").encode()
        self._shards = [self._control]
        self._sweep_batch = sweep_batch
        register = self._redis.register_script
        self._epoch = register(scripts.PRELUDE + scripts.EPOCH)
        self._join = register(scripts.PRELUDE + scripts.JOIN)
        self._heartbeat = register(scripts.PRELUDE + scripts.HEARTBEAT)
        self._publish = register(scripts.PRELUDE + scripts.PUBLISH)
        self._withdraw = register(scripts.PRELUDE + scripts.WITHDRAW)
        self._locate = register(scripts.PRELUDE + scripts.LOCATE)
        self._leave = register(scripts.PRELUDE + scripts.LEAVE)
        self._score = register(scripts.PRELUDE + scripts.SCORE)
        self._list = register(scripts.PRELUDE + scripts.LIST)
        self._sweep = register(scripts.PRELUDE + scripts.SWEEP)
        self._checked_layout = False
        try:
            self._open_layout()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if target.cluster:
                raise StoreUnavailableError(
                    f"redis cluster at {self._address} unreachable: {exc}"
                ) from exc
            log.warning(
                "redis at %s unreachable (%s): checking its layout later", self._address, exc
            )
        except (redis.RedisError, RedisClusterException) as exc:
            raise MisconfiguredStoreError(
                f"{self.name} refused the directory's start checks: {_refusal(exc)}"
            ) from exc

    def _open_layout(self) -> None:
        """Run the start checks and learn the shards (see :mod:`.redis_layout`)."""
        target = self._target
        if target.cluster:
            layout.check_cluster(self._redis, target, self._key)
            primaries = len(self._redis.get_primaries())
            opened = layout.open_layout(
                self._redis, self._control, target, min(primaries, layout.MAX_SHARDS), self._key
            )
            self._shards = layout.shard_prefixes(self._control, opened.shards, cluster=True)
        else:
            layout.check_database(self._redis, self._control, target, self._key)
            opened = layout.open_layout(self._redis, self._control, target, 1, self._key)
        self.store_id = opened.store_id
        self._checked_layout = True

    @property
    def shards(self) -> int:
        """How many shards the directory has (1 on one Redis)."""
        return len(self._shards)

    @staticmethod
    def _pack(keys: Sequence[bytes]) -> bytes:
        """Keys as one argument (see unpack_keys): far cheaper to send than one per key.

        The format holds up to 65,535 keys of up to 255 bytes; batches are smaller
        (see :func:`~kvpeer.server.directory.store.check_keys`).
        """
        return len(keys).to_bytes(2, "big") + bytes(map(len, keys)) + b"".join(keys)

    def _ready(self) -> None:
        """Run the start checks that a down Redis postponed; refuse calls if they fail."""
        if self._checked_layout:
            return
        try:
            self._open_layout()
        except ConfigError as exc:
            log.error("%s", exc)
            raise MisconfiguredStoreError(str(exc)) from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return StoreUnavailableError(f"redis at {self._address} unreachable: {exc}")
        return StoreUnavailableError(f"redis at {self._address} refused a call: {_refusal(exc)}")

    def _run(self, script: Any, prefix: bytes, *args: Any, write: bool = False) -> Any:
        """Run ``script`` on one prefix; a ``write`` waits for ``?wait=N`` replicas."""
        try:
            self._ready()
            # KEYS[1] names the slot (a cluster routes the script there); ARGV[1] is P.
            reply = script(keys=[prefix], args=(prefix, *args))
            if write and self._target.wait_replicas:
                self._replicated(prefix)
            return reply
        except (redis.RedisError, RedisClusterException) as exc:
            # RedisClusterException: a slot no primary serves any more, for one.
            raise self._unavailable(exc) from exc

    def _each_shard(self, script: Any, *args: Any) -> list[Any]:
        """Run a read script on every shard, in one pipeline: the replies in shard order."""
        if len(self._shards) == 1:
            return [self._run(script, self._shards[0], *args)]
        try:
            pipe = self._redis.pipeline(transaction=False)
            for prefix in self._shards:
                script(keys=[prefix], args=(prefix, *args), client=pipe)
            replies = pipe.execute(raise_on_error=False)
        except (redis.RedisError, RedisClusterException) as exc:
            raise self._unavailable(exc) from exc
        for i, reply in enumerate(replies):
            if isinstance(reply, redis.exceptions.NoScriptError):
                # A cluster pipeline does not load scripts: a plain call does (a new
                # primary after a failover, a restarted node).
                replies[i] = self._run(script, self._shards[i], *args)
            elif isinstance(reply, redis.RedisError | RedisClusterException):
                raise self._unavailable(reply)
        return replies

    def _replicated(self, prefix: bytes) -> None:
        """WAIT on the primary of ``prefix``'s slot; refuse if too few replicas have it."""
        wanted = self._target.wait_replicas
        node = self._redis.get_node_from_key(prefix)
        have = self._redis.execute_command("WAIT", wanted, WAIT_TIMEOUT_MS, target_nodes=node)
        if int(have) < wanted:
            raise StoreUnavailableError(
                f"redis at {self._address}: the write reached {have} of {wanted} "
                f"replicas within {WAIT_TIMEOUT_MS} ms (wait={wanted})"
            )

    def _shard(self, node_id: str) -> bytes:
        return self._shards[layout.shard_of(node_id, len(self._shards))]

    def _checked(self, node_id: str, epoch: int, script: Any, *args: Any) -> list[Any]:
        """Run a write script that starts with check(node, epoch); raise its refusal."""
        reply = self._run(script, self._shard(node_id), node_id, str(epoch), *args, write=True)
        status = reply[0]
        if status == b"ok":
            return reply
        if status == b"stale":
            raise StaleEpochError(node_id, epoch, int(reply[1]))
        if status == b"too_many":
            raise TooManyKeysError(node_id, int(reply[1]), int(reply[2]), self._max_keys_per_node)
        raise UnknownNodeError(node_id)

    @staticmethod
    def _ttl_ms(ttl_s: float) -> int:
        return max(1, round(ttl_s * 1000))

    # -- DirectoryStore --------------------------------------------------------

    def join(self, node_id: str, endpoint: str, fingerprint: Fingerprint, ttl_s: float) -> int:
        fpb = fingerprint.to_proto().SerializeToString(deterministic=True)
        shard = self._shard(node_id)
        for _ in range(JOIN_ATTEMPTS):
            epoch = self._run(self._epoch, self._control, write=True)
            reply = self._run(
                self._join,
                shard,
                node_id,
                endpoint,
                fingerprint.digest,
                fpb,
                self._ttl_ms(ttl_s),
                epoch,
                write=True,
            )
            if reply[0] == b"ok":
                return int(epoch)
        raise StoreUnavailableError(
            f"redis at {self._address}: {JOIN_ATTEMPTS} joins of node {node_id} in a row were "
            "overtaken by other joins of the same node id: is it running twice?"
        )

    def heartbeat(
        self, node_id: str, epoch: int, ttl_s: float, load: NodeLoad | None = None
    ) -> None:
        figures = (
            () if load is None else (load.pinned_rows, load.running_requests, load.peer_leases)
        )
        self._checked(node_id, epoch, self._heartbeat, self._ttl_ms(ttl_s), *figures)

    def publish(self, node_id: str, epoch: int, keys: Sequence[bytes]) -> int:
        reply = self._checked(
            node_id, epoch, self._publish, self._pack(keys), self._max_keys_per_node
        )
        return int(reply[1])

    def withdraw(self, node_id: str, epoch: int, keys: Sequence[bytes]) -> int:
        return int(self._checked(node_id, epoch, self._withdraw, self._pack(keys))[1])

    def locate(self, fingerprint: str, keys: Sequence[bytes], exclude_node_id: str) -> Located:
        nodes: list[NodeRef] = []
        rows: list[tuple[int, ...]] = [()] * len(keys)
        for reply in self._each_shard(self._locate, fingerprint, exclude_node_id, self._pack(keys)):
            head, _, body = reply.partition(b"\n")
            flat = head.decode().split()
            if not flat:
                continue  # no holder in this shard
            base = len(nodes)
            nodes.extend(
                NodeRef(flat[i], flat[i + 2], int(flat[i + 1])) for i in range(0, len(flat), 3)
            )
            parsed: dict[bytes, tuple[int, ...]] = {b"": ()}
            for i, raw in enumerate(body.split(b";")):
                row = parsed.get(raw)
                if row is None:
                    row = parsed[raw] = tuple(base + int(x) for x in raw.split(b","))
                if row:
                    rows[i] = rows[i] + row if rows[i] else row
        return Located(nodes, rows)

    def score(self, fingerprint: str | None, keys: Sequence[bytes]) -> list[ScoredNode]:
        scored = []
        for flat in self._each_shard(self._score, fingerprint or "", self._pack(keys)):
            for i in range(0, len(flat), 9):
                node, epoch, endpoint, fp, prefix, pinned, running, leases, age = flat[i : i + 9]
                load = None if age == b"" else NodeLoad(int(pinned), int(running), int(leases))
                scored.append(
                    ScoredNode(
                        node.decode(),
                        endpoint.decode(),
                        int(epoch),
                        fp.decode(),
                        int(prefix),
                        load,
                        0.0 if load is None else int(age) / 1000,
                    )
                )
        return sort_scores(scored)

    def leave(self, node_id: str, epoch: int) -> None:
        self._checked(node_id, epoch, self._leave)

    def list_nodes(self, fingerprint: str | None = None) -> list[NodeRecord]:
        records = []
        for flat in self._each_shard(self._list, fingerprint or ""):
            for i in range(0, len(flat), 7):
                node, epoch, endpoint, _fp, fpb, remaining_ms, keys = flat[i : i + 7]
                records.append(
                    NodeRecord(
                        node.decode(),
                        endpoint.decode(),
                        int(epoch),
                        Fingerprint.from_proto(fingerprint_pb2.Fingerprint.FromString(fpb)),
                        int(keys),
                        int(remaining_ms) / 1000,
                    )
                )
        return sorted(records, key=lambda r: r.node_id)

    def stats(self) -> list[NamespaceStats]:
        per_namespace: dict[str, tuple[int, int]] = {}
        for record in self.list_nodes():
            nodes, keys = per_namespace.get(record.fingerprint.digest, (0, 0))
            per_namespace[record.fingerprint.digest] = (nodes + 1, keys + record.keys)
        return [NamespaceStats(fp, n, k) for fp, (n, k) in sorted(per_namespace.items())]

    def sweep(self) -> int:
        self._recheck_layout()
        return sum(int(freed) for freed in self._each_shard(self._sweep, self._sweep_batch))

    def _recheck_layout(self) -> None:
        """Sweeper thread: re-write the marker if Redis lost it; adopt a re-created one.

        A Redis restarted without persistence comes back empty: the replicas still
        running write their marker back (the same id, so they go on agreeing), and a
        replica that re-created it first is followed, so every replica reports one id.
        """
        if not self._checked_layout:
            return
        try:
            opened = layout.open_layout(
                self._redis,
                self._control,
                replace(self._target, shards=len(self._shards)),
                len(self._shards),
                self._key,
                store_id=self.store_id,
            )
        except ConfigError as exc:
            raise MisconfiguredStoreError(str(exc)) from exc
        except (redis.RedisError, RedisClusterException) as exc:
            raise self._unavailable(exc) from exc
        if opened.store_id != self.store_id:
            log.warning(
                "the directory in %s was re-created (store id %s, was %s): following it",
                self.name,
                opened.store_id,
                self.store_id,
            )
            self.store_id = opened.store_id

    def close(self) -> None:
        self._redis.close()


def _refusal(exc: Exception) -> str:
    """What Redis said, with the fix where a common mistake shows in it."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, redis.exceptions.AskError):  # MOVED too
        return (
            f"redirected to {text}: it is a Redis Cluster node; give the cluster as "
            "--store redis+cluster://host:port,host:port/"
        )
    if isinstance(exc, SlotNotCoveredError):
        return f"{text}; a primary is gone with no replica to take over: redis-cli --cluster fix"
    return text
