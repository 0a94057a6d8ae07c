"""Scripts that run in an owner's cluster slot: the user's index (`user_sessions:{uid}`, and of
an app `user_sessions:{uid}:<app>`), usage (`usage:{uid}`) and usage bookkeeping
(`usage_seen:{uid}`); the index scripts run in an app's slot on its index (`app_sessions:{<app>}`)
too. In a cluster they are the steps of a write after or before the session's own (see
owner_index.py); PRUNE_INDEX is standalone only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatsession_server.store.lua.prelude import USAGE_LUA
from chatsession_server.store.lua.runtime import LuaScript


@dataclass(frozen=True, slots=True)
class PruneIndexArgs:
    user_id: str
    """'' for an app's index (of every user)"""
    app: str
    """'' for a user's index of every app"""
    dead: Sequence[str]
    """(session_id, meta key) pairs"""


# Standalone only (reads meta keys of other slots). Removes the entries whose session is still
# missing (or owned by someone else, or of another app) now, so one re-created meanwhile stays.
PRUNE_INDEX = LuaScript(
    ("index",),
    PruneIndexArgs,
    r"""
local removed = 0
for i = dead_from, #ARGV, 2 do
  local m = redis.call('HMGET', ARGV[i + 1], F_USER_ID, F_APP)
  if not m[1] or (user_id ~= '' and m[1] ~= user_id) or (app ~= '' and m[2] ~= app) then
    removed = removed + redis.call('ZREM', index, ARGV[i])
  end
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


# KEYS: the owner's index, and its index of the session's app (same slot) if it has one; or an
# app's index alone. Each entry goes unless its score is newer than the deleted session's.
UNINDEX = LuaScript(
    ("index", "app_index"),
    UnindexArgs,
    r"""
local removed = 0
for _, key in ipairs(KEYS) do
  local score = redis.call('ZSCORE', key, session_id)
  if score and tonumber(score) <= tonumber(last_active) then
    removed = removed + redis.call('ZREM', key, session_id)
  end
end
return removed
""",
)


@dataclass(frozen=True, slots=True)
class EnterIndexArgs:
    session_id: str
    now: str


# Cluster: a create's index step. The entry's score goes strictly up (to `now`, or just above the
# score already there, whatever the clocks of the servers that wrote them), and the reply is the
# score written, exactly: a later undo or removal compares against it, never against a clock.
# KEYS: the owner's index, and its index of the session's app (same slot, same score) if it has
# one; or an app's index alone.
ENTER_INDEX = LuaScript(
    ("index", "app_index"),
    EnterIndexArgs,
    r"""
local current = redis.call('ZSCORE', index, session_id)
local score = now
if current and tonumber(current) >= tonumber(now) then
  score = string.format(TIME_FORMAT, tonumber(current) + 0.000001)
end
redis.call('ZADD', index, score, session_id)
if app_index then redis.call('ZADD', app_index, score, session_id) end
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
    app_previous: str
    """the same for the second key (app_index), when given"""


# Cluster: a create that found the id taken undoes its index step (KEYS as ENTER_INDEX's: the
# first key's score tells whether the entries are still the step's).
REVERT_INDEX = LuaScript(
    ("index", "app_index"),
    RevertIndexArgs,
    r"""
local score = redis.call('ZSCORE', index, session_id)
if not score or tonumber(score) ~= tonumber(score_set) then return 0 end
local function put_back(key, score_before)
  if score_before == '' then redis.call('ZREM', key, session_id)
  else redis.call('ZADD', key, 'XX', score_before, session_id) end
end
put_back(index, previous)
if app_index then put_back(app_index, app_previous) end
return 1
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
    """the session's last_active, for the owner's index (when KEYS holds it): set as it is, unless
    a step of the session with a higher message_count was synced already"""


# Cluster: an append's (or a create's, a fork's) second step, in the user's slot. It counts what
# the session's counters say is new since the last step that reached here (usage_seen), so a
# step repeated by a replay counts nothing, and one that failed is made up by the session's next
# step. KEYS: the owner's index too after an append (its score set to the session's last_active,
# unless a later step of the session got here first), and the owner's index of the session's app
# when it has one. Replies {new, late}: late (1) when a later step got here first.
USAGE_SYNC = LuaScript(
    ("usage", "seen", "index", "app_index"),
    UsageSyncArgs,
    USAGE_LUA
    + r"""
local mc, tc = tonumber(message_count), tonumber(token_count)
local from_m, from_t, new
local rec = redis.call('HGET', seen, session_id)
if rec then
  local c, rm, rt = string.match(rec, '^(%S+) (%d+) (%d+)')
  if tonumber(c) == tonumber(created_at) then from_m, from_t, new = tonumber(rm), tonumber(rt), 0 end
end
-- A step that saw fewer messages than the last one synced arrives late: its last_active is older.
local stale = from_m ~= nil and mc < from_m
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
-- The score is the session's last_active as of the newest step (a caller's created_at may have
-- moved it back: an import), set unless this step is late.
if index and not stale then redis.call('ZADD', index, index_score, session_id) end
if app_index and not stale then redis.call('ZADD', app_index, index_score, session_id) end
return {new, stale and 1 or 0}
""",
)

ALL: tuple[LuaScript[Any], ...] = (
    PRUNE_INDEX,
    PRUNE_STALE,
    UNINDEX,
    ENTER_INDEX,
    REVERT_INDEX,
    USAGE_SYNC,
)
