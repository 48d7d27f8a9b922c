"""The directory's state in Redis, shared by every directory replica pointed at it.

Each :class:`RedisStore` method is one Lua script run with ``EVALSHA``: one round
trip, atomic in Redis, with Redis's clock (``TIME``) as the only clock, so
replicas on hosts with skewed clocks agree on leases.

**Redis Cluster** (``redis+cluster://host:port,host:port/``): the same scripts, with
every key under one hash tag (the prefix is ``{kvpeer}:``), so each script's keys
live in one slot and run atomically on the primary that owns it; the client follows
MOVED/ASK and failovers. That buys availability (a primary dies, its replica takes
over) but not write throughput: one namespace-agnostic slot means one primary does
all the work. With ``?wait=N`` each write is acknowledged only once N replicas have
it (``WAIT``), so an entry the store acknowledged survives the primary's death;
without it (the default) a write acknowledged just before a primary dies may be lost
with it (the node's publisher re-publishes when it next has to re-join).

Key schema (``P`` is the prefix, ``kvpeer:`` by default, ``{kvpeer}:`` on a cluster)::

    P epoch              string  epoch counter: seeded from TIME in microseconds the
                                 first time, then INCR. Epochs are unique across
                                 nodes and replicas, so an epoch names a registration
    P n:<node id>        string  the node's current epoch
    P r:<epoch>          hash    registration: node, endpoint, fp (digest),
                                 fpb (Fingerprint protobuf bytes), exp (lease end, ms),
                                 and once a heartbeat carried a load: lp, lr, ll
                                 (pinned rows, running requests, peer leases), lat (ms)
    P leases             zset    epoch -> lease end (ms); finds expired registrations
    P nk:<epoch>         set     keys the registration holds
    P k:<fp>             hash    <key> -> epochs of the registrations holding <key>
                                 in namespace <fp>, separated by spaces (usually one)
    P gc                 hash    epoch -> fp of ended registrations whose entries
                                 the sweeper still has to free

An entry counts only while ``r:<epoch>`` exists and its lease has not ended; a
re-join, a leave or an expiry deletes ``r:<epoch>``, which fences the old entries
at once, and :meth:`RedisStore.sweep` frees them later in bounded slices.

Why this shape: a 1,000-key Locate is one script doing one ``HMGET`` and, per
distinct value (a handful: most keys share their holders), one registration
lookup; publishing 1,000 keys is one ``HMGET``, one ``HSET`` and one ``SADD``. One
hash per namespace (rather than a Redis key per entry) lets both take the keys as
they arrive, without composing a key name for each. Keys travel packed into one
argument (parsing a thousand arguments costs more in redis-py than the lookup in
Redis), and the Locate answer is one string for the same reason. Keys are raw
bytes in hash fields and set members (binary-safe). Numbers that go back into Redis are
formatted with ``%.0f`` (exact below 2**53), never Lua's default formatting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from kvpeer.api.errors import ConfigError
from kvpeer.api.fingerprint import Fingerprint
from kvpeer.server.directory import redis_scripts as scripts
from kvpeer.server.directory.store import (
    MAX_KEYS_PER_NODE,
    DirectoryStore,
    Located,
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

#: URL scheme of a Redis Cluster store: ``redis+cluster://host:port[,host:port...]/``.
CLUSTER_SCHEME = "redis+cluster"
#: How long a write waits for ``?wait=N`` replicas before it is refused.
WAIT_TIMEOUT_MS = 1000


def _describe_url(url: str, key: str) -> tuple[str, str]:
    """``(host:port, url without credentials)`` for messages; ConfigError naming ``key``."""
    try:
        parts = urlsplit(url)
        address = f"{parts.hostname}:{parts.port or 6379}"
    except ValueError as exc:
        raise ConfigError(key, f"invalid Redis URL {url!r}: {exc}") from exc
    if not parts.hostname:
        raise ConfigError(key, f"invalid Redis URL {url!r}: expected redis://host:port/db")
    return address, f"{parts.scheme}://{address}{parts.path or '/0'}"


def _cluster_nodes(url: str, key: str) -> tuple[list[ClusterNode], dict[str, Any], int]:
    """Startup nodes, client options (credentials) and ``?wait=N`` of a cluster URL."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    options: dict[str, Any] = {}
    if credentials:
        user, _, password = credentials.partition(":")
        options = {"username": user or None, "password": password or None}
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                key,
                f"invalid Redis Cluster URL {url!r}: expected "
                f"{CLUSTER_SCHEME}://host:port[,host:port...]/ (got node {item!r})",
            )
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(key, f"invalid Redis Cluster URL {url!r}: a cluster has only db 0")
    query = parse_qs(parts.query)
    unknown = set(query) - {"wait"}
    if unknown:
        raise ConfigError(key, f"unknown option(s) {sorted(unknown)} in {url!r}: only wait=N")
    wait = query.get("wait", ["0"])[-1]
    if not wait.isdigit():
        raise ConfigError(key, f"wait={wait!r} in {url!r}: expected a number of replicas")
    return nodes, options, int(wait)


def _has_hash_tag(prefix: str) -> bool:
    start = prefix.find("{")
    return start >= 0 and prefix.find("}", start + 2) > start


class RedisStore(DirectoryStore):
    """Directory state in Redis (``redis://host:port/db``); see the module docstring.

    Thread-safe through redis-py's connection pool. Calls fail fast with
    :class:`StoreUnavailableError` ("redis at host:port unreachable: ...") while
    Redis is down and work again, without a restart, once it is back.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS), or
            ``redis+cluster://[user:password@]host:port,host:port/[?wait=N]``.
        prefix: prepended to every Redis key, so several directories (or tests)
            can share one Redis database; on a cluster it must hold a ``{hash tag}``
            (default ``{kvpeer}:``).
        timeout_s: socket timeout of each Redis call.
        sweep_batch: most entries one :meth:`sweep` frees (one script blocks Redis
            for its duration: a few milliseconds at the default).
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
        self._wait_replicas = 0
        timeouts = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": min(timeout_s, 1.0),
            "decode_responses": False,
        }
        if url.startswith(CLUSTER_SCHEME + "://"):
            nodes, credentials, self._wait_replicas = _cluster_nodes(url, key)
            self._address = ",".join(f"{n.host}:{n.port}" for n in nodes)
            self.name = f"{CLUSTER_SCHEME}://{self._address}/"
            prefix = "{kvpeer}:" if prefix is None else prefix
            if not _has_hash_tag(prefix):
                raise ConfigError(
                    key,
                    f"prefix {prefix!r} has no {{hash tag}}: on a cluster every key must "
                    "share one slot (e.g. '{kvpeer}:')",
                )
            try:
                self._redis: Any = RedisCluster(
                    startup_nodes=nodes,
                    retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 3),
                    **credentials,
                    **timeouts,
                )
            except redis.RedisError as exc:
                raise StoreUnavailableError(
                    f"redis cluster at {self._address} unreachable: {exc}"
                ) from exc
        else:
            self._address, self.name = _describe_url(url, key)
            try:
                self._redis = redis.Redis.from_url(
                    url, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1), **timeouts
                )
            except ValueError as exc:
                raise ConfigError(key, f"invalid Redis URL {url!r}: {exc}") from exc
        self._prefix = (prefix or "kvpeer:").encode()
        self._sweep_batch = sweep_batch
        register = self._redis.register_script
        self._join = register(scripts.PRELUDE + scripts.JOIN)
        self._heartbeat = register(scripts.PRELUDE + scripts.HEARTBEAT)
        self._publish = register(scripts.PRELUDE + scripts.PUBLISH)
        self._withdraw = register(scripts.PRELUDE + scripts.WITHDRAW)
        self._locate = register(scripts.PRELUDE + scripts.LOCATE)
        self._leave = register(scripts.PRELUDE + scripts.LEAVE)
        self._score = register(scripts.PRELUDE + scripts.SCORE)
        self._list = register(scripts.PRELUDE + scripts.LIST)
        self._sweep = register(scripts.PRELUDE + scripts.SWEEP)

    @staticmethod
    def _pack(keys: Sequence[bytes]) -> bytes:
        """Keys as one argument (see unpack_keys): far cheaper to send than one per key.

        The format holds up to 65,535 keys of up to 255 bytes; batches are smaller
        (see :func:`~kvpeer.server.directory.store.check_keys`).
        """
        return len(keys).to_bytes(2, "big") + bytes(map(len, keys)) + b"".join(keys)

    def _run(self, script: Any, *args: Any, write: bool = False) -> Any:
        """Run ``script``; a ``write`` waits for ``?wait=N`` replicas to have it."""
        try:
            # KEYS[1] names the slot (a cluster routes the script there); ARGV[1] is P.
            reply = script(keys=[self._prefix], args=(self._prefix, *args))
            if write and self._wait_replicas:
                self._replicated()
            return reply
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(f"redis at {self._address} unreachable: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"redis at {self._address} refused a call: {exc}") from exc

    def _replicated(self) -> None:
        """WAIT on the primary of the directory's slot; refuse if too few replicas have it."""
        node = self._redis.get_node_from_key(self._prefix)
        have = self._redis.execute_command(
            "WAIT", self._wait_replicas, WAIT_TIMEOUT_MS, target_nodes=node
        )
        if int(have) < self._wait_replicas:
            raise StoreUnavailableError(
                f"redis at {self._address}: the write reached {have} of {self._wait_replicas} "
                f"replicas within {WAIT_TIMEOUT_MS} ms (wait={self._wait_replicas})"
            )

    def _checked(self, node_id: str, epoch: int, script: Any, *args: Any) -> list[Any]:
        """Run a write script that starts with check(node, epoch); raise its refusal."""
        reply = self._run(script, node_id, str(epoch), *args, write=True)
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
        reply = self._run(
            self._join, node_id, endpoint, fingerprint.digest, fpb, self._ttl_ms(ttl_s), write=True
        )
        return int(reply[1])

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
        reply = self._run(self._locate, fingerprint, exclude_node_id, self._pack(keys))
        head, _, body = reply.partition(b"\n")
        flat = head.decode().split()
        nodes = [NodeRef(flat[i], flat[i + 2], int(flat[i + 1])) for i in range(0, len(flat), 3)]
        parsed: dict[bytes, tuple[int, ...]] = {b"": ()}
        rows = []
        for raw in body.split(b";"):
            row = parsed.get(raw)
            if row is None:
                row = parsed[raw] = tuple(map(int, raw.split(b",")))
            rows.append(row)
        return Located(nodes, rows)

    def score(self, fingerprint: str | None, keys: Sequence[bytes]) -> list[ScoredNode]:
        flat = self._run(self._score, fingerprint or "", self._pack(keys))
        scored = []
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
        flat = self._run(self._list, fingerprint or "")
        records = []
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
        return int(self._run(self._sweep, self._sweep_batch))

    def close(self) -> None:
        self._redis.close()
