"""Scripts of a state: a JSON map of a session (`state:{<session_id>}`, in the session's slot) or
shared by a user's sessions (`user_state:{<user_id>}`, in the user's slot); see keys.py.

A state HASH holds key -> the value's JSON text, as Python wrote it (a Lua script never decodes or
re-encodes a value: cjson would change its numbers), and the field STATE_BYTES_FIELD -> the bytes
of every key and value, kept by each change, so that the limits cost a change only what it
touches. An empty state is no key at all.

STATE_LUA (apply_state_delta) is shared with the session scripts that change a state in their own
step: APPEND (AppendMessagesRequest.state_delta) and FORK_WRITE (the copied state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatsession_server.store.lua.runtime import LuaScript

STATE_LUA = r"""
-- Applies `delta` (codec.encode_state_delta: '' for none, else the JSON
-- [[key, json text, ...], [key to remove, ...]]; cjson gives its strings back byte for byte, and
-- the values are only ever strings here) to the state HASH `state`. Checks before it writes: when
-- the state would hold more than `max_keys` keys or `max_bytes` bytes (0: no cap) and more than
-- it holds now (a state over a lowered limit may still shrink), it writes nothing and returns
-- {ST_STATE_FULL, keys, bytes}; else nil.
local function apply_state_delta(state, delta, max_keys, max_bytes)
  if delta == '' then return nil end
  local change = cjson.decode(delta)
  local to_set, to_remove = change[1], change[2]
  local counted = redis.call('HGET', state, STATE_BYTES_FIELD)
  local keys = redis.call('HLEN', state) - (counted and 1 or 0)
  local bytes = tonumber(counted or '0')
  local keys_before, bytes_before = keys, bytes
  for i = 1, #to_set, 2 do
    -- A value's JSON text is never empty: a length of 0 is a key that is not there.
    local held = redis.call('HSTRLEN', state, to_set[i])
    if held > 0 then bytes = bytes - #to_set[i] - held else keys = keys + 1 end
    bytes = bytes + #to_set[i] + #to_set[i + 1]
  end
  local removed = {}
  for _, key in ipairs(to_remove) do
    local held = redis.call('HSTRLEN', state, key)
    if held > 0 then
      keys, bytes = keys - 1, bytes - #key - held
      removed[#removed + 1] = key
    end
  end
  max_keys, max_bytes = tonumber(max_keys), tonumber(max_bytes)
  if (max_keys > 0 and keys > max_keys and keys > keys_before)
      or (max_bytes > 0 and bytes > max_bytes and bytes > bytes_before) then
    return {ST_STATE_FULL, keys, bytes}
  end
  if keys <= 0 then
    redis.call('DEL', state)
    return nil
  end
  -- In slices: unpack takes a few thousand values at most (1000 is even: no pair is split).
  for from = 1, #to_set, 1000 do
    redis.call('HSET', state, unpack(to_set, from, math.min(from + 999, #to_set)))
  end
  for from = 1, #removed, 1000 do
    redis.call('HDEL', state, unpack(removed, from, math.min(from + 999, #removed)))
  end
  redis.call('HSET', state, STATE_BYTES_FIELD, string.format('%d', bytes))
  return nil
end
"""


@dataclass(frozen=True, slots=True)
class GetStateArgs:
    owners: str
    """see `owners_arg`; a user's state (no `meta` key given) is checked by the caller"""
    keys: Sequence[str]
    """the keys to read; none: the whole state"""


# KEYS: meta is given for a session's state only (its owner is checked in the same step).
# Replies {ST_OK, HGETALL state} for the whole state, else {ST_OK, HMGET state keys...}.
GET_STATE = LuaScript(
    ("state", "meta"),
    GetStateArgs,
    r"""
if meta then
  local uid = redis.call('HGET', meta, F_USER_ID)
  if not uid or not owned(owners, uid, meta) then return {ST_NOT_FOUND} end
end
if #ARGV < keys_from then return {ST_OK, redis.call('HGETALL', state)} end
return {ST_OK, redis.call('HMGET', state, unpack(ARGV, keys_from))}
""",
    read_only=True,
)


@dataclass(frozen=True, slots=True)
class UpdateStateArgs:
    owners: str
    """see `owners_arg`; a user's state (no `meta` key given) is checked by the caller"""
    max_keys: int
    max_bytes: int
    delta: str
    """codec.encode_state_delta's"""


# KEYS: meta is given for a session's state only. A session's state takes the expiry the session
# has: changing it alone is no message, and restarts no clock (an append with a state_delta does).
UPDATE_STATE = LuaScript(
    ("state", "meta"),
    UpdateStateArgs,
    STATE_LUA
    + r"""
if meta then
  local uid = redis.call('HGET', meta, F_USER_ID)
  if not uid or not owned(owners, uid, meta) then return {ST_NOT_FOUND} end
end
local refused = apply_state_delta(state, delta, max_keys, max_bytes)
if refused then return refused end
if meta then expire_with_meta(meta, state) end
return {ST_OK, redis.call('HGETALL', state)}
""",
)

ALL: tuple[LuaScript[Any], ...] = (GET_STATE, UPDATE_STATE)
