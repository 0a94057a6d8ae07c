"""Lua sources of every multi-step Valkey operation: each runs atomically in one round trip.

Layout of a session (see also keys.py):
  chat:{id}  LIST of JSON messages. Stored seqs are 1..pinned (the leading system prompt, at
             indices 0..pinned-1, never trimmed) and base+1..message_count (the window, at
             indices pinned..len-1), where base = message_count - (len - pinned).
  meta:{id}  HASH: user_id model title created_at last_active message_count token_count
             ttl_seconds max_messages pinned [create_request_id] label:<key>...
  reqs:{id}  HASH request_id -> "fingerprint first_seq count".
  summary:{id}  STRING: CompactMessages' summary, stored JSON with seq = the last seq it replaces
             (pinned < seq <= base: it stands where the messages it replaced were).
All four expire together, and every per-session script touches only them (one cluster slot).
On standalone Valkey the create, append and delete scripts also keep the owner's index
`user_sessions:{uid}` exact in the same step; in a cluster the index lives in another slot and
session_store.py updates it in a second step.

The contract between the two languages is defined here, once, on the Python side: each script's
KEYS and ARGV are named (a keys tuple and an argument dataclass whose field order is ARGV's);
`LuaScript` prepends Lua locals of those names, of the reply statuses (`Status`), of the meta
field names (`codec.MetaField`) and of the stored-JSON prefixes the scripts match. A Lua body
refers only to those names; Valkey refuses a script that reads an undefined global, so a name
that drifts fails every test that runs the script.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from glide import Script

from chatsession_server.domain import Role
from chatsession_server.store import codec


class Status(enum.StrEnum):
    """First element of every script's reply."""

    OK = "ok"
    CREATED = "created"
    REPLAYED = "replayed"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    REQUEST_ID_REUSED = "request_id_reused"
    SEQ_MISMATCH = "seq_mismatch"
    TOO_MANY_LABELS = "too_many_labels"
    TOO_LARGE = "too_large"
    BEYOND_LAST = "beyond_last"
    TRIMMED = "trimmed"
    OVER_BUDGET = "over_budget"
    REPLY_TOO_LARGE = "reply_too_large"
    UP_TO_SEQ_AHEAD = "up_to_seq_ahead"
    UP_TO_SEQ_IN_PROMPT = "up_to_seq_in_prompt"
    ALREADY_COMPACTED = "already_compacted"

    @classmethod
    def of(cls, reply: Any) -> Status:
        head = reply[0]
        return cls(head.decode() if isinstance(head, bytes) else head)


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _constants() -> str:
    names = [f"ST_{s.name}" for s in Status] + [f"F_{f.name}" for f in codec.MetaField]
    values = [s.value for s in Status] + [f.value for f in codec.MetaField]
    lines = [f"local {n} = {_lua_string(v)}" for n, v in zip(names, values, strict=True)]
    lines += [
        f"local LABEL_PREFIX = {_lua_string(codec.LABEL_FIELD_PREFIX)}",
        f"local SYSTEM_BODY_PREFIX = {_lua_string(codec.body_prefix(Role.SYSTEM))}",
        f"local TOOL_BODY_PREFIX = {_lua_string(codec.body_prefix(Role.TOOL))}",
        f"local SEQ_HEAD = {_lua_string(codec.SEQ_HEAD)}",
        f"local MAX_PINNED = {MAX_PINNED}",
        f"local USAGE_TOTAL_PREFIX = {_lua_string(codec.USAGE_TOTAL_PREFIX)}",
        f"local USAGE_DAY_PREFIX = {_lua_string(codec.USAGE_DAY_PREFIX)}",
        f"local USAGE_MODEL_PREFIX = {_lua_string(codec.USAGE_MODEL_PREFIX)}",
        f"local USAGE_PRUNED_FIELD = {_lua_string(codec.USAGE_PRUNED_FIELD)}",
        f"local USAGE_MAX_MODELS = {codec.USAGE_MAX_MODELS}",
        f"local USAGE_OTHER_MODEL = {_lua_string(codec.USAGE_OTHER_MODEL)}",
        f"local USAGE_MODELS_FIELD = {_lua_string(codec.USAGE_MODELS_FIELD)}",
        f"local SEEN_PRUNED_FIELD = {_lua_string(SEEN_PRUNED_FIELD)}",
        f"local TOKENS_HEAD = {_lua_string(codec.TOKENS_HEAD)}",
        f"local SUMMARIZES_HEAD = {_lua_string(codec.SUMMARIZES_HEAD)}",
    ]
    lines += [f"local USAGE_{m.upper()} = {_lua_string(m)}" for m in codec.USAGE_METRICS]
    return "\n".join(lines) + "\n"


MAX_PINNED = 16
"""Most leading system messages a session pins (keeps through every window trim)."""
SEEN_PRUNED_FIELD = " pruned_day"
"""usage_seen's bookkeeping field (no session id holds a space): the UTC day it was last pruned"""

A = TypeVar("A")


def owners_arg(owners: Collection[str] | None) -> str:
    """The `owners` argument: the user ids whose sessions the caller may touch (None: anyone's)."""
    if owners is None:
        return ""
    return " " + " ".join(sorted(owners)) + " " if owners else " "


class LuaScript(Generic[A]):
    """A Lua script with named KEYS (`keys`) and ARGV (the fields of the dataclass `args`, in
    order). A field typed as a sequence must come last: it fills the rest of ARGV, and the body
    finds its first index as `<name>_from`. Values travel as strings: None is '', a bool is
    '1'/'0', a number its decimal form. Trailing keys may be left out: they are nil in Lua."""

    def __init__(self, keys: tuple[str, ...], args: type[A], body: str, *, read_only: bool = False) -> None:
        self.key_names = keys
        self._fields = [f.name for f in dataclasses.fields(args)]  # type: ignore[arg-type]
        header = [f"local {', '.join(keys)} = {', '.join(f'KEYS[{i + 1}]' for i in range(len(keys)))}"]
        for i, name in enumerate(self._fields):
            if i == len(self._fields) - 1 and _is_sequence(args, name):
                header.append(f"local {name}_from = {i + 1}")
            else:
                header.append(f"local {name} = ARGV[{i + 1}]")
        self.source = (
            ("#!lua flags=no-writes\n" if read_only else "")
            + _constants()
            + "\n".join(header)
            + "\n"
            + PRELUDE
            + body
        )
        self.script = Script(self.source)  # type: ignore[no-untyped-call]

    def keys(self, *names: str) -> list[str]:
        if len(names) > len(self.key_names):
            raise ValueError(f"the script takes at most {len(self.key_names)} keys")
        return list(names)

    def argv(self, args: A) -> list[str]:
        out: list[str] = []
        for name in self._fields:
            value = getattr(args, name)
            if isinstance(value, list | tuple):
                out.extend(value)
            else:
                out.append(_arg(value))
        return out


def _is_sequence(args: type[Any], name: str) -> bool:
    annotation = str(args.__annotations__[name])
    return annotation.startswith(("Sequence[", "list[", "tuple["))


def _arg(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot pass {type(value).__name__} to a script")


PRELUDE = r"""
-- `owners` is ' ' .. user ids .. ' ' (ids hold no spaces), or '' for a caller acting for anyone.
local function owned(owners, uid)
  return owners == '' or string.find(owners, ' ' .. uid .. ' ', 1, true) ~= nil
end

local function seq_of(item)
  return tonumber(string.sub(item, #SEQ_HEAD + 1, string.find(item, ',', #SEQ_HEAD + 1, true) - 1))
end

local function describe(chat, meta)
  return {redis.call('HGETALL', meta), redis.call('LLEN', chat), redis.call('TTL', meta)}
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


-- Where seq is in the LIST (the pinned prompt, then the window, with no gap in between); a seq
-- that was trimmed maps to the window's first item (`at_least`) or the prompt's last.
local function list_index(mc, len, pinned, seq, at_least)
  local base = mc - (len - pinned)
  if seq <= pinned then return seq - 1 end
  if seq > base then return pinned + seq - base - 1 end
  return at_least and pinned or pinned - 1
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

# Counting usage (KeySpace.usage): called by CREATE, APPEND and FORK_WRITE on standalone Valkey and
# by USAGE_SYNC in a cluster. `days` is codec.usage_days(): "<today> <oldest day kept>" (UTC).
_USAGE_LUA = r"""
-- The model to count under: one already counted, else a new one while fewer than
-- USAGE_MAX_MODELS are, else USAGE_OTHER_MODEL (the HASH, and GetUserUsage's reply, stay bounded).
local function usage_model(usage, model)
  if model == USAGE_OTHER_MODEL then return model end
  local counted = redis.call('HMGET', usage, USAGE_MODEL_PREFIX .. USAGE_MESSAGES .. ':' .. model,
                             USAGE_MODEL_PREFIX .. USAGE_TOKENS .. ':' .. model,
                             USAGE_MODEL_PREFIX .. USAGE_SESSIONS .. ':' .. model)
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
      redis.call('HINCRBY', usage, USAGE_MODEL_PREFIX .. metric .. ':' .. model, n)
      redis.call('HINCRBY', usage, USAGE_DAY_PREFIX .. metric .. ':' .. today, n)
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

# The index key of a user, built in Lua from the owner named in meta: standalone only (a key
# the script does not declare, in another slot).
_INDEX_OF = "index_key_head .. uid .. '}'"


@dataclass(frozen=True, slots=True)
class CreateArgs:
    now: str
    ttl: int
    request_id: str
    user_id: str
    session_id: str
    model: str
    usage_key_head: str
    """'' in a cluster: the caller counts the new session in the user's usage in a second step"""
    usage_days: str
    fields: Sequence[str]
    """flat field/value pairs of the new meta HASH"""


# KEYS: index is given on standalone Valkey only (in a cluster the caller adds the entry first).
CREATE = LuaScript(
    ("chat", "meta", "reqs", "summary", "index"),
    CreateArgs,
    _USAGE_LUA
    + r"""
local existing = redis.call('HMGET', meta, F_USER_ID, F_CREATE_REQUEST_ID, F_LAST_ACTIVE, F_FORK_ORIGIN)
if existing[1] then
  -- A fork with this request_id is not this create's (FORK_WRITE replays it, not CREATE).
  if request_id ~= '' and existing[1] == user_id and existing[2] == request_id and not existing[4] then
    if index then redis.call('ZADD', index, 'NX', existing[3], session_id) end
    return {ST_REPLAYED, describe(chat, meta)}
  end
  return {ST_EXISTS, existing[1], existing[3]}
end
-- Leftovers of an expired namesake (keys expire a moment apart) must not leak in.
redis.call('DEL', chat, reqs, summary)
redis.call('HSET', meta, unpack(ARGV, fields_from))
redis.call('EXPIRE', meta, ttl)
if index then redis.call('ZADD', index, now, session_id) end
if usage_key_head ~= '' then count_usage(usage_key_head .. user_id .. '}', model, usage_days, 0, 0, 1) end
return {ST_CREATED, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class AppendArgs:
    owners: str
    """see `owners_arg`: a session of anyone else is not found"""
    now: str
    request_id: str
    fingerprint: str
    expected_last_seq: int | None
    token_sum: int
    index_key_head: str
    """'' in a cluster: the caller updates the owner's index in a second step"""
    session_id: str
    idempotency_limit: int
    publish_command: str
    """PUBLISH, or SPUBLISH (sharded, in the session's slot) in a cluster"""
    channel: str
    inline_publish_bytes: int
    max_session_bytes: int
    """refuse (TOO_LARGE) an append that would take the session's stored JSON past this; 0: no cap"""
    usage_key_head: str
    """'' in a cluster: the caller counts the append in the owner's usage in a second step"""
    usage_days: str
    bodies: Sequence[str]
    """one per message: its JSON without the opening `{"seq":N,`"""


# Publishes "M<first> <last> <owner>" on the watch channel, followed by "\n[<messages>]" when they
# are small enough: watchers get them without a read, and re-read the LIST when they are not
# there. The owner lets a watch tell its session from a namesake created after it expired.
APPEND = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    AppendArgs,
    _USAGE_LUA
    + r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_TTL_SECONDS, F_MAX_MESSAGES, F_PINNED,
                     F_LAST_ACTIVE, F_STORED_BYTES)
if not m[1] or not owned(owners, m[1]) then return {ST_NOT_FOUND} end
local mc = tonumber(m[2])
local pinned = tonumber(m[5] or '0')
if request_id ~= '' then
  local rec = redis.call('HGET', reqs, request_id)
  if rec then
    local fp, first, count = string.match(rec, '^(%S+) (%d+) (%d+)$')
    if fp ~= fingerprint then return {ST_REQUEST_ID_REUSED} end
    first, count = tonumber(first), tonumber(count)
    local len = redis.call('LLEN', chat)
    local replay = read_range(chat, mc, len, pinned, first, first + count - 1)
    return {ST_REPLAYED, first, replay, describe(chat, meta)}
  end
end
if expected_last_seq ~= '' and tonumber(expected_last_seq) ~= mc then return {ST_SEQ_MISMATCH, mc} end

local items = {}
local first = mc + 1
for i = bodies_from, #ARGV do
  local seq = first + #items
  local body = ARGV[i]
  -- System messages before any other message form the prompt the window keeps (the first
  -- MAX_PINNED: every trim puts them back in front, so their number is bounded).
  local is_system = string.sub(body, 1, #SYSTEM_BODY_PREFIX) == SYSTEM_BODY_PREFIX
  if pinned == seq - 1 and pinned < MAX_PINNED and is_system then
    pinned = seq
  end
  items[#items + 1] = SEQ_HEAD .. string.format('%d', seq) .. ',' .. body
end
local size = 0
for _, item in ipairs(items) do size = size + #item end
local stored = tonumber(m[7] or '0')
local cap = tonumber(max_session_bytes)
if cap > 0 and stored + size > cap then return {ST_TOO_LARGE, stored, size} end
local len = redis.call('RPUSH', chat, unpack(items))
redis.call('HINCRBY', meta, F_STORED_BYTES, size)
local last_active = m[6]
if tonumber(now) > tonumber(last_active) then last_active = now end
redis.call('HINCRBY', meta, F_MESSAGE_COUNT, #items)
redis.call('HINCRBY', meta, F_TOKEN_COUNT, token_sum)
redis.call('HSET', meta, F_LAST_ACTIVE, last_active, F_PINNED, pinned)
trim_window(chat, meta, tonumber(m[4]), pinned)
if tonumber(m[4]) > 0 then len = redis.call('LLEN', chat) end

if request_id ~= '' then
  remember_request(reqs, request_id, fingerprint .. ' ' .. string.format('%d', first) .. ' ' .. #items,
                   idempotency_limit)
end
local ttl = m[3]
redis.call('EXPIRE', chat, ttl)
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', reqs, ttl)
redis.call('EXPIRE', summary, ttl)
if index_key_head ~= '' then
  local uid = m[1]
  redis.call('ZADD', """
    + _INDEX_OF
    + r""", 'GT', last_active, session_id)
end
if usage_key_head ~= '' then
  local model = redis.call('HGET', meta, F_MODEL) or ''
  count_usage(usage_key_head .. m[1] .. '}', model, usage_days, #items, tonumber(token_sum), 0)
end
local last = first + #items - 1
local payload = 'M' .. string.format('%d', first) .. ' ' .. string.format('%d', last) .. ' ' .. m[1]
if size <= tonumber(inline_publish_bytes) then
  payload = payload .. '\n[' .. table.concat(items, ',') .. ']'
end
redis.call(publish_command, channel, payload)
-- describe(chat, meta) without asking what this script knows: the length and the TTL it set.
return {ST_OK, first, {redis.call('HGETALL', meta), len, tonumber(ttl)}}
""",
)


@dataclass(frozen=True, slots=True)
class ListMessagesArgs:
    owners: str
    limit: int
    after_seq: int | None
    before_seq: int | None
    max_bytes: int
    """a page stops short of this many bytes of stored JSON (but holds at least one message)"""


LIST_MESSAGES = LuaScript(
    ("chat", "meta", "summary"),
    ListMessagesArgs,
    r"""
local m = redis.call('HMGET', meta, F_MESSAGE_COUNT, F_PINNED, F_USER_ID, F_REWRITES, F_CLEARED_AT_SEQ)
if not m[1] or not owned(owners, m[3]) then return {ST_NOT_FOUND} end
local mc, pinned = tonumber(m[1]), tonumber(m[2] or '0')
local len = redis.call('LLEN', chat)
local base = mc - (len - pinned)
local limit = tonumber(limit)
local forward = after_seq ~= ''
local lo = forward and tonumber(after_seq) + 1 or 1
local hi = before_seq ~= '' and math.min(tonumber(before_seq) - 1, mc) or mc
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
-- Read from the near end in small slices and stop short of max_bytes (keeping at least one), so
-- neither the reply nor this script's own memory grows with the page: a forward page keeps its
-- oldest, a backward one its newest; the reader pages on from where it stopped.
local items = {}
-- A compacted session's summary stands at its seq, between the prompt and the window; its bytes
-- are kept out of the page's budget when it is in the range.
local summary_item, s_seq = read_summary(summary)
if s_seq and (s_seq < lo or s_seq > hi) then summary_item = false end
local i_lo, i_hi = list_index(mc, len, pinned, p_lo, true), list_index(mc, len, pinned, p_hi, false)
if na + nb > 0 and limit > 0 and i_lo <= i_hi then
  local budget, size, slice = tonumber(max_bytes) - (summary_item and #summary_item or 0), 0, 8
  local kept, stop = {}, false
  local i = forward and i_lo or i_hi
  while not stop and i >= i_lo and i <= i_hi do
    local a, b = i, math.min(i + slice - 1, i_hi)
    if not forward then a, b = math.max(i - slice + 1, i_lo), i end
    local part = redis.call('LRANGE', chat, a, b)
    local first, last, step = 1, #part, 1
    if not forward then first, last, step = #part, 1, -1 end
    for k = first, last, step do
      if #kept > 0 and size + #part[k] > budget then stop = true break end
      size = size + #part[k]
      kept[#kept + 1] = part[k]
    end
    i = forward and b + 1 or a - 1
  end
  if forward then
    items = kept
  else
    for k = #kept, 1, -1 do items[#items + 1] = kept[k] end
  end
  p_lo, p_hi = seq_of(items[1]), seq_of(items[#items])
end
local has_more = (#items < na + nb) and 1 or 0
-- The summary joins the page when it falls within what the page covers (or the page is the
-- last in its direction); a page it makes one too long gives up its far end and has more.
if summary_item then
  local within = #items == 0 or has_more == 0 or (forward and s_seq < p_hi) or (not forward and s_seq > p_lo)
  if within then
    local at = 1
    while at <= #items and seq_of(items[at]) < s_seq do at = at + 1 end
    table.insert(items, at, summary_item)
    if #items > limit then
      if forward then table.remove(items) else table.remove(items, 1) end
      has_more = 1
    end
    p_lo, p_hi = seq_of(items[1]), seq_of(items[#items])
  end
end
-- Trimmed seqs are pinned+1..base; did the part of the range this page covers lose any? A page
-- that leaves nothing more to read covers the whole range, its trimmed part included.
local span_lo, span_hi = lo, hi
if #items > 0 and has_more == 1 then
  if forward then span_hi = p_hi else span_lo = p_lo end
end
-- (With a summary, the seqs up to its own stand compacted, not trimmed.)
local trimmed = (math.max(span_lo, (s_seq or pinned) + 1) <= math.min(span_hi, base)) and 1 or 0
return {ST_OK, items, has_more, mc, base + 1, trimmed, tonumber(m[4] or '0'), tonumber(m[5] or '0')}
""",
    read_only=True,
)


@dataclass(frozen=True, slots=True)
class UpdateArgs:
    owners: str
    ttl: int | None
    max_messages: int | None
    clear_labels: bool
    max_labels: int
    set_count: int
    """how many field/value pairs lead `changes`"""
    changes: Sequence[str]
    """set_count field/value pairs to set, then the fields to delete"""


# Checks the label count the change would leave before it writes anything.
UPDATE = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    UpdateArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_TTL_SECONDS, F_PINNED)
if not m[1] or not owned(owners, m[1]) then return {ST_NOT_FOUND} end
local n_set = tonumber(set_count)
local first_delete = changes_from + 2 * n_set
local labels = {}
if clear_labels ~= '1' then
  for _, f in ipairs(redis.call('HKEYS', meta)) do
    if string.sub(f, 1, #LABEL_PREFIX) == LABEL_PREFIX then labels[f] = true end
  end
end
for i = first_delete, #ARGV do labels[ARGV[i]] = nil end
for i = changes_from, first_delete - 1, 2 do
  if string.sub(ARGV[i], 1, #LABEL_PREFIX) == LABEL_PREFIX then labels[ARGV[i]] = true end
end
local count = 0
for _ in pairs(labels) do count = count + 1 end
if count > tonumber(max_labels) then return {ST_TOO_MANY_LABELS, count} end

if clear_labels == '1' then
  for _, f in ipairs(redis.call('HKEYS', meta)) do
    if string.sub(f, 1, #LABEL_PREFIX) == LABEL_PREFIX then redis.call('HDEL', meta, f) end
  end
end
if n_set > 0 then redis.call('HSET', meta, unpack(ARGV, changes_from, first_delete - 1)) end
if #ARGV >= first_delete then redis.call('HDEL', meta, unpack(ARGV, first_delete)) end
if max_messages ~= '' then
  redis.call('HSET', meta, F_MAX_MESSAGES, max_messages)
  trim_window(chat, meta, tonumber(max_messages), tonumber(m[3] or '0'))
end
if ttl ~= '' then
  redis.call('HSET', meta, F_TTL_SECONDS, ttl)
  redis.call('EXPIRE', chat, ttl)
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', reqs, ttl)
  redis.call('EXPIRE', summary, ttl)
elseif max_messages ~= '' then
  -- A trim may have emptied and re-created the list, dropping its expiry: copy meta's.
  local pttl = redis.call('PTTL', meta)
  if pttl > 0 then redis.call('PEXPIRE', chat, pttl) end
end
return {ST_OK, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class DeleteArgs:
    owners: str
    index_key_head: str
    """'' in a cluster: the caller removes the index entry in a second step"""
    session_id: str
    publish_command: str
    channel: str


DELETE = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    DeleteArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_LAST_ACTIVE)
local uid = m[1]
if not uid or not owned(owners, uid) then return {ST_NOT_FOUND} end
redis.call('DEL', chat, meta, reqs, summary)
if index_key_head ~= '' then redis.call('ZREM', """
    + _INDEX_OF
    + r""", session_id) end
redis.call(publish_command, channel, 'D')
return {ST_OK, uid, m[2]}
""",
)


@dataclass(frozen=True, slots=True)
class PruneIndexArgs:
    user_id: str
    dead: Sequence[str]
    """(session_id, meta key) pairs"""


# Standalone only (reads meta keys of other slots). Removes the entries whose session is still
# missing (or owned by someone else) now, so one re-created meanwhile stays.
PRUNE_INDEX = LuaScript(
    ("index",),
    PruneIndexArgs,
    r"""
local removed = 0
for i = dead_from, #ARGV, 2 do
  local owner = redis.call('HGET', ARGV[i + 1], F_USER_ID)
  if owner ~= user_id then removed = removed + redis.call('ZREM', index, ARGV[i]) end
end
return removed
""",
)


@dataclass(frozen=True, slots=True)
class PruneStaleArgs:
    cutoff: str
    """entries scored at or after this (unix seconds) are left alone"""
    seen: Sequence[str]
    """(session_id, score the listing saw) pairs"""


# Cluster: the index cannot look at sessions, so it removes an entry the listing found dead only
# if its score is unchanged since (nothing touched it meanwhile) and older than the cutoff (no
# create can still be between its two steps).
PRUNE_STALE = LuaScript(
    ("index",),
    PruneStaleArgs,
    r"""
local removed = 0
local limit = tonumber(cutoff)
for i = seen_from, #ARGV, 2 do
  local score = redis.call('ZSCORE', index, ARGV[i])
  local seen = tonumber(ARGV[i + 1])
  if score and tonumber(score) == seen and seen < limit then
    removed = removed + redis.call('ZREM', index, ARGV[i])
  end
end
return removed
""",
)


@dataclass(frozen=True, slots=True)
class UnindexArgs:
    session_id: str
    last_active: str
    """the deleted session's; a newer score belongs to a namesake created since"""


UNINDEX = LuaScript(
    ("index",),
    UnindexArgs,
    r"""
local score = redis.call('ZSCORE', index, session_id)
if score and tonumber(score) <= tonumber(last_active) then return redis.call('ZREM', index, session_id) end
return 0
""",
)


@dataclass(frozen=True, slots=True)
class EnterIndexArgs:
    session_id: str
    now: str


# Cluster: a create's index step. The entry's score goes strictly up (to `now`, or just above the
# score already there, whatever the clocks of the servers that wrote them), and the reply is the
# score written, exactly: a later undo or removal compares against it, never against a clock.
ENTER_INDEX = LuaScript(
    ("index",),
    EnterIndexArgs,
    r"""
local current = redis.call('ZSCORE', index, session_id)
local score = now
if current and tonumber(current) >= tonumber(now) then
  score = string.format('%.6f', tonumber(current) + 0.000001)
end
redis.call('ZADD', index, score, session_id)
return score
""",
)


@dataclass(frozen=True, slots=True)
class RevertIndexArgs:
    session_id: str
    score_set: str
    """what the create wrote; any other score means someone has touched the entry since"""
    previous: str
    """the score to put back, or '' to remove the entry"""


# Cluster: a create that found the id taken undoes its index step.
REVERT_INDEX = LuaScript(
    ("index",),
    RevertIndexArgs,
    r"""
local score = redis.call('ZSCORE', index, session_id)
if not score or tonumber(score) ~= tonumber(score_set) then return 0 end
if previous == '' then return redis.call('ZREM', index, session_id) end
redis.call('ZADD', index, 'XX', previous, session_id)
return 1
""",
)

# --- ForkSession and usage (cluster second step) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForkReadArgs:
    owners: str
    at_seq: int | None
    """None: the source's newest seq"""
    max_bytes: int
    """refuse (TOO_LARGE) a source storing more bytes than this, before reading it; 0: no cap"""
    max_messages: int
    """refuse (TOO_LARGE) a source storing more messages than this, before reading it; 0: no cap"""


# A fork's first step: reads what the fork copies, writes nothing. The pinned prompt is copied
# whole (it is the session's instructions, not history); the summary when at_seq reaches the end
# of what it replaced; the window's messages up to at_seq. at_seq must name a message still
# stored (or the summary's last seq, or lie within the prompt), else TRIMMED.
FORK_READ = LuaScript(
    ("chat", "meta", "summary"),
    ForkReadArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_PINNED, F_STORED_BYTES)
if not m[1] or not owned(owners, m[1]) then return {ST_NOT_FOUND} end
local mc, pinned = tonumber(m[2]), tonumber(m[3] or '0')
local len = redis.call('LLEN', chat)
-- Checked before reading anything: copying more would hold Valkey (this script, then FORK_WRITE)
-- for everyone else too long.
local stored = tonumber(m[4] or '0')
if (tonumber(max_bytes) > 0 and stored > tonumber(max_bytes))
    or (tonumber(max_messages) > 0 and len > tonumber(max_messages)) then
  return {ST_TOO_LARGE, stored, len}
end
local at = mc
if at_seq ~= '' then at = tonumber(at_seq) end
if at > mc then return {ST_BEYOND_LAST, mc} end
local base = mc - (len - pinned)
local summary_json = redis.call('GET', summary)
local summary_seq = -1
if summary_json then summary_seq = seq_of(summary_json) end
-- (at_seq absent: whatever is stored, even if the newest message is gone, as after a clear)
if at_seq ~= '' and at > pinned and at <= base and at ~= summary_seq then
  return {ST_TRIMMED, pinned, base, summary_seq}
end
local prompt = {}
if pinned > 0 then prompt = redis.call('LRANGE', chat, 0, pinned - 1) end
local recent = {}
if at > base then recent = read_range(chat, mc, len, pinned, base + 1, at) end
local kept_summary = ''
if summary_json and at > pinned then kept_summary = summary_json end
return {ST_OK, redis.call('HGETALL', meta), prompt, recent, kept_summary}
""",
)


@dataclass(frozen=True, slots=True)
class ForkWriteArgs:
    owners: str
    now: str
    ttl: int
    request_id: str
    user_id: str
    """'' when probing"""
    session_id: str
    origin: str
    """meta's fork_origin: "<source session_id> <at_seq>"; with request_id it tells a retry"""
    probe: bool
    """only answer REPLAYED if this fork exists already (else NOT_FOUND); write nothing"""
    usage_key_head: str
    """'' in a cluster: the caller counts the new session in a second step"""
    model: str
    usage_days: str
    summary_json: str
    """'' for none"""
    field_count: int
    """how many field/value pairs of the new meta HASH lead `payload`"""
    payload: Sequence[str]
    """field_count pairs, then the fork's stored messages, oldest first"""


# A fork's second step, in the new session's slot: one atomic script, so a fork is either whole or
# absent. A retry with the same request_id (and the same source and at_seq) finds the fork and
# returns it; anything else already there is EXISTS. KEYS: index on standalone Valkey only.
FORK_WRITE = LuaScript(
    ("chat", "meta", "reqs", "summary", "index"),
    ForkWriteArgs,
    _USAGE_LUA
    + r"""
local existing = redis.call('HMGET', meta, F_USER_ID, F_CREATE_REQUEST_ID, F_FORK_ORIGIN, F_LAST_ACTIVE)
if existing[1] then
  if request_id ~= '' and existing[2] == request_id and existing[3] == origin
      and (probe == '1' or existing[1] == user_id) and owned(owners, existing[1]) then
    if index then redis.call('ZADD', index, 'NX', existing[4], session_id) end
    return {ST_REPLAYED, describe(chat, meta)}
  end
  if probe == '1' then return {ST_NOT_FOUND} end
  return {ST_EXISTS, existing[1], existing[4]}
end
if probe == '1' then return {ST_NOT_FOUND} end
-- Leftovers of an expired namesake (keys expire a moment apart) must not leak in.
redis.call('DEL', chat, reqs, summary)
local first_item = payload_from + 2 * tonumber(field_count)
redis.call('HSET', meta, unpack(ARGV, payload_from, first_item - 1))
for from = first_item, #ARGV, 1000 do  -- in slices: unpack takes a few thousand values at most
  redis.call('RPUSH', chat, unpack(ARGV, from, math.min(from + 999, #ARGV)))
end
if summary_json ~= '' then redis.call('SET', summary, summary_json, 'EX', ttl) end
redis.call('EXPIRE', chat, ttl)
redis.call('EXPIRE', meta, ttl)
if index then redis.call('ZADD', index, now, session_id) end
if usage_key_head ~= '' then count_usage(usage_key_head .. user_id .. '}', model, usage_days, 0, 0, 1) end
return {ST_CREATED, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class UsageSyncArgs:
    session_id: str
    created_at: str
    """the session's, as meta holds it: tells it from a namesake"""
    message_count: int
    token_count: int
    usage_base: str
    """"<message_count> <token_count>" the session started with (a fork's copies), "0 0" otherwise"""
    recent_messages: int
    """what the step's own call appended (counted even when the session's record was dropped)"""
    recent_tokens: int
    model: str
    usage_days: str
    horizon: str
    """unix seconds: now - the longest TTL; a session created before it may have lost its record"""
    now: str
    index_score: str
    """the session's last_active, for the owner's index (when KEYS holds it)"""


# Cluster: an append's (or a create's, a fork's) second step, in the user's slot. It counts what
# the session's counters say is new since the last step that reached here (usage_seen), so a
# step repeated by a replay counts nothing, and one that failed is made up by the session's next
# step. KEYS: the owner's index too after an append (its score raised, never lowered, as before).
USAGE_SYNC = LuaScript(
    ("usage", "seen", "index"),
    UsageSyncArgs,
    _USAGE_LUA
    + r"""
local mc, tc = tonumber(message_count), tonumber(token_count)
local from_m, from_t, new
local rec = redis.call('HGET', seen, session_id)
if rec then
  local c, rm, rt = string.match(rec, '^(%S+) (%d+) (%d+)')
  if tonumber(c) == tonumber(created_at) then from_m, from_t, new = tonumber(rm), tonumber(rt), 0 end
end
if not from_m then
  if tonumber(created_at) < tonumber(horizon) then
    -- Its record was dropped (no step for the longest TTL): what came before this call was counted.
    from_m, from_t, new = mc - tonumber(recent_messages), tc - tonumber(recent_tokens), 0
  else
    local bm, bt = string.match(usage_base, '^(%d+) (%d+)$')
    from_m, from_t, new = tonumber(bm), tonumber(bt), 1
  end
end
count_usage(usage, model, usage_days, math.max(mc - from_m, 0), math.max(tc - from_t, 0), new)
redis.call('HSET', seen, session_id, created_at .. ' ' .. string.format('%d', math.max(mc, from_m)) .. ' '
  .. string.format('%d', math.max(tc, from_t)) .. ' ' .. now)
local today = string.match(usage_days, '^(%S+)')
if redis.call('HGET', seen, SEEN_PRUNED_FIELD) ~= today then
  local all = redis.call('HGETALL', seen)
  for i = 1, #all, 2 do
    local synced = string.match(all[i + 1], ' (%S+)$')
    if all[i] ~= SEEN_PRUNED_FIELD and tonumber(synced) < tonumber(horizon) then
      redis.call('HDEL', seen, all[i])
    end
  end
  redis.call('HSET', seen, SEEN_PRUNED_FIELD, today)
end
if index then redis.call('ZADD', index, 'GT', index_score, session_id) end
return new
""",
)


# --- Context, compaction and clearing (issue 15) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContextArgs:
    owners: str
    max_tokens: int
    """0: no limit"""
    max_messages: int
    """most messages of the recent part; 0: no limit"""
    max_bytes: int
    """the whole reply stops short of this many bytes of stored JSON"""


# Walks the window from its newest item in small slices and stops at the first message that does
# not fit: the reply and this script's memory stay bounded by the budget, not the session.
GET_CONTEXT = LuaScript(
    ("chat", "meta", "summary"),
    ContextArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_PINNED)
if not m[1] or not owned(owners, m[1]) then return {ST_NOT_FOUND} end
local pinned = tonumber(m[2] or '0')
local head = pinned > 0 and redis.call('LRANGE', chat, 0, pinned - 1) or {}
local summary_item = read_summary(summary)
if summary_item then head[#head + 1] = summary_item end
local tokens, size = 0, 0
for _, item in ipairs(head) do
  tokens = tokens + tokens_of(item)
  size = size + #item
end
local max_tokens, max_messages, max_size = tonumber(max_tokens), tonumber(max_messages), tonumber(max_bytes)
if max_tokens > 0 and tokens > max_tokens then return {ST_OVER_BUDGET, tokens} end
if size > max_size then return {ST_REPLY_TOO_LARGE, size} end
local len = redis.call('LLEN', chat)
local recent, recent_tokens = {}, {}
local i, stop = len - 1, false
while not stop and i >= pinned do
  local part = redis.call('LRANGE', chat, math.max(i - 15, pinned), i)
  for k = #part, 1, -1 do
    local item = part[k]
    local t = tokens_of(item)
    if (max_messages > 0 and #recent >= max_messages) or (max_tokens > 0 and tokens + t > max_tokens)
        or size + #item > max_size then
      stop = true
      break
    end
    recent[#recent + 1] = item
    recent_tokens[#recent_tokens + 1] = t
    tokens, size = tokens + t, size + #item
  end
  i = i - #part
end
-- Tool results at the head of the recent part lost the assistant message that called them.
while #recent > 0 and has_role(recent[#recent], TOOL_BODY_PREFIX) do
  tokens = tokens - recent_tokens[#recent]
  recent[#recent] = nil
end
for k = #recent, 1, -1 do head[#head + 1] = recent[k] end
local truncated = (#recent < len - pinned) and 1 or 0
return {ST_OK, head, tokens, truncated}
""",
    read_only=True,
)


@dataclass(frozen=True, slots=True)
class CompactArgs:
    owners: str
    request_id: str
    fingerprint: str
    up_to_seq: int
    idempotency_limit: int
    publish_command: str
    channel: str
    max_session_bytes: int
    """0: no limit; else a compaction that would leave the session above it and larger is refused"""
    summary_body: str
    """the summary's JSON without its opening `{"seq":N,` (as codec.encode_body gives it)"""


# Removes the window's items with seq <= up_to_seq (the pinned prompt stays), stores the summary
# with seq = up_to_seq and its range, and publishes "C<first> <last> <owner> <rewrite>" (the
# session's count of compactions and clears, this one included). The range starts
# right after the prompt: the prompt cannot grow once a message follows it, and an earlier
# summary (which started there too) is folded in.
COMPACT = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    CompactArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_PINNED, F_STORED_BYTES)
if not m[1] or not owned(owners, m[1]) then return {ST_NOT_FOUND} end
if request_id ~= '' then
  local rec = redis.call('HGET', reqs, request_id)
  if rec then
    if string.match(rec, '^(%S+) ') ~= fingerprint then return {ST_REQUEST_ID_REUSED} end
    return {ST_REPLAYED, redis.call('GET', summary) or '', describe(chat, meta)}
  end
end
local mc, pinned, up_to = tonumber(m[2]), tonumber(m[3] or '0'), tonumber(up_to_seq)
if up_to > mc then return {ST_UP_TO_SEQ_AHEAD, mc} end
if up_to <= pinned then return {ST_UP_TO_SEQ_IN_PROMPT, pinned} end
local old, old_seq = read_summary(summary)
if old and up_to < old_seq then return {ST_ALREADY_COMPACTED, old_seq} end
local len = redis.call('LLEN', chat)
local base = mc - (len - pinned)
local drop = math.min(math.max(up_to - base, 0), len - pinned)
local item = SEQ_HEAD .. string.format('%d', up_to) .. ',' .. string.sub(summary_body, 1, -2)
  .. SUMMARIZES_HEAD .. string.format('%d', pinned + 1) .. ',' .. string.format('%d', up_to) .. ']}'
-- The cap every append is held to: a compaction may not take the session above it, unless it
-- shrinks the session (one stored before the cap was lowered must stay compactable).
local cap, stored = tonumber(max_session_bytes), tonumber(m[4] or '0')
if cap > 0 then
  local freed = (drop > 0 and bytes_of(chat, pinned, pinned + drop - 1) or 0) + (old and #old or 0)
  local after = stored - freed + #item
  if after > cap and after > stored then return {ST_TOO_LARGE, stored, after} end
end
if drop > 0 then drop_after_prompt(chat, meta, pinned, drop) end
if old then unstore(meta, #old) end
redis.call('HINCRBY', meta, F_STORED_BYTES, #item)
redis.call('SET', summary, item)
if request_id ~= '' then
  local record = fingerprint .. ' ' .. string.format('%d', up_to) .. ' 0'
  remember_request(reqs, request_id, record, idempotency_limit)
end
-- The keys expire together, on meta's clock: a compaction is no activity of the user's.
local pttl = redis.call('PTTL', meta)
if pttl > 0 then
  for _, key in ipairs({chat, reqs, summary}) do redis.call('PEXPIRE', key, pttl) end
end
local rewrite = redis.call('HINCRBY', meta, F_REWRITES, 1)
redis.call(publish_command, channel, 'C' .. string.format('%d', pinned + 1) .. ' '
           .. string.format('%d', up_to) .. ' ' .. m[1] .. ' ' .. string.format('%d', rewrite))
return {ST_OK, item, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class ClearArgs:
    owners: str
    keep_system_prompt: bool
    request_id: str
    fingerprint: str
    idempotency_limit: int
    publish_command: str
    channel: str


# Publishes "X<last seq> <owner> <rewrite>" (as COMPACT's) and keeps the last seq as
# cleared_at_seq, which tells a watch resumed at or before it of the clear it missed. Clearing
# the prompt too sets `pinned` to 0 for good: the seqs go on, so a system message appended later
# is not at the session's start and is not pinned. A request_id makes a retry change nothing:
# it must not empty what was appended after the clear it repeats.
CLEAR = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    ClearArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_PINNED)
if not m[1] or not owned(owners, m[1]) then return {ST_NOT_FOUND} end
if request_id ~= '' then
  local rec = redis.call('HGET', reqs, request_id)
  if rec then
    if string.match(rec, '^(%S+) ') ~= fingerprint then return {ST_REQUEST_ID_REUSED} end
    return {ST_REPLAYED, describe(chat, meta)}
  end
end
local keep = keep_system_prompt == '1' and tonumber(m[3] or '0') or 0
local len = redis.call('LLEN', chat)
unstore(meta, bytes_of(chat, keep, len - 1))
if keep > 0 then redis.call('LTRIM', chat, 0, keep - 1) else redis.call('DEL', chat) end
local old = read_summary(summary)
if old then
  unstore(meta, #old)
  redis.call('DEL', summary)
end
redis.call('HSET', meta, F_PINNED, keep, F_CLEARED_AT_SEQ, m[2])
local rewrite = redis.call('HINCRBY', meta, F_REWRITES, 1)
if request_id ~= '' then
  remember_request(reqs, request_id, fingerprint .. ' ' .. m[2] .. ' 0', idempotency_limit)
  -- The keys expire together, on meta's clock (as after a compaction).
  local pttl = redis.call('PTTL', meta)
  if pttl > 0 then redis.call('PEXPIRE', reqs, pttl) end
end
redis.call(publish_command, channel, 'X' .. m[2] .. ' ' .. m[1] .. ' ' .. string.format('%d', rewrite))
return {ST_OK, describe(chat, meta)}
""",
)

ALL: tuple[LuaScript[Any], ...] = (
    CREATE,
    APPEND,
    LIST_MESSAGES,
    UPDATE,
    DELETE,
    PRUNE_INDEX,
    PRUNE_STALE,
    UNINDEX,
    ENTER_INDEX,
    REVERT_INDEX,
    FORK_READ,
    FORK_WRITE,
    USAGE_SYNC,
    GET_CONTEXT,
    COMPACT,
    CLEAR,
)
