"""The Lua library every script shares (PRELUDE), and the usage counting (USAGE_LUA) of those
that count the owner's usage. Both refer only to the names runtime.py injects."""

PRELUDE = r"""
-- Whether the caller may touch the session of `uid` whose meta HASH is `meta`. `owners` is
-- ' ' .. user ids .. ' ' (ids hold no spaces), or '' for a caller acting for anyone; a caller
-- confined to some apps (runtime.owners_arg) adds '#|' .. apps joined by '|' .. '|' (after '*'
-- for every user), and only sessions of those apps are its (the app read from meta only then).
local function owned(owners, uid, meta)
  if owners == '' then return true end
  local users, apps = owners, nil
  local cut = string.find(owners, '#', 1, true)
  if cut then users, apps = string.sub(owners, 1, cut - 1), string.sub(owners, cut + 1) end
  if users ~= '*' and string.find(users, ' ' .. uid .. ' ', 1, true) == nil then return false end
  if not apps then return true end
  local app = redis.call('HGET', meta, F_APP)
  return app ~= false and string.find(apps, '|' .. app .. '|', 1, true) ~= nil
end

local function seq_of(item)
  return tonumber(string.sub(item, #SEQ_HEAD + 1, string.find(item, ',', #SEQ_HEAD + 1, true) - 1))
end

local function describe(chat, meta)
  return {redis.call('HGETALL', meta), redis.call('LLEN', chat), redis.call('TTL', meta)}
end

-- A key in an owner's slot, named from its head (KeySpace.user_index_head, usage_head) and the
-- user id: standalone only (a key the script does not declare, in another slot).
local function owner_key(head, uid)
  return head .. uid .. HASH_TAG_END
end

-- The session's keys expire together: `ttl` seconds from now (a negative ttl, NEVER_EXPIRES:
-- never; EXPIRE would delete them)...
local function expire_together(ttl, ...)
  if tonumber(ttl) < 0 then
    for _, key in ipairs({...}) do redis.call('PERSIST', key) end
  else
    for _, key in ipairs({...}) do redis.call('EXPIRE', key, ttl) end
  end
end

-- ...or when meta does, for keys a script wrote without a user's activity (whose clock it must
-- not restart), or emptied and re-created (which drops their expiry).
local function expire_with_meta(meta, ...)
  local pttl = redis.call('PTTL', meta)
  if pttl > 0 then
    for _, key in ipairs({...}) do redis.call('PEXPIRE', key, pttl) end
  elseif pttl == -1 then
    for _, key in ipairs({...}) do redis.call('PERSIST', key) end
  end
end

-- What the session recorded of a request_id (see remember_request: every record is
-- "fingerprint first_seq count"): nil when nothing (or no request_id), false when the record is
-- another request's (its fingerprint differs), else the first seq and the count.
local function recorded_request(reqs, request_id, fingerprint)
  if request_id == '' then return nil end
  local rec = redis.call('HGET', reqs, request_id)
  if not rec then return nil end
  local fp, first, count = string.match(rec, '^(%S+) (%d+) (%d+)$')
  if fp ~= fingerprint then return false end
  return tonumber(first), tonumber(count)
end

-- A stored item is SEQ_HEAD .. seq .. ',' .. body; the body starts with its role.
local function has_role(item, prefix)
  if not item then return false end
  local comma = string.find(item, ',', #SEQ_HEAD + 1, true)
  return comma ~= nil and string.sub(item, comma + 1, comma + #prefix) == prefix
end

-- Bytes of the items at indices from..to, read in slices: a window cut from 64 MiB to a few
-- messages must not load it all.
local function bytes_of(chat, from, to)
  local total = 0
  for at = from, to, 64 do
    for _, item in ipairs(redis.call('LRANGE', chat, at, math.min(at + 63, to))) do total = total + #item end
  end
  return total
end

-- Subtracts from stored_bytes; a session stored before the count existed starts from 0: never
-- let it go negative.
local function unstore(meta, freed)
  if redis.call('HINCRBY', meta, F_STORED_BYTES, -freed) < 0 then
    redis.call('HSET', meta, F_STORED_BYTES, 0)
  end
end

-- Removes the `drop` oldest messages after the pinned prompt, and their bytes from the count.
-- The LIST may be emptied and re-created: the caller restores its expiry where that matters.
local function drop_after_prompt(chat, meta, pinned, drop)
  unstore(meta, bytes_of(chat, pinned, pinned + drop - 1))
  if pinned == 0 then
    redis.call('LTRIM', chat, drop, -1)
  else
    local head = redis.call('LRANGE', chat, 0, pinned - 1)
    redis.call('LTRIM', chat, pinned + drop, -1)
    -- Back in front, in slices (a prompt stored before MAX_PINNED existed may be longer than
    -- unpack takes), the last slice first.
    for last = #head, 1, -1000 do
      local slice = {}
      for i = last, math.max(last - 999, 1), -1 do slice[#slice + 1] = head[i] end
      redis.call('LPUSH', chat, unpack(slice))
    end
  end
end

-- Records a request_id's outcome, and forgets the oldest records in bulk once half as many
-- again as the limit pile up.
local function remember_request(reqs, request_id, record, limit)
  redis.call('HSET', reqs, request_id, record)
  limit = tonumber(limit)
  local n = redis.call('HLEN', reqs)
  if n > limit + math.floor(limit / 2) then
    local all = redis.call('HGETALL', reqs)
    local rows = {}
    for i = 1, #all, 2 do
      rows[#rows + 1] = {tonumber(string.match(all[i + 1], ' (%d+) ')), all[i]}
    end
    table.sort(rows, function(a, b) return a[1] < b[1] end)
    -- In slices: Lua's unpack takes at most a few thousand values, and a script that fails
    -- half way keeps what it wrote before.
    for from = 1, n - limit, 1000 do
      local old = {}
      for i = from, math.min(from + 999, n - limit) do old[#old + 1] = rows[i][2] end
      redis.call('HDEL', reqs, unpack(old))
    end
  end
end

-- The `tokens` of a stored message: the first `,"tokens":` in it is the top-level field (it
-- follows role and content, and a quote inside a JSON string is always escaped).
local function tokens_of(item)
  local at = string.find(item, TOKENS_HEAD, 1, true)
  if not at then return 0 end
  return tonumber(string.match(item, '^%d+', at + #TOKENS_HEAD)) or 0
end

-- What a stored item counts for in a reply's byte budget: its length, or what it takes encoded
-- in the reply when its payload makes that more (its reply_bytes, right after its role).
local function reply_size(item)
  local encoded = string.match(item, REPLY_BYTES_PATTERN)
  if encoded and tonumber(encoded) > #item then return tonumber(encoded) end
  return #item
end

-- The stored summary (or false) and its seq.
local function read_summary(summary)
  local item = redis.call('GET', summary)
  if not item then return false, nil end
  return item, seq_of(item)
end

-- Keep the pinned prompt and the newest max-pinned messages (at least one); never leave a
-- tool result at the head of the window, since the call it answers was trimmed.
local function trim_window(chat, meta, max, pinned)
  if max <= 0 then return end
  local len = redis.call('LLEN', chat)
  local unpinned = len - pinned
  local drop = unpinned - math.max(max - pinned, 1)
  if drop <= 0 then return end
  -- Tool results the new head would start with go too, read in slices (not one LINDEX each).
  local walking = true
  while walking and drop < unpinned do
    local slice = redis.call('LRANGE', chat, pinned + drop, pinned + drop + 63)
    for _, item in ipairs(slice) do
      if drop >= unpinned or not has_role(item, TOOL_BODY_PREFIX) then walking = false break end
      drop = drop + 1
    end
    if #slice == 0 then walking = false end
  end
  drop_after_prompt(chat, meta, pinned, drop)
end


-- Where the window stands in the LIST: its items are at indices pinned..len-1 in seq order, after
-- the seqs pinned+1..base that are gone (trimmed, compacted, cleared). Their seqs run base+1..mc
-- without a hole unless a truncation left some (meta's `holes` is '1'): then they are read from the
-- items themselves.
local function window_of(chat, mc, len, pinned, holes)
  local w = {chat = chat, len = len, pinned = pinned, holes = holes == '1' and len > pinned}
  if w.holes then
    w.base = seq_of(redis.call('LINDEX', chat, pinned)) - 1
  else
    w.base = mc - (len - pinned)
  end
  return w
end

-- The LIST index of the first window item with a seq >= `seq` (len when there is none): counted
-- without holes, else found by bisection (a few LINDEX).
local function window_at(w, seq)
  if not w.holes then return w.pinned + math.min(math.max(seq - w.base - 1, 0), w.len - w.pinned) end
  -- The ends first (the newest page asks for both): no bisection for a seq outside the window.
  if seq <= w.base + 1 then return w.pinned end
  if not w.last then w.last = seq_of(redis.call('LINDEX', w.chat, w.len - 1)) end
  if seq > w.last then return w.len end
  local lo, hi = w.pinned, w.len
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if seq_of(redis.call('LINDEX', w.chat, mid)) < seq then lo = mid + 1 else hi = mid end
  end
  return lo
end

-- Stored messages with lo <= seq <= hi, oldest first.
local function read_range(w, lo, hi)
  local out = {}
  if lo < 1 then lo = 1 end
  if lo > hi then return out end
  local pinned = w.pinned
  if lo <= pinned then
    for _, v in ipairs(redis.call('LRANGE', w.chat, lo - 1, math.min(hi, pinned) - 1)) do
      out[#out + 1] = v
    end
  end
  local from, to = window_at(w, math.max(lo, pinned + 1)), window_at(w, hi + 1) - 1
  if from <= to then
    for _, v in ipairs(redis.call('LRANGE', w.chat, from, to)) do out[#out + 1] = v end
  end
  return out
end
"""

# Counting usage (KeySpace.usage): called by CREATE, APPEND and FORK_WRITE on standalone Valkey and
# by USAGE_SYNC in a cluster. `days` is codec.usage_days(): "<today> <oldest day kept>" (UTC).
USAGE_LUA = r"""
-- The model to count under: one already counted, else a new one while fewer than
-- USAGE_MAX_MODELS are, else USAGE_OTHER_MODEL (the HASH, and GetUserUsage's reply, stay bounded).
local function usage_model(usage, model)
  if model == USAGE_OTHER_MODEL then return model end
  local counted = redis.call('HMGET', usage, USAGE_MODEL_PREFIX .. USAGE_MESSAGES .. USAGE_SEPARATOR .. model,
                             USAGE_MODEL_PREFIX .. USAGE_TOKENS .. USAGE_SEPARATOR .. model,
                             USAGE_MODEL_PREFIX .. USAGE_SESSIONS .. USAGE_SEPARATOR .. model)
  if counted[1] or counted[2] or counted[3] then return model end
  if tonumber(redis.call('HGET', usage, USAGE_MODELS_FIELD) or '0') >= USAGE_MAX_MODELS then
    return USAGE_OTHER_MODEL
  end
  redis.call('HINCRBY', usage, USAGE_MODELS_FIELD, 1)
  return model
end

local function count_usage(usage, model, days, messages, tokens, sessions)
  local today, oldest = string.match(days, '^(%S+) (%S+)$')
  if messages > 0 or tokens > 0 or sessions > 0 then model = usage_model(usage, model) end
  for _, pair in ipairs({{USAGE_MESSAGES, messages}, {USAGE_TOKENS, tokens}, {USAGE_SESSIONS, sessions}}) do
    local metric, n = pair[1], pair[2]
    if n > 0 then
      redis.call('HINCRBY', usage, USAGE_TOTAL_PREFIX .. metric, n)
      redis.call('HINCRBY', usage, USAGE_MODEL_PREFIX .. metric .. USAGE_SEPARATOR .. model, n)
      redis.call('HINCRBY', usage, USAGE_DAY_PREFIX .. metric .. USAGE_SEPARATOR .. today, n)
    end
  end
  -- Once a day: drop the days no longer kept (a day field ends with its YYYY-MM-DD).
  if redis.call('HGET', usage, USAGE_PRUNED_FIELD) ~= today then
    for _, f in ipairs(redis.call('HKEYS', usage)) do
      if string.sub(f, 1, #USAGE_DAY_PREFIX) == USAGE_DAY_PREFIX and string.sub(f, -10) < oldest then
        redis.call('HDEL', usage, f)
      end
    end
    redis.call('HSET', usage, USAGE_PRUNED_FIELD, today)
  end
end
"""
