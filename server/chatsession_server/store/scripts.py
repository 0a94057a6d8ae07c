"""Lua sources of every multi-step Valkey operation: each runs atomically in one round trip.

Layout of a session (see also keys.py):
  chat:{id}  LIST of JSON messages. Stored seqs are 1..pinned (the leading system prompt, at
             indices 0..pinned-1, never trimmed) and base+1..message_count (the window, at
             indices pinned..len-1), where base = message_count - (len - pinned).
  meta:{id}  HASH: user_id model title created_at last_active message_count token_count
             ttl_seconds max_messages pinned [create_request_id] label:<key>...
  reqs:{id}  HASH request_id -> "fingerprint first_seq count".
All three expire together. Standalone Valkey lets a script also touch the owner's index
`user_sessions:{uid}` (named from the meta HASH), which keeps the index exact.
"""

PRELUDE = r"""
local function describe(chat, meta)
  return {redis.call('HGETALL', meta), redis.call('LLEN', chat), redis.call('TTL', meta)}
end

local function is_tool(item)
  return item and string.find(item, '^{"seq":%d+,"role":"tool"') ~= nil
end

-- Keep the pinned prompt and the newest max-pinned messages (at least one); never leave a
-- tool result at the head of the window, since the call it answers was trimmed.
local function trim_window(chat, max, pinned)
  if max <= 0 then return end
  local len = redis.call('LLEN', chat)
  local unpinned = len - pinned
  local drop = unpinned - math.max(max - pinned, 1)
  if drop <= 0 then return end
  while drop < unpinned and is_tool(redis.call('LINDEX', chat, pinned + drop)) do
    drop = drop + 1
  end
  if pinned == 0 then
    redis.call('LTRIM', chat, drop, -1)
  else
    local head = redis.call('LRANGE', chat, 0, pinned - 1)
    redis.call('LTRIM', chat, pinned + drop, -1)
    for i = #head, 1, -1 do redis.call('LPUSH', chat, head[i]) end
  end
end

-- Stored messages with lo <= seq <= hi, oldest first.
local function read_range(chat, mc, len, pinned, lo, hi)
  local out = {}
  if lo < 1 then lo = 1 end
  if hi > mc then hi = mc end
  if lo > hi then return out end
  local base = mc - (len - pinned)
  if lo <= pinned then
    for _, v in ipairs(redis.call('LRANGE', chat, lo - 1, math.min(hi, pinned) - 1)) do out[#out + 1] = v end
  end
  local from = math.max(lo, base + 1)
  if from <= hi then
    for _, v in ipairs(redis.call('LRANGE', chat, pinned + from - base - 1, pinned + hi - base - 1)) do
      out[#out + 1] = v
    end
  end
  return out
end
"""

# KEYS: chat, meta, reqs, index. ARGV: now, ttl, request_id, user_id, session_id, field/value...
CREATE = (
    PRELUDE
    + r"""
local chat, meta, reqs, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local existing = redis.call('HMGET', meta, 'user_id', 'create_request_id', 'last_active')
if existing[1] then
  if ARGV[3] ~= '' and existing[1] == ARGV[4] and existing[2] == ARGV[3] then
    redis.call('ZADD', index, 'NX', existing[3], ARGV[5])
    return {'replayed', describe(chat, meta)}
  end
  return {'exists'}
end
-- Leftovers of an expired namesake (keys expire a moment apart) must not leak in.
redis.call('DEL', chat, reqs)
redis.call('HSET', meta, unpack(ARGV, 6))
redis.call('EXPIRE', meta, ARGV[2])
redis.call('ZADD', index, ARGV[1], ARGV[5])
return {'created', describe(chat, meta)}
"""
)

# KEYS: chat, meta, reqs. ARGV: now, request_id, fingerprint, expected_last_seq ('' = none),
# token sum, index key head, session_id, idempotency limit, watch channel, most bytes to publish
# inline, then one body per message (its JSON without the opening `{"seq":N,`).
# Publishes "M<first> <last>" on the watch channel, followed by "\n[<messages>]" when they are
# small enough: watchers get them without a read, and re-read the LIST when they are not there.
APPEND = (
    PRELUDE
    + r"""
local chat, meta, reqs = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'user_id', 'message_count', 'ttl_seconds', 'max_messages', 'pinned',
                     'last_active')
if not m[1] then return {'not_found'} end
local mc = tonumber(m[2])
local pinned = tonumber(m[5] or '0')
local rid = ARGV[2]
if rid ~= '' then
  local rec = redis.call('HGET', reqs, rid)
  if rec then
    local fp, first, count = string.match(rec, '^(%S+) (%d+) (%d+)$')
    if fp ~= ARGV[3] then return {'request_id_reused'} end
    first, count = tonumber(first), tonumber(count)
    local len = redis.call('LLEN', chat)
    local replay = read_range(chat, mc, len, pinned, first, first + count - 1)
    return {'replayed', first, replay, describe(chat, meta)}
  end
end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= mc then return {'seq_mismatch', mc} end

local items = {}
local first = mc + 1
for i = 11, #ARGV do
  local seq = first + #items
  local body = ARGV[i]
  -- System messages before any other message form the prompt the window keeps.
  if pinned == seq - 1 and string.sub(body, 1, 16) == '"role":"system",' then pinned = seq end
  items[#items + 1] = '{"seq":' .. string.format('%d', seq) .. ',' .. body
end
redis.call('RPUSH', chat, unpack(items))
local last_active = m[6]
if tonumber(ARGV[1]) > tonumber(last_active) then last_active = ARGV[1] end
redis.call('HINCRBY', meta, 'message_count', #items)
redis.call('HINCRBY', meta, 'token_count', ARGV[5])
redis.call('HSET', meta, 'last_active', last_active, 'pinned', pinned)
trim_window(chat, tonumber(m[4]), pinned)

if rid ~= '' then
  redis.call('HSET', reqs, rid, ARGV[3] .. ' ' .. string.format('%d', first) .. ' ' .. #items)
  -- Forget the oldest records in bulk once half as many again as the limit pile up.
  local limit = tonumber(ARGV[8])
  local n = redis.call('HLEN', reqs)
  if n > limit + math.floor(limit / 2) then
    local all = redis.call('HGETALL', reqs)
    local rows = {}
    for i = 1, #all, 2 do
      rows[#rows + 1] = {tonumber(string.match(all[i + 1], ' (%d+) ')), all[i]}
    end
    table.sort(rows, function(a, b) return a[1] < b[1] end)
    local old = {}
    for i = 1, n - limit do old[#old + 1] = rows[i][2] end
    redis.call('HDEL', reqs, unpack(old))
  end
end
local ttl = m[3]
redis.call('EXPIRE', chat, ttl)
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', reqs, ttl)
redis.call('ZADD', ARGV[6] .. m[1] .. '}', 'GT', last_active, ARGV[7])
local payload = 'M' .. string.format('%d', first) .. ' ' .. string.format('%d', first + #items - 1)
local size = 0
for _, item in ipairs(items) do size = size + #item end
if size <= tonumber(ARGV[10]) then payload = payload .. '\n[' .. table.concat(items, ',') .. ']' end
redis.call('PUBLISH', ARGV[9], payload)
return {'ok', first, describe(chat, meta)}
"""
)

# KEYS: chat, meta. ARGV: limit, after_seq ('' = none), before_seq ('' = none).
LIST_MESSAGES = (
    "#!lua flags=no-writes\n"
    + PRELUDE
    + r"""
local chat, meta = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'message_count', 'pinned')
if not m[1] then return {'not_found'} end
local mc, pinned = tonumber(m[1]), tonumber(m[2] or '0')
local len = redis.call('LLEN', chat)
local base = mc - (len - pinned)
local limit = tonumber(ARGV[1])
local forward = ARGV[2] ~= ''
local lo = forward and tonumber(ARGV[2]) + 1 or 1
local hi = ARGV[3] ~= '' and math.min(tonumber(ARGV[3]) - 1, mc) or mc
-- The stored seqs within [lo, hi] form two runs: the pinned prompt and the window.
local a1, a2 = math.max(lo, 1), math.min(hi, pinned)
local b1, b2 = math.max(lo, base + 1), hi
local na, nb = math.max(a2 - a1 + 1, 0), math.max(b2 - b1 + 1, 0)
local p_lo, p_hi
if forward then
  if na >= limit then p_lo, p_hi = a1, a1 + limit - 1
  elseif nb > 0 then p_lo, p_hi = (na > 0) and a1 or b1, b1 + math.min(limit - na, nb) - 1
  else p_lo, p_hi = a1, a2 end
else
  if nb >= limit then p_lo, p_hi = b2 - limit + 1, b2
  elseif na > 0 then p_lo, p_hi = a2 - math.min(limit - nb, na) + 1, (nb > 0) and b2 or a2
  else p_lo, p_hi = b1, b2 end
end
local items = {}
if na + nb > 0 and limit > 0 then items = read_range(chat, mc, len, pinned, p_lo, p_hi) end
local has_more = (#items < na + nb) and 1 or 0
-- Trimmed seqs are pinned+1..base; did the part of the range this page covers lose any?
local span_lo, span_hi = lo, hi
if #items > 0 then
  if forward then span_hi = p_hi else span_lo = p_lo end
end
local trimmed = (math.max(span_lo, pinned + 1) <= math.min(span_hi, base)) and 1 or 0
return {'ok', items, has_more, mc, base + 1, trimmed}
"""
)

# KEYS: chat, meta, reqs. ARGV: ttl ('' = keep), max_messages ('' = keep), clear labels ('1'/'0'),
# number of field/value pairs to set, the pairs, then fields to delete.
UPDATE = (
    PRELUDE
    + r"""
local chat, meta, reqs = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'user_id', 'ttl_seconds', 'pinned')
if not m[1] then return {'not_found'} end
if ARGV[3] == '1' then
  for _, f in ipairs(redis.call('HKEYS', meta)) do
    if string.sub(f, 1, 6) == 'label:' then redis.call('HDEL', meta, f) end
  end
end
local n_set = tonumber(ARGV[4])
if n_set > 0 then redis.call('HSET', meta, unpack(ARGV, 5, 4 + 2 * n_set)) end
if #ARGV >= 5 + 2 * n_set then redis.call('HDEL', meta, unpack(ARGV, 5 + 2 * n_set)) end
if ARGV[2] ~= '' then
  redis.call('HSET', meta, 'max_messages', ARGV[2])
  trim_window(chat, tonumber(ARGV[2]), tonumber(m[3] or '0'))
end
if ARGV[1] ~= '' then
  redis.call('HSET', meta, 'ttl_seconds', ARGV[1])
  redis.call('EXPIRE', chat, ARGV[1])
  redis.call('EXPIRE', meta, ARGV[1])
  redis.call('EXPIRE', reqs, ARGV[1])
elseif ARGV[2] ~= '' then
  -- A trim may have emptied and re-created the list, dropping its expiry: copy meta's.
  local pttl = redis.call('PTTL', meta)
  if pttl > 0 then redis.call('PEXPIRE', chat, pttl) end
end
return {'ok', describe(chat, meta)}
"""
)

# KEYS: chat, meta, reqs. ARGV: index key head, session_id, watch channel.
DELETE = r"""
local uid = redis.call('HGET', KEYS[2], 'user_id')
if not uid then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', ARGV[1] .. uid .. '}', ARGV[2])
redis.call('PUBLISH', ARGV[3], 'D')
return 1
"""

# KEYS: index. ARGV: user_id, then (session_id, meta key) of each session the listing found dead.
# Removes those still missing (or owned by someone else) now, so one re-created meanwhile stays.
PRUNE_INDEX = r"""
local removed = 0
for i = 2, #ARGV, 2 do
  local owner = redis.call('HGET', ARGV[i + 1], 'user_id')
  if owner ~= ARGV[1] then removed = removed + redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return removed
"""
