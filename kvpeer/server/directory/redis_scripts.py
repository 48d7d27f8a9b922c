"""The Lua scripts of :class:`~kvpeer.server.directory.redis_store.RedisStore`, one per call.

Every script starts with :data:`PRELUDE` (the clock from Redis ``TIME``, the packed
key format, the registration check) and takes ``ARGV[1]`` = the key prefix ``P``;
``KEYS[1]`` is the prefix too (it names the slot on a Redis Cluster). :data:`EPOCH`
runs on the control prefix; every other script runs on one shard's prefix and
touches that shard's keys only (see :mod:`.redis_layout`). The key schema they share
is in :mod:`.redis_store`'s docstring; each script's arguments and answer are in the
comment above it.
"""

# Shared by every script: the clock, the argument format, registration checks.
PRELUDE = """
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

# ARGV: control prefix -> the next epoch (a string). Seeded from TIME in microseconds
# the first time, then INCR: epochs are unique across nodes, shards and replicas.
EPOCH = """
if redis.call('INCR', P .. 'epoch') == 1 then
  redis.call('SET', P .. 'epoch', t[1] .. string.format('%06d', tonumber(t[2])))
end
return redis.call('GET', P .. 'epoch')
"""

# ARGV: prefix, node, endpoint, fp, fpb, ttl_ms, epoch (from EPOCH) -> {'ok'}, or
# {'superseded', current} when a later join of the node ran first (concurrent joins
# through two replicas): the caller takes a fresh epoch, so the last join wins.
JOIN = """
local node, endpoint, fp, fpb, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local epoch = ARGV[7]
local old = redis.call('GET', P .. 'n:' .. node)
if old and tonumber(old) > tonumber(epoch) then return {'superseded', old} end
if old then retire(old) end
local exp = fmt(now + ttl)
redis.call('SET', P .. 'n:' .. node, epoch)
redis.call('HSET', P .. 'r:' .. epoch, 'node', node, 'endpoint', endpoint, 'fp', fp,
           'fpb', fpb, 'exp', exp)
redis.call('ZADD', P .. 'leases', exp, epoch)
return {'ok'}
"""

# ARGV: prefix, node, epoch, ttl_ms[, pinned rows, running requests, peer leases]
HEARTBEAT = """
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
PUBLISH = """
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
WITHDRAW = """
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
LOCATE = """
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
SCORE = """
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
LEAVE = """
local node, epoch = ARGV[2], ARGV[3]
local bad = check(node, epoch)
if bad then return bad end
retire(epoch)
return {'ok'}
"""

# ARGV: prefix, fp ('' = all) -> flat {node, epoch, endpoint, fp, fpb, remaining_ms, keys, ...}
LIST = """
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
SWEEP = """
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
