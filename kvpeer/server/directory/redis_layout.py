"""Where a Redis-backed directory's keys live, and the checks a replica makes first.

**Shards.** :class:`~kvpeer.server.directory.redis_store.RedisStore` splits the
directory into *shards*. Each shard is a whole directory for the nodes whose id
hashes to it (:func:`shard_of`): their registrations, entries, leases and the
sweeper's queue, under the shard's own key prefix. A node's writes (join,
heartbeat, publish, withdraw, leave) touch its shard only, in one atomic script;
reads (locate, score, list) ask every shard and merge the answers. One *control*
prefix holds what is global: the epoch counter and the layout marker.

- One Redis: one shard, whose prefix is the control prefix (``kvpeer:``).
- Redis Cluster: shard ``i`` of ``S`` gets its own hash tag (``{kvpeer}:`` becomes
  ``{kvpeer/i.n}:``). The ``n`` is chosen so that the shard's slot lies in the i-th
  S-th of the slot space. ``redis-cli --cluster create`` splits the slots evenly, so
  with S = the number of primaries (the default when a directory is created) each
  primary owns one shard and takes the writes of a third of the nodes. After a
  reshard the layout stays correct; only the balance changes.

**The layout marker** (control key ``layout``: ``kvpeer-directory/1 shards=S id=X``)
is written by the first replica and read by every later one. Replicas of one
directory therefore agree about which shard holds a node, and report the same store
id ``X`` (random, fixed at creation) in their answers: a client that meets two ids
is talking to two directories (see :mod:`kvpeer.client.replicas`).

**Start checks**, each a :class:`~kvpeer.api.errors.ConfigError` naming the
``--store`` flag:

- a cluster that is not in state ``ok`` or leaves a slot uncovered;
- ``?shards=N`` that differs from the marker;
- on one Redis, a database with no directory while another database of the same
  server holds one under the same prefix. That is the usual cause of a silent split
  brain: one replica points at ``/1`` and the others at ``/0``.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.cluster import ClusterNode
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from kvpeer.api.errors import ConfigError

log = logging.getLogger(__name__)

#: URL scheme of a Redis Cluster store: ``redis+cluster://host:port[,host:port...]/``.
CLUSTER_SCHEME = "redis+cluster"
#: Version tag of the layout marker; a directory with another one is refused.
LAYOUT_VERSION = b"kvpeer-directory/1"
#: The most shards a directory may have: every read asks each of them.
MAX_SHARDS = 64


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``--store`` URL.

    ``address`` is ``host:port`` (comma-separated on a cluster) and ``name`` the URL
    without credentials, both for messages. ``shards`` is None unless the URL asks.
    """

    url: str
    cluster: bool
    address: str
    name: str
    nodes: list[ClusterNode] = field(default_factory=list)
    credentials: dict[str, Any] = field(default_factory=dict)
    wait_replicas: int = 0
    shards: int | None = None


def parse_store_url(url: str, key: str) -> RedisTarget:
    """The target a ``redis://``, ``rediss://`` or ``redis+cluster://`` URL names.

    Raises ConfigError naming ``key`` for a malformed URL or an unknown option.
    """
    if url.startswith(CLUSTER_SCHEME + "://"):
        return _parse_cluster_url(url, key)
    try:
        parts = urlsplit(url)
        address = f"{parts.hostname}:{parts.port or 6379}"
    except ValueError as exc:
        raise ConfigError(key, f"invalid Redis URL {url!r}: {exc}") from exc
    if not parts.hostname:
        raise ConfigError(key, f"invalid Redis URL {url!r}: expected redis://host:port/db")
    return RedisTarget(url, False, address, f"{parts.scheme}://{address}{parts.path or '/0'}")


def _parse_cluster_url(url: str, key: str) -> RedisTarget:
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
    unknown = set(query) - {"wait", "shards"}
    if unknown:
        raise ConfigError(
            key, f"unknown option(s) {sorted(unknown)} in {url!r}: only wait=N and shards=N"
        )
    wait = _number(query, "wait", url, key, "a number of replicas")
    shards = _number(query, "shards", url, key, f"a number of shards, 1 to {MAX_SHARDS}")
    if shards is not None and not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(key, f"shards={shards} in {url!r}: expected 1 to {MAX_SHARDS}")
    address = ",".join(f"{n.host}:{n.port}" for n in nodes)
    return RedisTarget(
        url,
        True,
        address,
        f"{CLUSTER_SCHEME}://{address}/",
        nodes,
        options,
        wait or 0,
        shards,
    )


def _number(query: dict[str, list[str]], name: str, url: str, key: str, what: str) -> int | None:
    if name not in query:
        return None
    value = query[name][-1]
    if not value.isdigit():
        raise ConfigError(key, f"{name}={value!r} in {url!r}: expected {what}")
    return int(value)


def has_hash_tag(prefix: str) -> bool:
    """Whether ``prefix`` holds a non-empty ``{hash tag}``, as Redis Cluster reads one."""
    start = prefix.find("{")
    return start >= 0 and prefix.find("}", start + 2) > start


def shard_prefixes(control: bytes, shards: int, *, cluster: bool) -> list[bytes]:
    """Each shard's key prefix. One shard shares the control prefix; on a cluster each
    shard's hash tag is chosen so its slot lies in the shard's S-th of the slot space.
    """
    if shards == 1:
        return [control]
    if not cluster:
        raise ValueError("a single Redis directory has one shard")
    start = control.index(b"{") + 1
    end = control.index(b"}", start)
    tag = control[start:end]
    span = REDIS_CLUSTER_HASH_SLOTS / shards
    prefixes = []
    for i in range(shards):
        n = 0
        while key_slot(b"%s/%d.%d" % (tag, i, n)) // span != i:
            n += 1
        prefixes.append(b"%s%s/%d.%d%s" % (control[:start], tag, i, n, control[end:]))
    return prefixes


def shard_of(node_id: str, shards: int) -> int:
    """The shard that holds ``node_id``: the same in every replica and every release."""
    return zlib.crc32(node_id.encode()) % shards


def check_cluster(client: Any, target: RedisTarget, key: str) -> None:
    """Refuse a cluster that leaves a slot uncovered or is not in state ok."""
    info = client.cluster_info()
    assigned = int(info.get("cluster_slots_assigned", 0))
    state = info.get("cluster_state", "?")
    if state != "ok" or assigned < REDIS_CLUSTER_HASH_SLOTS:
        raise ConfigError(
            key,
            f"redis cluster at {target.address} covers {assigned} of "
            f"{REDIS_CLUSTER_HASH_SLOTS} hash slots (cluster_state:{state}): assign every "
            "slot (redis-cli --cluster fix HOST:PORT) before starting the directory",
        )


@dataclass(frozen=True)
class Layout:
    """What the layout marker says: the shard count and the store's id."""

    shards: int
    store_id: str


def open_layout(
    client: Any,
    control: bytes,
    target: RedisTarget,
    default_shards: int,
    key: str,
    *,
    store_id: str | None = None,
) -> Layout:
    """The directory's layout: the marker's, written first if there is none.

    ``store_id`` is the id to write (a replica re-writing the marker of a store that
    lost its data); a new random one by default. Raises ConfigError when the marker
    is not a kvpeer directory's, or when the URL's ``?shards=N`` differs from it.
    """
    marker = control + b"layout"
    fresh = b"%s shards=%d id=%s" % (
        LAYOUT_VERSION,
        target.shards or default_shards,
        (store_id or uuid.uuid4().hex).encode(),
    )
    client.set(marker, fresh, nx=True)
    stored = client.get(marker) or b""
    version, *fields = stored.split(b" ")
    values = dict(f.partition(b"=")[::2] for f in fields)
    shards, store_id = values.get(b"shards", b""), values.get(b"id", b"")
    if version != LAYOUT_VERSION or not shards.isdigit() or not store_id:
        raise ConfigError(
            key,
            f"{target.name} holds {marker.decode(errors='replace')!r} = {stored!r}, not a "
            f"{LAYOUT_VERSION.decode()} layout: point the directory at its own database "
            "or key prefix",
        )
    if target.shards is not None and int(shards) != target.shards:
        raise ConfigError(
            key,
            f"the directory in {target.name} has shards={int(shards)}, this replica asks for "
            f"shards={target.shards}: every replica of a directory uses the same layout "
            "(leave shards= out to use the stored one)",
        )
    return Layout(int(shards), store_id.decode())


def check_database(client: redis.Redis, control: bytes, target: RedisTarget, key: str) -> None:
    """Refuse an empty database when another database on the server holds the directory.

    Run before the marker is written: only a replica that would create a new
    directory looks at the other databases (``INFO keyspace``, then one EXISTS each).
    """
    marker = control + b"layout"
    if client.exists(marker):
        return
    mine = client.connection_pool.connection_kwargs.get("db", 0)
    try:
        keyspace = client.info("keyspace")
    except redis.ResponseError as exc:  # an ACL user without INFO: skip the check
        log.info("%s: not looking for the directory in other databases: %s", target.name, exc)
        return
    for name in keyspace:
        if not name.startswith("db") or int(name[2:]) == mine:
            continue
        other = redis.Redis(connection_pool=_pool_for_db(client, int(name[2:])))
        try:
            held = other.exists(marker)
        except redis.ResponseError:  # not allowed into that database: not ours to judge
            held = False
        finally:
            other.close()
        if held:
            raise ConfigError(
                key,
                f"{target.name} holds no kvpeer directory, but database {name[2:]} of the "
                f"same server holds one under the prefix {control.decode(errors='replace')!r}: "
                "point every replica at the same database. To start a separate directory "
                f"in database {mine} on purpose, write its layout marker first: redis-cli "
                f"-n {mine} SET {marker.decode(errors='replace')} "
                f"'{LAYOUT_VERSION.decode()} shards=1 id={uuid.uuid4().hex}'",
            )


def _pool_for_db(client: redis.Redis, db: int) -> redis.ConnectionPool:
    pool = client.connection_pool
    return pool.__class__(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, "db": db}
    )
