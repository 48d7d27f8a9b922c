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

# Shared by every script: the clock, the argument format, registration checks.
_PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.0f', x) end
-- Keys travel as one argument: a 2-byte count, one length byte per key, the keys.
local function unpack_keys(blob)
  local count = string.byte(blob, 1) * 256 + string.byte(blob, 2)
  local keys, pos = {}, count + 3
  for i = 1, count do
    local n = string.byte(blob, i + 2)
    keys[i] = string.sub(blob, pos, pos + n - 1)
    pos = pos + n
  end
  return keys
end
-- nil and the namespace when (node, epoch) is current; else a refusal to return.
local function check(node, epoch)
  local cur = redis.call('GET', P .. 'n:' .. node)
  if not cur then return {'unknown'} end
  local r = redis.call('HMGET', P .. 'r:' .. cur, 'exp', 'fp')
  if not r[1] or tonumber(r[1]) <= now then return {'unknown'} end
  if cur ~= epoch then return {'stale', cur} end
  return nil, r[2]
end
-- End a registration: fenced at once, entries queued for the sweeper.
local function retire(epoch)
  local r = redis.call('HMGET', P .. 'r:' .. epoch, 'node', 'fp')
  if r[1] and redis.call('GET', P .. 'n:' .. r[1]) == epoch then
    redis.call('DEL', P .. 'n:' .. r[1])
  end
  if r[2] then redis.call('HSET', P .. 'gc', epoch, r[2]) end
  redis.call('DEL', P .. 'r:' .. epoch)
  redis.call('ZREM', P .. 'leases', epoch)
end
-- Remove <epoch> from the entry of <key> in the namespace hash <h>.
local function drop(h, key, epoch)
  local v = redis.call('HGET', h, key)
  if not v then return end
  if v == epoch then redis.call('HDEL', h, key) return end
  local left = {}
  for e in string.gmatch(v, '%d+') do
    if e ~= epoch then left[#left + 1] = e end
  end
  if #left == 0 then
    redis.call('HDEL', h, key)
  else
    redis.call('HSET', h, key, table.concat(left, ' '))
  end
end
"""

# ARGV: prefix, node, endpoint, fp, fpb, ttl_ms -> {'ok', epoch}
_JOIN = """
local node, endpoint, fp, fpb, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
if redis.call('INCR', P .. 'epoch') == 1 then
  redis.call('SET', P .. 'epoch', t[1] .. string.format('%06d', tonumber(t[2])))
end
local epoch = redis.call('GET', P .. 'epoch')
local old = redis.call('GET', P .. 'n:' .. node)
if old then retire(old) end
local exp = fmt(now + ttl)
redis.call('SET', P .. 'n:' .. node, epoch)
redis.call('HSET', P .. 'r:' .. epoch, 'node', node, 'endpoint', endpoint, 'fp', fp,
           'fpb', fpb, 'exp', exp)
redis.call('ZADD', P .. 'leases', exp, epoch)
return {'ok', epoch}
"""

# ARGV: prefix, node, epoch, ttl_ms[, pinned rows, running requests, peer leases]
_HEARTBEAT = """
local node, epoch = ARGV[2], ARGV[3]
local bad = check(node, epoch)
if bad then return bad end
local exp = fmt(now + tonumber(ARGV[4]))
redis.call('HSET', P .. 'r:' .. epoch, 'exp', exp)
if ARGV[5] then
  redis.call('HSET', P .. 'r:' .. epoch, 'lp', ARGV[5], 'lr', ARGV[6], 'll', ARGV[7], 'lat', fmt(now))
end
redis.call('ZADD', P .. 'leases', exp, epoch)
return {'ok'}
"""

# ARGV: prefix, node, epoch, packed keys, cap -> {'ok', number of keys}, or {'too_many', held, adding}
# Per slice of 1,000 keys: one HMGET for the current entries, one HSET for those that
# change (usually all: new keys), one SADD.
_PUBLISH = """
local node, epoch = ARGV[2], ARGV[3]
local bad, fp = check(node, epoch)
if bad then return bad end
local h = P .. 'k:' .. fp
local keys = unpack_keys(ARGV[4])
local cap = tonumber(ARGV[5])
local held = redis.call('SCARD', P .. 'nk:' .. epoch)
if held + #keys > cap then
  local adding = 0
  for i = 1, #keys, 1000 do
    local known = redis.call('SMISMEMBER', P .. 'nk:' .. epoch, unpack(keys, i, math.min(i + 999, #keys)))
    for _, k in ipairs(known) do if k == 0 then adding = adding + 1 end end
  end
  if held + adding > cap then return {'too_many', held, adding} end
end
for i = 1, #keys, 1000 do
  local last = math.min(i + 999, #keys)
  local values = redis.call('HMGET', h, unpack(keys, i, last))
  local changes, n = {}, 0
  for j = 1, last - i + 1 do
    local v, new = values[j], nil
    if not v then
      new = epoch
    elseif not string.find(' ' .. v .. ' ', ' ' .. epoch .. ' ', 1, true) then
      new = v .. ' ' .. epoch
    end
    if new then
      changes[n + 1] = keys[i + j - 1]
      changes[n + 2] = new
      n = n + 2
    end
  end
  if n > 0 then redis.call('HSET', h, unpack(changes, 1, n)) end
  redis.call('SADD', P .. 'nk:' .. epoch, unpack(keys, i, last))
end
return {'ok', #keys}
"""

# ARGV: prefix, node, epoch, packed keys -> {'ok', number of keys the registration held}
_WITHDRAW = """
local node, epoch = ARGV[2], ARGV[3]
local bad, fp = check(node, epoch)
if bad then return bad end
local h = P .. 'k:' .. fp
local nk = P .. 'nk:' .. epoch
local removed = 0
for _, key in ipairs(unpack_keys(ARGV[4])) do
  if redis.call('SREM', nk, key) == 1 then
    removed = removed + 1
    drop(h, key, epoch)
  end
end
return {'ok', removed}
"""

# ARGV: prefix, fp, exclude, packed keys -> one string: "node epoch endpoint ...\\n" then one
# row per key, separated by ';', a row being the comma-separated 0-based indices of the
# key's holders in the node list. Node ids and endpoints contain no whitespace.
_LOCATE = """
local fp, exclude = ARGV[2], ARGV[3]
local h = P .. 'k:' .. fp
local keys = unpack_keys(ARGV[4])
local slots, row_of, nodes, rows = {}, {}, {}, {}
local function slot(e)
  local s = slots[e]
  if s == nil then
    s = false
    local r = redis.call('HMGET', P .. 'r:' .. e, 'node', 'endpoint', 'exp', 'fp')
    if r[1] and r[1] ~= exclude and tonumber(r[3]) > now and r[4] == fp then
      nodes[#nodes + 1] = r[1]
      nodes[#nodes + 1] = e
      nodes[#nodes + 1] = r[2]
      s = fmt(#nodes / 3 - 1)
    end
    slots[e] = s
  end
  return s
end
for i = 1, #keys, 1000 do
  local values = redis.call('HMGET', h, unpack(keys, i, math.min(i + 999, #keys)))
  for j = 1, #values do
    local v = values[j]
    local row = ''
    if v then
      row = row_of[v]
      if row == nil then
        local parts = {}
        for e in string.gmatch(v, '%d+') do
          local s = slot(e)
          if s then parts[#parts + 1] = s end
        end
        row = table.concat(parts, ',')
        row_of[v] = row
      end
    end
    rows[i + j - 1] = row
  end
end
return table.concat(nodes, ' ') .. '\\n' .. table.concat(rows, ';')
"""

# ARGV: prefix, fp ('' = all), packed keys -> flat {node, epoch, endpoint, fp, prefix, lp, lr,
# ll, load age ms, ...} over live registrations ('' for the load fields when none was
# reported). Per registration, SMISMEMBER over growing slices of the keys (64, 128, ...
# up to 1,024) until the first miss: a short prefix costs one small call, 4,096 keys
# at most seven.
_SCORE = """
local want = ARGV[2]
local keys = unpack_keys(ARGV[3])
local out = {}
for _, e in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '(' .. fmt(now), '+inf')) do
  local r = redis.call('HMGET', P .. 'r:' .. e, 'node', 'endpoint', 'fp', 'exp', 'lp', 'lr', 'll', 'lat')
  if r[1] and tonumber(r[4]) > now and (want == '' or want == r[3]) then
    local nk = P .. 'nk:' .. e
    local n, i, step = 0, 1, 64
    while i <= #keys do
      local last = math.min(i + step - 1, #keys)
      local flags = redis.call('SMISMEMBER', nk, unpack(keys, i, last))
      local miss = false
      for j = 1, #flags do
        if flags[j] == 0 then miss = true break end
        n = n + 1
      end
      if miss then break end
      i = last + 1
      step = math.min(step * 2, 1024)
    end
    out[#out + 1] = r[1]
    out[#out + 1] = e
    out[#out + 1] = r[2]
    out[#out + 1] = r[3]
    out[#out + 1] = fmt(n)
    if r[8] then
      out[#out + 1] = r[5]
      out[#out + 1] = r[6]
      out[#out + 1] = r[7]
      out[#out + 1] = fmt(now - tonumber(r[8]))
    else
      for _ = 1, 4 do out[#out + 1] = '' end
    end
  end
end
return out
"""

# ARGV: prefix, node, epoch
_LEAVE = """
local node, epoch = ARGV[2], ARGV[3]
local bad = check(node, epoch)
if bad then return bad end
retire(epoch)
return {'ok'}
"""

# ARGV: prefix, fp ('' = all) -> flat {node, epoch, endpoint, fp, fpb, remaining_ms, keys, ...}
_LIST = """
local want = ARGV[2]
local out = {}
for _, e in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '(' .. fmt(now), '+inf')) do
  local r = redis.call('HMGET', P .. 'r:' .. e, 'node', 'endpoint', 'fp', 'fpb', 'exp')
  if r[1] and (want == '' or want == r[3]) then
    out[#out + 1] = r[1]
    out[#out + 1] = e
    out[#out + 1] = r[2]
    out[#out + 1] = r[3]
    out[#out + 1] = r[4]
    out[#out + 1] = fmt(tonumber(r[5]) - now)
    out[#out + 1] = redis.call('SCARD', P .. 'nk:' .. e)
  end
end
return out
"""

# ARGV: prefix, budget -> entries freed. Ends up to 100 expired registrations, then
# frees up to <budget> entries of ended ones.
_SWEEP = """
local budget = tonumber(ARGV[2])
for _, e in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', fmt(now), 'LIMIT', 0, 100)) do
  local exp = redis.call('HGET', P .. 'r:' .. e, 'exp')
  if not exp or tonumber(exp) <= now then retire(e) end
end
local freed = 0
local gc = redis.call('HSCAN', P .. 'gc', 0, 'COUNT', 16)[2]
for j = 1, #gc, 2 do
  if freed >= budget then break end
  local epoch, fp = gc[j], gc[j + 1]
  local nk = P .. 'nk:' .. epoch
  local h = P .. 'k:' .. fp
  local keys = redis.call('SPOP', nk, budget - freed)
  for _, key in ipairs(keys) do drop(h, key, epoch) end
  freed = freed + #keys
  if redis.call('EXISTS', nk) == 0 then redis.call('HDEL', P .. 'gc', epoch) end
end
return freed
"""


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
        self._join = register(_PRELUDE + _JOIN)
        self._heartbeat = register(_PRELUDE + _HEARTBEAT)
        self._publish = register(_PRELUDE + _PUBLISH)
        self._withdraw = register(_PRELUDE + _WITHDRAW)
        self._locate = register(_PRELUDE + _LOCATE)
        self._leave = register(_PRELUDE + _LEAVE)
        self._score = register(_PRELUDE + _SCORE)
        self._list = register(_PRELUDE + _LIST)
        self._sweep = register(_PRELUDE + _SWEEP)

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
