"""Scripts that run in a session's cluster slot, each touching only that session's keys.

Layout of a session (see also keys.py):
  chat:{id}  LIST of JSON messages. Stored seqs are 1..pinned (the leading system prompt, at
             indices 0..pinned-1, never trimmed) and base+1..message_count (the window, at
             indices pinned..len-1), where base = message_count - (len - pinned); once a
             truncation has removed the newest (meta's `holes`), the window's seqs may have
             holes, and base is the seq before its first item (prelude's window_of).
  meta:{id}  HASH (codec.MetaField): user_id model title created_at last_active message_count
             token_count ttl_seconds max_messages pinned stored_bytes [app] [create_request_id]
             [fork_origin usage_base] [rewrites] [cleared_at_seq] [compacted] [payloads]
             [holes truncated]
             label:<key>...
  reqs:{id}  HASH request_id -> "fingerprint first_seq count": the records of appends,
             compactions ("fingerprint up_to_seq 0"), clears ("fingerprint last_seq 0") and
             truncations ("fingerprint after_seq removed").
  summary:{id}  STRING: CompactMessages' summary, stored JSON with seq = the last seq it replaces
             (pinned < seq <= base: it stands where the messages it replaced were).
  state:{id}  HASH: the session's state (see state_scripts.py).
All five expire together. On standalone Valkey the create, append, delete and fork scripts also
keep the owner's index `user_sessions:{uid}` and usage `usage:{uid}` exact in the same step (they
are given their keys or the heads of their names), and for a session of an app the owner's index
of the app `user_sessions:{uid}:<app>` and the app's `app_sessions:{<app>}`; in a cluster those
live in other slots and owner_index.py keeps them in steps of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatsession_server.store.lua.prelude import USAGE_LUA
from chatsession_server.store.lua.runtime import LuaScript
from chatsession_server.store.lua.state_scripts import STATE_LUA

# Standalone only: a session of an app is also in its owner's index of that app (the owner's
# index key `index` .. ':' .. app, in the same slot) and in the app's index (named from its
# head), with the score the owner's index gets. `flag`: 'NX' (a replay: add what is missing,
# keep scores) or 'CH' (set the score; CH changes only what ZADD returns).
APP_INDEX_LUA = r"""
local function index_app(index, app_head, app, flag, score, session_id)
  if app == '' or app_head == '' then return end
  redis.call('ZADD', index .. ':' .. app, flag, score, session_id)
  redis.call('ZADD', owner_key(app_head, app), flag, score, session_id)
end
"""


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
    app: str
    """'' for none"""
    app_index_head: str
    """'' in a cluster: the caller enters the app's indexes in a step of their own"""
    fields: Sequence[str]
    """flat field/value pairs of the new meta HASH"""


# KEYS: index is given on standalone Valkey only (in a cluster the caller adds the entry first).
CREATE = LuaScript(
    ("chat", "meta", "reqs", "summary", "state", "index"),
    CreateArgs,
    USAGE_LUA
    + APP_INDEX_LUA
    + r"""
local existing = redis.call('HMGET', meta, F_USER_ID, F_CREATE_REQUEST_ID, F_LAST_ACTIVE, F_FORK_ORIGIN,
                           F_APP)
if existing[1] then
  -- A fork with this request_id is not this create's (FORK_WRITE replays it, not CREATE).
  if request_id ~= '' and existing[1] == user_id and existing[2] == request_id and not existing[4] then
    if index then
      redis.call('ZADD', index, 'NX', existing[3], session_id)
      index_app(index, app_index_head, existing[5] or '', 'NX', existing[3], session_id)
    end
    return {ST_REPLAYED, describe(chat, meta)}
  end
  return {ST_EXISTS, existing[1], existing[3], existing[5] or ''}
end
-- Leftovers of an expired namesake (keys expire a moment apart) must not leak in.
redis.call('DEL', chat, reqs, summary, state)
redis.call('HSET', meta, unpack(ARGV, fields_from))
expire_together(ttl, meta)
if index then
  redis.call('ZADD', index, now, session_id)
  index_app(index, app_index_head, app, 'CH', now, session_id)
end
if usage_key_head ~= '' then count_usage(owner_key(usage_key_head, user_id), model, usage_days, 0, 0, 1) end
return {ST_CREATED, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class AppendArgs:
    owners: str
    """see `owners_arg`: a session of anyone else is not found"""
    now: str
    """the append's time: the newest created_at of its messages (the server's clock for those
    without one of their own)"""
    caller_time: bool
    """a message has a created_at of the caller's: last_active becomes `now` even if earlier
    (an import); else it only moves forward, whatever the clocks of the servers appending"""
    request_id: str
    fingerprint: str
    expected_last_seq: int | None
    token_sum: int
    index_key_head: str
    """'' in a cluster: the caller updates the owner's index in a second step"""
    app_index_head: str
    """'' in a cluster: the caller updates the app's indexes in steps of their own"""
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
    with_payload: bool
    """a message carries a payload: the session's PAYLOADS flag is set"""
    state_delta: str
    """codec.encode_state_delta's ('' for none): applied with the messages, or neither is"""
    max_state_keys: int
    max_state_bytes: int
    bodies: Sequence[str]
    """one per message: its JSON without the opening `{"seq":N,`"""


# Publishes "M<first> <last> <owner>" on the watch channel, followed by "\n[<messages>]" when they
# are small enough and the channel has a subscriber: watchers get them without a read, and
# re-read the LIST when they are not there. The owner lets a watch tell its session from a
# namesake created after it expired.
APPEND = LuaScript(
    ("chat", "meta", "reqs", "summary", "state"),
    AppendArgs,
    USAGE_LUA
    + STATE_LUA
    + APP_INDEX_LUA
    + r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_TTL_SECONDS, F_MAX_MESSAGES, F_PINNED,
                     F_LAST_ACTIVE, F_STORED_BYTES, F_HOLES, F_APP)
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
local mc = tonumber(m[2])
local pinned = tonumber(m[5] or '0')
local replay_first, replay_count = recorded_request(reqs, request_id, fingerprint)
if replay_first == false then return {ST_REQUEST_ID_REUSED} end
if replay_first then
  local len = redis.call('LLEN', chat)
  local w = window_of(chat, mc, len, pinned, m[8])
  local replay = read_range(w, replay_first, replay_first + replay_count - 1)
  return {ST_REPLAYED, replay_first, replay, describe(chat, meta)}
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
-- The last check, and the first write: a state too full refuses the messages too.
local state_refused = apply_state_delta(state, state_delta, max_state_keys, max_state_bytes)
if state_refused then return state_refused end
local len = redis.call('RPUSH', chat, unpack(items))
redis.call('HINCRBY', meta, F_STORED_BYTES, size)
local last_active = m[6]
if caller_time == '1' or tonumber(now) > tonumber(last_active) then last_active = now end
redis.call('HINCRBY', meta, F_MESSAGE_COUNT, #items)
redis.call('HINCRBY', meta, F_TOKEN_COUNT, token_sum)
redis.call('HSET', meta, F_LAST_ACTIVE, last_active, F_PINNED, pinned)
if with_payload == '1' then redis.call('HSET', meta, F_PAYLOADS, '1') end
trim_window(chat, meta, tonumber(m[4]), pinned)
if tonumber(m[4]) > 0 then len = redis.call('LLEN', chat) end

if request_id ~= '' then
  remember_request(reqs, request_id, fingerprint .. ' ' .. string.format('%d', first) .. ' ' .. #items,
                   idempotency_limit)
end
local ttl = m[3]
expire_together(ttl, chat, meta, reqs, summary, state)
if index_key_head ~= '' then
  local index = owner_key(index_key_head, m[1])
  redis.call('ZADD', index, last_active, session_id)
  index_app(index, app_index_head, m[9] or '', 'CH', last_active, session_id)
end
if usage_key_head ~= '' then
  local model = redis.call('HGET', meta, F_MODEL) or ''
  count_usage(owner_key(usage_key_head, m[1]), model, usage_days, #items, tonumber(token_sum), 0)
end
local last = first + #items - 1
local payload = PUBLISH_APPENDED .. string.format('%d', first) .. ' ' .. string.format('%d', last)
  .. ' ' .. m[1]
-- Copying the messages into the publish costs Valkey about 3 ms a MB: only for a channel someone
-- follows (a process with a watcher of the session), and in one concatenation.
local numsub = publish_command == 'SPUBLISH' and 'SHARDNUMSUB' or 'NUMSUB'
if size <= tonumber(inline_publish_bytes) and redis.call('PUBSUB', numsub, channel)[2] > 0 then
  local parts = {payload, '\n['}
  for i, item in ipairs(items) do
    if i > 1 then parts[#parts + 1] = ',' end
    parts[#parts + 1] = item
  end
  parts[#parts + 1] = ']'
  payload = table.concat(parts)
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
    """a page stops short of this many bytes of stored JSON (but holds at least one message); a
    message counts for its reply_bytes instead when those are more (see codec.REPLY_BYTES_PATTERN)"""


LIST_MESSAGES = LuaScript(
    ("chat", "meta", "summary"),
    ListMessagesArgs,
    r"""
local m = redis.call('HMGET', meta, F_MESSAGE_COUNT, F_PINNED, F_USER_ID, F_REWRITES, F_CLEARED_AT_SEQ,
                     F_PAYLOADS, F_HOLES, F_TRUNCATED, F_COMPACTED)
if not m[1] or not owned(owners, m[3], meta) then return {ST_NOT_FOUND} end
local size_of = m[6] and reply_size or string.len
local mc, pinned = tonumber(m[1]), tonumber(m[2] or '0')
local len = redis.call('LLEN', chat)
local w = window_of(chat, mc, len, pinned, m[7])
local base = w.base
local limit = tonumber(limit)
local forward = after_seq ~= ''
local lo = forward and tonumber(after_seq) + 1 or 1
local hi = before_seq ~= '' and math.min(tonumber(before_seq) - 1, mc) or mc
-- The stored items with seqs within [lo, hi] form two runs, adjacent in the LIST: na of the
-- pinned prompt (seqs a1..a2), then nb of the window (indices w1..w2).
local a1, a2 = math.max(lo, 1), math.min(hi, pinned)
local w1, w2 = window_at(w, math.max(lo, pinned + 1)), window_at(w, hi + 1) - 1
local na, nb = math.max(a2 - a1 + 1, 0), math.max(w2 - w1 + 1, 0)
local first_at, last_at = (na > 0) and a1 - 1 or w1, (nb > 0) and w2 or a2 - 1
local p_lo, p_hi
-- Read from the near end in small slices and stop short of max_bytes (keeping at least one), so
-- neither the reply nor this script's own memory grows with the page: a forward page keeps its
-- oldest, a backward one its newest; the reader pages on from where it stopped.
local items = {}
-- A compacted session's summary stands at its seq, between the prompt and the window; its bytes
-- are kept out of the page's budget when it is in the range.
local summary_item, s_seq = read_summary(summary)
if s_seq and (s_seq < lo or s_seq > hi) then summary_item = false end
local i_lo, i_hi = first_at, math.min(first_at + limit - 1, last_at)
if not forward then i_lo, i_hi = math.max(last_at - limit + 1, first_at), last_at end
if na + nb > 0 and limit > 0 and i_lo <= i_hi then
  local budget, size, slice = tonumber(max_bytes) - (summary_item and size_of(summary_item) or 0), 0, 8
  local kept, stop = {}, false
  local i = forward and i_lo or i_hi
  while not stop and i >= i_lo and i <= i_hi do
    local a, b = i, math.min(i + slice - 1, i_hi)
    if not forward then a, b = math.max(i - slice + 1, i_lo), i end
    local part = redis.call('LRANGE', chat, a, b)
    local first, last, step = 1, #part, 1
    if not forward then first, last, step = #part, 1, -1 end
    for k = first, last, step do
      local item_size = size_of(part[k])
      if #kept > 0 and size + item_size > budget then stop = true break end
      size = size + item_size
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
-- (With a summary, the seqs up to its own stand compacted, not trimmed; those the latest
-- truncations removed, e.g. every one after the prompt, are not trimmed either.)
local t_lo, t_hi = math.max(span_lo, (s_seq or pinned) + 1), math.min(span_hi, base)
local trimmed = (t_lo <= t_hi) and 1 or 0
local cut_from, cut_last = string.match(m[8] or '', '^(%d+) (%d+)')
if trimmed == 1 and cut_from and t_lo > tonumber(cut_from) and t_hi <= tonumber(cut_last) then trimmed = 0 end
-- The latest compaction, for a watch that reads past its summary (see watch.py), only while the
-- summary it wrote is the one stored: a server from before the record was kept clears or
-- re-compacts without touching it.
local compacted = m[9] or ''
local _, c_last = string.match(compacted, '^(%d+) (%d+)')
if not (c_last and s_seq and tonumber(c_last) == s_seq) then compacted = '' end
return {ST_OK, items, has_more, mc, base + 1, trimmed, tonumber(m[4] or '0'), tonumber(m[5] or '0'),
        m[8] or '', compacted}
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
    ("chat", "meta", "reqs", "summary", "state"),
    UpdateArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_TTL_SECONDS, F_PINNED)
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
local n_set = tonumber(set_count)
local first_delete = changes_from + 2 * n_set
-- A whole-map update replaces the caller's labels; those the service sets (a fork's forked_from)
-- stay, and count.
local labels = {}
for _, f in ipairs(redis.call('HKEYS', meta)) do
  local label = string.sub(f, 1, #LABEL_PREFIX) == LABEL_PREFIX
  if label and (clear_labels ~= '1' or RESERVED_LABEL_FIELDS[f]) then labels[f] = true end
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
    if string.sub(f, 1, #LABEL_PREFIX) == LABEL_PREFIX and not RESERVED_LABEL_FIELDS[f] then
      redis.call('HDEL', meta, f)
    end
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
  expire_together(ttl, chat, meta, reqs, summary, state)
elseif max_messages ~= '' then
  -- A trim may have emptied and re-created the list, dropping its expiry.
  expire_with_meta(meta, chat)
end
return {ST_OK, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class DeleteArgs:
    owners: str
    index_key_head: str
    """'' in a cluster: the caller removes the index entry in a second step"""
    app_index_head: str
    """'' in a cluster: the caller removes the app's index entries in steps of their own"""
    session_id: str
    publish_command: str
    channel: str


DELETE = LuaScript(
    ("chat", "meta", "reqs", "summary", "state"),
    DeleteArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_LAST_ACTIVE, F_APP)
local uid = m[1]
if not uid or not owned(owners, uid, meta) then return {ST_NOT_FOUND} end
redis.call('DEL', chat, meta, reqs, summary, state)
local app = m[3] or ''
if index_key_head ~= '' then
  local index = owner_key(index_key_head, uid)
  redis.call('ZREM', index, session_id)
  if app ~= '' then
    redis.call('ZREM', index .. ':' .. app, session_id)
    redis.call('ZREM', owner_key(app_index_head, app), session_id)
  end
end
redis.call(publish_command, channel, PUBLISH_DELETED)
return {ST_OK, uid, m[2], app}
""",
)


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
    ("chat", "meta", "summary", "state"),
    ForkReadArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_PINNED, F_STORED_BYTES, F_HOLES,
                     F_TRUNCATED)
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
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
local w = window_of(chat, mc, len, pinned, m[5])
local base = w.base
local summary_json = redis.call('GET', summary)
local summary_seq = -1
if summary_json then summary_seq = seq_of(summary_json) end
-- (at_seq absent: whatever is stored, even if the newest message is gone, as after a clear)
-- (A seq a truncation removed, up to the window's start, is no trimmed seq, as in TRUNCATE.)
local cut_from, cut_last = string.match(m[6] or '', '^(%d+) (%d+)')
local was_cut = cut_from and at > tonumber(cut_from) and base <= tonumber(cut_last)
if at_seq ~= '' and at > pinned and at <= base and at ~= summary_seq and not was_cut then
  return {ST_TRIMMED, pinned, base, summary_seq}
end
local prompt = {}
if pinned > 0 then prompt = redis.call('LRANGE', chat, 0, pinned - 1) end
local recent = {}
if at > base then recent = read_range(w, base + 1, at) end
local kept_summary = ''
if summary_json and at > pinned then kept_summary = summary_json end
-- The state as it is now (it has no history: at_seq does not change it).
return {ST_OK, redis.call('HGETALL', meta), prompt, recent, kept_summary, redis.call('HGETALL', state)}
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
    app: str
    """the source's ('' for none)"""
    app_index_head: str
    """'' in a cluster: the caller enters the app's indexes in a step of their own"""
    summary_json: str
    """'' for none"""
    state_copy: str
    """the source's state as a delta that sets it all (codec.encode_state_delta), '' for none"""
    field_count: int
    """how many field/value pairs of the new meta HASH lead `payload`"""
    payload: Sequence[str]
    """field_count pairs, then the fork's stored messages, oldest first"""


# A fork's second step, in the new session's slot: one atomic script, so a fork is either whole or
# absent. A retry with the same request_id (and the same source and at_seq) finds the fork and
# returns it; anything else already there is EXISTS. KEYS: index on standalone Valkey only.
FORK_WRITE = LuaScript(
    ("chat", "meta", "reqs", "summary", "state", "index"),
    ForkWriteArgs,
    USAGE_LUA
    + STATE_LUA
    + APP_INDEX_LUA
    + r"""
local existing = redis.call('HMGET', meta, F_USER_ID, F_CREATE_REQUEST_ID, F_FORK_ORIGIN, F_LAST_ACTIVE,
                           F_APP)
if existing[1] then
  if request_id ~= '' and existing[2] == request_id and existing[3] == origin
      and (probe == '1' or existing[1] == user_id) and owned(owners, existing[1], meta) then
    if index then
      redis.call('ZADD', index, 'NX', existing[4], session_id)
      index_app(index, app_index_head, existing[5] or '', 'NX', existing[4], session_id)
    end
    return {ST_REPLAYED, describe(chat, meta)}
  end
  if probe == '1' then return {ST_NOT_FOUND} end
  return {ST_EXISTS, existing[1], existing[4], existing[5] or ''}
end
if probe == '1' then return {ST_NOT_FOUND} end
-- Leftovers of an expired namesake (keys expire a moment apart) must not leak in.
redis.call('DEL', chat, reqs, summary, state)
local first_item = payload_from + 2 * tonumber(field_count)
redis.call('HSET', meta, unpack(ARGV, payload_from, first_item - 1))
for from = first_item, #ARGV, 1000 do  -- in slices: unpack takes a few thousand values at most
  redis.call('RPUSH', chat, unpack(ARGV, from, math.min(from + 999, #ARGV)))
end
if summary_json ~= '' then redis.call('SET', summary, summary_json) end
apply_state_delta(state, state_copy, 0, 0)  -- no cap: the source held it
expire_together(ttl, chat, meta, summary, state)
if index then
  redis.call('ZADD', index, now, session_id)
  index_app(index, app_index_head, app, 'CH', now, session_id)
end
if usage_key_head ~= '' then count_usage(owner_key(usage_key_head, user_id), model, usage_days, 0, 0, 1) end
return {ST_CREATED, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class ContextArgs:
    owners: str
    max_tokens: int
    """0: no limit"""
    max_messages: int
    """most messages of the recent part; 0: no limit"""
    max_bytes: int
    """the whole reply stops short of this many bytes of stored JSON (counted as ListMessagesArgs'
    max_bytes)"""


# Walks the window from its newest item in small slices and stops at the first message that does
# not fit: the reply and this script's memory stay bounded by the budget, not the session.
GET_CONTEXT = LuaScript(
    ("chat", "meta", "summary"),
    ContextArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_PINNED, F_PAYLOADS)
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
local pinned = tonumber(m[2] or '0')
local size_of = m[3] and reply_size or string.len
local head = pinned > 0 and redis.call('LRANGE', chat, 0, pinned - 1) or {}
local summary_item = read_summary(summary)
if summary_item then head[#head + 1] = summary_item end
local tokens, size = 0, 0
for _, item in ipairs(head) do
  tokens = tokens + tokens_of(item)
  size = size + size_of(item)
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
    local t, item_size = tokens_of(item), size_of(item)
    if (max_messages > 0 and #recent >= max_messages) or (max_tokens > 0 and tokens + t > max_tokens)
        or size + item_size > max_size then
      stop = true
      break
    end
    recent[#recent + 1] = item
    recent_tokens[#recent_tokens + 1] = t
    tokens, size = tokens + t, size + item_size
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
    with_payload: bool
    """the summary carries a payload: the session's PAYLOADS flag is set"""
    summary_body: str
    """the summary's JSON without its opening `{"seq":N,` (as codec.encode_body gives it)"""


# Removes the window's items with seq <= up_to_seq (the pinned prompt stays), stores the summary
# with seq = up_to_seq and its range, and publishes "C<first> <last> <owner> <rewrite>" (the
# session's count of compactions, clears and truncations, this one included), which meta's `compacted` keeps
# as "<first> <last> <rewrite>" for a watch whose inbox drops the publish. The range starts
# right after the prompt: the prompt cannot grow once a message follows it, and an earlier
# summary (which started there too) is folded in.
COMPACT = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    CompactArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_PINNED, F_STORED_BYTES, F_HOLES)
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
local replayed = recorded_request(reqs, request_id, fingerprint)
if replayed == false then return {ST_REQUEST_ID_REUSED} end
if replayed then return {ST_REPLAYED, redis.call('GET', summary) or '', describe(chat, meta)} end
local mc, pinned, up_to = tonumber(m[2]), tonumber(m[3] or '0'), tonumber(up_to_seq)
if up_to > mc then return {ST_UP_TO_SEQ_AHEAD, mc} end
if up_to <= pinned then return {ST_UP_TO_SEQ_IN_PROMPT, pinned} end
local old, old_seq = read_summary(summary)
if old and up_to < old_seq then return {ST_ALREADY_COMPACTED, old_seq} end
local len = redis.call('LLEN', chat)
local drop = window_at(window_of(chat, mc, len, pinned, m[5]), up_to + 1) - pinned
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
if with_payload == '1' then redis.call('HSET', meta, F_PAYLOADS, '1') end
if request_id ~= '' then
  local record = fingerprint .. ' ' .. string.format('%d', up_to) .. ' 0'
  remember_request(reqs, request_id, record, idempotency_limit)
end
-- A compaction is no activity of the user's.
expire_with_meta(meta, chat, reqs, summary)
local rewrite = string.format('%d', redis.call('HINCRBY', meta, F_REWRITES, 1))
local range = string.format('%d', pinned + 1) .. ' ' .. string.format('%d', up_to)
redis.call('HSET', meta, F_COMPACTED, range .. ' ' .. rewrite)
redis.call(publish_command, channel, PUBLISH_COMPACTED .. range .. ' ' .. m[1] .. ' ' .. rewrite)
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
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
local replayed = recorded_request(reqs, request_id, fingerprint)
if replayed == false then return {ST_REQUEST_ID_REUSED} end
if replayed then return {ST_REPLAYED, describe(chat, meta)} end
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
-- The window is empty: no hole is left in it, and no summary for a compaction record to tell of.
redis.call('HDEL', meta, F_HOLES, F_COMPACTED)
local rewrite = redis.call('HINCRBY', meta, F_REWRITES, 1)
if request_id ~= '' then
  remember_request(reqs, request_id, fingerprint .. ' ' .. m[2] .. ' 0', idempotency_limit)
  expire_with_meta(meta, reqs)  -- as after a compaction
end
redis.call(publish_command, channel,
           PUBLISH_CLEARED .. m[2] .. ' ' .. m[1] .. ' ' .. string.format('%d', rewrite))
return {ST_OK, describe(chat, meta)}
""",
)


@dataclass(frozen=True, slots=True)
class TruncateArgs:
    owners: str
    after_seq: int | None
    """None: pop_count says what goes"""
    pop_count: int
    expected_last_seq: int | None
    request_id: str
    fingerprint: str
    idempotency_limit: int
    publish_command: str
    channel: str
    return_removed: bool
    max_removed_messages: int
    """with return_removed: refuse (TOO_LARGE) removing more messages than this..."""
    max_removed_bytes: int
    """...or more bytes of them"""


# Keeps the stored items with seq <= after (the pinned prompt, the summary, the window, in this
# order of seqs), removes the rest: one LTRIM, as the removed items are always the LIST's tail (a
# cut into the prompt takes the whole window and the summary with it). The counters stay (seqs are
# never reused: the next append gets message_count + 1), so a window left short of message_count
# is marked `holes`. Publishes "T<after> <message_count> <owner> <rewrite>" (as COMPACT's) and
# keeps "<after> <message_count> <rewrite>" in meta's `truncated` (merged with an earlier run). A
# request_id's record is "fingerprint after removed"; a replay removes nothing.
TRUNCATE = LuaScript(
    ("chat", "meta", "reqs", "summary"),
    TruncateArgs,
    r"""
local m = redis.call('HMGET', meta, F_USER_ID, F_MESSAGE_COUNT, F_PINNED, F_HOLES, F_TRUNCATED, F_PAYLOADS)
if not m[1] or not owned(owners, m[1], meta) then return {ST_NOT_FOUND} end
local recorded_after, recorded_removed = recorded_request(reqs, request_id, fingerprint)
if recorded_after == false then return {ST_REQUEST_ID_REUSED} end
if recorded_after then return {ST_REPLAYED, recorded_after, recorded_removed, {}, describe(chat, meta)} end
local mc, pinned = tonumber(m[2]), tonumber(m[3] or '0')
if expected_last_seq ~= '' and tonumber(expected_last_seq) ~= mc then return {ST_SEQ_MISMATCH, mc} end
local len = redis.call('LLEN', chat)
local w = window_of(chat, mc, len, pinned, m[4])
local summary_item, s_seq = read_summary(summary)
local after
if after_seq ~= '' then
  after = tonumber(after_seq)
  if after > mc then return {ST_BEYOND_LAST, mc} end
else
  -- The newest item kept, counting the summary as one between the prompt and the window.
  local kept = len + (summary_item and 1 or 0) - tonumber(pop_count)
  if kept <= 0 then after = 0
  elseif kept <= pinned then after = kept
  elseif summary_item and kept == pinned + 1 then after = s_seq
  else after = seq_of(redis.call('LINDEX', chat, kept - 1 - (summary_item and 1 or 0))) end
end
-- The LIST keeps its indices 0..cut-1.
local cut = after < pinned and math.max(after, 0) or window_at(w, after + 1)
local drop_summary = summary_item and s_seq > after
local removed = len - cut + (drop_summary and 1 or 0)
-- (A seq an earlier truncation removed, up to the window's start, is no trimmed seq: it keeps
-- what the session held at it, as one in a hole does.)
local cut_from, cut_last = string.match(m[5] or '', '^(%d+) (%d+)')
local was_cut = cut_from and after > tonumber(cut_from) and w.base <= tonumber(cut_last)
if removed > 0 and after > pinned and after <= w.base and after ~= s_seq and not was_cut then
  return {ST_TRIMMED, pinned, w.base, s_seq or -1}
end
local items, listed, rewrite = {}, nil, nil
if return_removed == '1' and removed > 0 then
  -- Checked before a write: a refusal leaves the session as it was. The reply's budget counts
  -- what a payload takes encoded, as a page's does.
  if removed > tonumber(max_removed_messages) then return {ST_TOO_LARGE, removed, -1} end
  local size_of = m[6] and reply_size or string.len
  local reply = drop_summary and size_of(summary_item) or 0
  listed = drop_summary and #summary_item or 0
  for at = cut, len - 1, 64 do
    for _, item in ipairs(redis.call('LRANGE', chat, at, math.min(at + 63, len - 1))) do
      listed, reply = listed + #item, reply + size_of(item)
      if reply > tonumber(max_removed_bytes) then return {ST_TOO_LARGE, removed, reply} end
      items[#items + 1] = item
    end
  end
  -- The summary's seq lies between the removed prompt's and the window's.
  if drop_summary then table.insert(items, math.max(pinned - cut, 0) + 1, summary_item) end
end
if removed > 0 then
  unstore(meta, listed or (bytes_of(chat, cut, len - 1) + (drop_summary and #summary_item or 0)))
  if cut == 0 then redis.call('DEL', chat) else redis.call('LTRIM', chat, 0, cut - 1) end
  if drop_summary then
    redis.call('DEL', summary)
    redis.call('HDEL', meta, F_COMPACTED)  -- no summary left for it to tell of
  end
  if cut < pinned then redis.call('HSET', meta, F_PINNED, cut) end
  -- A window left (cut beyond the prompt) now ends short of message_count.
  if cut > pinned then redis.call('HSET', meta, F_HOLES, '1') else redis.call('HDEL', meta, F_HOLES) end
  -- What a resumed watch is told: after+1..message_count are gone, and so is an earlier range
  -- this one reaches into (together they are one run of removed seqs).
  local earlier_after, earlier_last = string.match(m[5] or '', '^(%d+) (%d+)')
  local from = after
  if earlier_after and after < tonumber(earlier_last) then from = math.min(after, tonumber(earlier_after)) end
  -- With this truncation's rewrite: a watch that reads past it later (its event dropped from a
  -- full inbox, or still queued behind the read) tells it from one it was told of.
  rewrite = redis.call('HINCRBY', meta, F_REWRITES, 1)
  redis.call('HSET', meta, F_TRUNCATED, string.format('%d', from) .. ' ' .. m[2] .. ' '
             .. string.format('%d', rewrite))
end
if request_id ~= '' then
  remember_request(reqs, request_id,
                   fingerprint .. ' ' .. string.format('%d', after) .. ' ' .. string.format('%d', removed),
                   idempotency_limit)
  expire_with_meta(meta, reqs)  -- a truncation is no activity of the user's
end
if removed > 0 then
  redis.call(publish_command, channel, PUBLISH_TRUNCATED .. string.format('%d', after) .. ' ' .. m[2]
             .. ' ' .. m[1] .. ' ' .. string.format('%d', rewrite))
end
return {ST_OK, after, removed, items, describe(chat, meta)}
""",
)

ALL: tuple[LuaScript[Any], ...] = (
    CREATE,
    APPEND,
    LIST_MESSAGES,
    UPDATE,
    DELETE,
    FORK_READ,
    FORK_WRITE,
    GET_CONTEXT,
    COMPACT,
    CLEAR,
    TRUNCATE,
)
