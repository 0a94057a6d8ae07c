"""State: a JSON map per session (and one per user), through a real server, Valkey and channel,
with the keys checked by a raw client."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from glide import GlideClient
from google.protobuf import struct_pb2

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestIdReusedError,
    SeqMismatchError,
    SessionClient,
    StateFullError,
    SyncSessionClient,
    state_delta,
    system,
    user,
)
from chatsession_server.settings import Settings
from tests.helpers import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    CAROL,
    SERVICE_TOKEN,
    client_for,
    grpcurl,
    raises,
    serving,
    violated_fields,
)
from tests.test_cli import cli

EVERY_KIND = {
    "name": "Åsa 🌍",
    "count": 3,
    "ratio": 0.1,
    "big": 2**53,
    "negative": -7,
    "flag": True,
    "nothing": None,
    "nested": {"list": [1, "two", [3.5, False], {}], "empty": []},
}


def state_key(session_id: str) -> str:
    return f"state:{{{session_id}}}"


async def raw_state(raw: GlideClient, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await raw.hgetall(key)).items()}


def counted_bytes(held: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in held.items() if k)


async def new_session(client: SessionClient, uid: str, **kw: Any) -> str:
    return (await client.create_session(uid, **kw)).session_id


# --- A session's state -------------------------------------------------------------------------


async def test_update_state_sets_and_removes_keys_and_get_state_reads_it_whole_or_by_key(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    assert await client.get_state(session_id) == {}
    after = await client.update_state(session_id, EVERY_KIND)
    assert after == EVERY_KIND
    assert isinstance(after["count"], int)
    assert isinstance(after["ratio"], float)
    assert await client.get_state(session_id) == EVERY_KIND
    assert await client.get_state(session_id, keys=["count", "absent", "nested"]) == {
        "count": 3,
        "nested": EVERY_KIND["nested"],
    }

    held = await raw_state(raw, state_key(session_id))
    # The JSON text as Python wrote it: integers without a fraction, nothing re-encoded.
    assert held["count"] == "3"
    assert held["big"] == str(2**53)
    assert held["name"] == json.dumps("Åsa 🌍", ensure_ascii=False)
    assert json.loads(held["nested"]) == EVERY_KIND["nested"]
    assert int(held[""]) == counted_bytes(held)

    after = await client.update_state(session_id, {"count": 4, "extra": "x"}, remove=["name", "never-set"])
    assert after == {**{k: v for k, v in EVERY_KIND.items() if k != "name"}, "count": 4, "extra": "x"}
    held = await raw_state(raw, state_key(session_id))
    assert "name" not in held
    assert int(held[""]) == counted_bytes(held)

    assert await client.update_state(session_id, remove=list(after)) == {}
    assert not await raw.exists([state_key(session_id)])  # an empty state is no key at all


async def test_an_empty_update_changes_nothing_and_returns_the_state(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    assert await client.update_state(session_id) == {}
    assert not await raw.exists([state_key(session_id)])
    await client.update_state(session_id, {"a": 1})
    assert await client.update_state(session_id) == {"a": 1}


async def test_a_session_state_expires_with_the_session(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid, ttl_seconds=500)
    meta_key = f"meta:{{{session_id}}}"
    await raw.expire(meta_key, 300)  # as if time had passed since the last activity
    await client.update_state(session_id, {"a": 1})
    # Changing the state alone takes the session's remaining time, restarting no clock.
    assert 298 <= await raw.ttl(state_key(session_id)) <= await raw.ttl(meta_key) <= 300
    await client.append(session_id, [user("hi")])  # an append restarts every key's clock
    assert await raw.ttl(state_key(session_id)) == await raw.ttl(meta_key) == 500
    await client.update_session(session_id, ttl_seconds=900)
    assert await raw.ttl(state_key(session_id)) == await raw.ttl(meta_key) == 900


async def test_deleting_a_session_deletes_its_state(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    await client.update_state(session_id, {"a": 1})
    await client.delete_session(session_id)
    assert not await raw.exists([state_key(session_id)])
    await raises(NotFoundError, client.get_state(session_id))


async def test_a_fork_copies_the_state_as_it_is_now(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid, ttl_seconds=700)
    await client.append(session_id, [user("one"), user("two")])
    await client.update_state(session_id, EVERY_KIND)
    fork = (await client.fork_session(session_id, at_seq=1)).session
    assert await client.get_state(fork.session_id) == EVERY_KIND
    assert await raw_state(raw, state_key(fork.session_id)) == await raw_state(raw, state_key(session_id))
    assert await raw.ttl(state_key(fork.session_id)) == await raw.ttl(f"meta:{{{fork.session_id}}}") == 700
    # Apart from then on.
    await client.update_state(fork.session_id, {"count": 99})
    assert (await client.get_state(session_id, keys=["count"])) == {"count": 3}


async def test_a_fork_of_a_session_without_state_has_none(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    fork = (await client.fork_session(session_id)).session
    assert await client.get_state(fork.session_id) == {}
    assert not await raw.exists([state_key(fork.session_id)])


async def test_clearing_and_compacting_keep_the_state(client: SessionClient, uid: str) -> None:
    session_id = await new_session(client, uid)
    await client.append(session_id, [system("be brief"), user("a"), user("b"), user("c")])
    await client.update_state(session_id, {"a": 1})
    await client.compact_messages(session_id, 3, system("summary"))
    await client.clear_messages(session_id)
    assert await client.get_state(session_id) == {"a": 1}


async def test_a_session_created_over_an_expired_namesake_starts_with_no_state(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid, session_id=f"{uid}-again")
    await client.update_state(session_id, {"old": True})
    await raw.delete([f"meta:{{{session_id}}}"])  # the keys expire a moment apart: meta first
    await client.create_session(uid, session_id=session_id)
    assert await client.get_state(session_id) == {}


async def test_the_state_of_a_missing_session_is_not_found_and_nothing_is_written(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    missing = f"{uid}-missing"
    await raises(NotFoundError, client.get_state(missing))
    await raises(NotFoundError, client.update_state(missing, {"a": 1}))
    assert not await raw.exists([state_key(missing)])


async def test_concurrent_updates_of_distinct_keys_lose_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    await asyncio.gather(*(client.update_state(session_id, {f"k{i}": i}) for i in range(100)))
    assert await client.get_state(session_id) == {f"k{i}": i for i in range(100)}
    held = await raw_state(raw, state_key(session_id))
    assert int(held[""]) == counted_bytes(held)
    await asyncio.gather(*(client.update_state(session_id, remove=[f"k{i}"]) for i in range(0, 100, 2)))
    held = await raw_state(raw, state_key(session_id))
    assert set(held) == {""} | {f"k{i}" for i in range(1, 100, 2)}
    assert int(held[""]) == counted_bytes(held)


def _deep_list(depth: int) -> struct_pb2.Value:
    value = struct_pb2.Value(number_value=1)
    for _ in range(depth):
        outer = struct_pb2.Value()
        outer.list_value.values.add().CopyFrom(value)
        value = outer
    return value


def _deep_object(depth: int) -> Any:
    obj: Any = 1
    for _ in range(depth):
        obj = {"a": obj}
    return obj


def _delta(**values: struct_pb2.Value) -> pb.StateDelta:
    delta = pb.StateDelta()
    for key, value in values.items():
        delta.set[key].CopyFrom(value)
    return delta


TEXT = struct_pb2.Value(string_value="v")
HOSTILE_UPDATES: list[tuple[str, pb.UpdateStateRequest, str]] = [
    ("no scope", pb.UpdateStateRequest(delta=_delta(a=TEXT)), "scope"),
    ("an empty scope", pb.UpdateStateRequest(scope=pb.StateScope(), delta=_delta(a=TEXT)), "scope"),
    (
        "an empty session id",
        pb.UpdateStateRequest(scope=pb.StateScope(session_id=""), delta=_delta(a=TEXT)),
        "scope.session_id",
    ),
    (
        "a session id with braces",
        pb.UpdateStateRequest(scope=pb.StateScope(session_id="a}{b"), delta=_delta(a=TEXT)),
        "scope.session_id",
    ),
    (
        "a user id with spaces",
        pb.UpdateStateRequest(scope=pb.StateScope(user_id="a b"), delta=_delta(a=TEXT)),
        "scope.user_id",
    ),
]
HOSTILE_DELTAS: list[tuple[str, pb.StateDelta, str]] = [
    ("an empty key", _delta(**{"": TEXT}), "delta.set['']"),
    ("a key of 257 bytes", _delta(**{"é" * 128 + "x": TEXT}), "delta.set['" + "é" * 128 + "x']"),
    ("a key with a newline", _delta(**{"a\nb": TEXT}), "delta.set['a\\nb']"),
    ("a key with a C1 control", _delta(**{"a\x85": TEXT}), "delta.set['a\\x85']"),
    ("a value over 256 KiB", _delta(a=struct_pb2.Value(string_value="x" * 262_143)), "delta.set['a']"),
    ("a value 33 deep", _delta(a=_deep_list(33)), "delta.set['a']"),
    ("NaN", _delta(a=struct_pb2.Value(number_value=float("nan"))), "delta.set['a']"),
    ("infinity", _delta(a=struct_pb2.Value(number_value=float("-inf"))), "delta.set['a']"),
    ("a key set and removed", pb.StateDelta(set={"a": TEXT}, remove=["a"]), "delta.remove[0]"),
    ("a removed key with a tab", pb.StateDelta(remove=["ok", "a\tb"]), "delta.remove[1]"),
    ("1001 keys", pb.StateDelta(remove=[f"k{i}" for i in range(1001)]), "delta"),
]


@pytest.mark.parametrize(("case", "delta", "field"), HOSTILE_DELTAS, ids=[c[0] for c in HOSTILE_DELTAS])
async def test_a_hostile_delta_is_invalid_naming_the_field_and_changes_nothing(
    target: str,
    client: SessionClient,
    raw: GlideClient,
    uid: str,
    case: str,
    delta: pb.StateDelta,
    field: str,
) -> None:
    session_id = await new_session(client, uid)
    await client.update_state(session_id, {"kept": 1})
    before = await raw_state(raw, state_key(session_id))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        request = pb.UpdateStateRequest(scope=pb.StateScope(session_id=session_id), delta=delta)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UpdateState(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        # The same delta on an append refuses the messages too.
        append = pb.AppendMessagesRequest(session_id=session_id, messages=[user("hi")], state_delta=delta)
        with pytest.raises(grpc.aio.AioRpcError) as appended:
            await stub.AppendMessages(append)
        assert appended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await raises(InvalidArgumentError, _update_with(client, request))
    fields = violated_fields(error)
    # (A long field name comes cut, with an ellipsis.)
    assert any(f == field or (f.endswith("…") and field.startswith(f[:-1])) for f in fields), (case, fields)
    assert await raw_state(raw, state_key(session_id)) == before
    assert (await client.get_session(session_id)).message_count == 0


async def _update_with(client: SessionClient, request: pb.UpdateStateRequest) -> Any:
    """A request as built, through the client's own error mapping."""
    return await client._call(client._stub.UpdateState, request)


@pytest.mark.parametrize(("case", "request_", "field"), HOSTILE_UPDATES, ids=[c[0] for c in HOSTILE_UPDATES])
async def test_a_missing_or_bad_scope_is_invalid_naming_it(
    client: SessionClient, case: str, request_: pb.UpdateStateRequest, field: str
) -> None:
    error = await raises(InvalidArgumentError, _update_with(client, request_))
    assert field in violated_fields(error)
    get = pb.GetStateRequest(scope=request_.scope) if request_.HasField("scope") else pb.GetStateRequest()
    error = await raises(InvalidArgumentError, client._call(client._stub.GetState, get))
    assert field in violated_fields(error)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads here are shorter than 2**14)."""
    size = len(payload)
    varint = bytes([size]) if size < 0x80 else bytes([size & 0x7F | 0x80, size >> 7])
    return bytes([number << 3 | 2]) + varint + payload


async def test_a_value_nested_past_what_protobuf_parses_is_invalid(
    target: str, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    value = struct_pb2.Value(number_value=1)
    for _ in range(40):  # 3 messages an object: past upb's 100 before validation sees it
        outer = struct_pb2.Value()
        outer.struct_value.fields["a"].CopyFrom(value)
        value = outer
    # Written as wire bytes: this protobuf refuses to build (parse) such a message itself.
    entry = _field(1, b"a") + _field(2, value.SerializeToString())
    scope = pb.StateScope(session_id=session_id).SerializeToString()
    request = _field(1, scope) + _field(2, _field(1, entry))
    async with grpc.aio.insecure_channel(target) as channel:
        update: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/chatsession.v1.SessionService/UpdateState"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await update(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert not await raw.exists([state_key(session_id)])


async def test_get_state_refuses_bad_or_too_many_keys(client: SessionClient, uid: str) -> None:
    session_id = await new_session(client, uid)
    error = await raises(InvalidArgumentError, client.get_state(session_id, keys=["ok", "", "a\x00"]))
    assert violated_fields(error) == {"keys[1]", "keys[2]"}
    error = await raises(
        InvalidArgumentError, client.get_state(session_id, keys=[f"k{i}" for i in range(1001)])
    )
    assert violated_fields(error) == {"keys"}


async def test_a_value_32_deep_round_trips(client: SessionClient, uid: str) -> None:
    session_id = await new_session(client, uid)
    deep = _deep_object(32)
    assert await client.update_state(session_id, {"deep": deep}) == {"deep": deep}
    assert await client.get_state(session_id) == {"deep": deep}


async def test_a_value_of_256_kib_is_allowed(client: SessionClient, uid: str) -> None:
    session_id = await new_session(client, uid)
    text = "x" * (256 * 1024 - 2)  # with its quotes: 256 KiB of JSON
    assert await client.update_state(session_id, {"big": text}) == {"big": text}


async def test_a_state_at_the_default_limit_dense_in_numbers_reads_whole(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    """The worst case for a reply: JSON digits are 5.5 times larger as protobuf Values; a state at
    the default --max-state-bytes still fits a default client's 4 MiB."""
    session_id = await new_session(client, uid)
    digits = [0] * 130_000  # "[0,0,...]": 260 KB of JSON each
    await client.update_state(session_id, {"a": digits})
    await client.update_state(session_id, {"b": digits})
    held = await raw_state(raw, state_key(session_id))
    assert 500_000 < int(held[""]) <= Settings().max_state_bytes
    state = await client.get_state(session_id)
    assert state == {"a": digits, "b": digits}


@pytest.fixture(scope="module")
async def small_states(settings: Settings, valkey_url: str) -> AsyncIterator[SessionClient]:
    """A server whose states hold at most 3 keys and 100 bytes."""
    async with (
        serving(settings, valkey_url, max_state_keys=3, max_state_bytes=100) as running,
        SessionClient(f"127.0.0.1:{running.port}") as client,
    ):
        yield client


async def test_a_change_past_the_limits_is_state_full_and_changes_nothing(
    small_states: SessionClient, raw: GlideClient, uid: str
) -> None:
    client = small_states
    session_id = await new_session(client, uid)
    await client.update_state(session_id, {"a": 1, "b": 2, "c": 3})
    before = await raw_state(raw, state_key(session_id))
    error = await raises(StateFullError, client.update_state(session_id, {"d": 4}))
    assert error.precondition_violations[0].type == "STATE_FULL"
    assert error.precondition_violations[0].subject == "delta"
    assert "4 keys" in str(error)
    assert "--max-state-keys" in str(error)
    error = await raises(StateFullError, client.update_state(session_id, {"a": "x" * 100}))
    assert "--max-state-bytes" in str(error)
    assert await raw_state(raw, state_key(session_id)) == before
    # Replacing a key and removing another in one change fits.
    assert await client.update_state(session_id, {"d": 4}, remove=["a"]) == {"b": 2, "c": 3, "d": 4}


async def test_a_state_over_a_lowered_limit_may_still_shrink(
    client: SessionClient, small_states: SessionClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    await client.update_state(session_id, {f"k{i}": i for i in range(5)})  # the suite's server: no cap met
    await raises(FailedPreconditionError, small_states.update_state(session_id, {"k9": 9}))
    assert await small_states.update_state(session_id, remove=["k0"]) == {f"k{i}": i for i in range(1, 5)}


# --- With an append ----------------------------------------------------------------------------


async def test_an_append_changes_its_messages_and_the_state_in_one_step(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid, ttl_seconds=600)
    await client.update_state(session_id, {"turn": 0, "gone": "soon"})
    await raw.expire(f"meta:{{{session_id}}}", 100)
    await raw.expire(state_key(session_id), 100)
    reply = await client.append(
        session_id,
        [user("hi")],
        state_delta=state_delta({"turn": 1, "last": {"said": "hi"}}, remove=["gone"]),
    )
    assert reply.session.message_count == 1
    assert await client.get_state(session_id) == {"turn": 1, "last": {"said": "hi"}}
    assert await raw.ttl(state_key(session_id)) == 600  # restarted with the session's other keys
    # A plain mapping sets its keys.
    await client.append(session_id, [user("again")], state_delta={"turn": 2})
    assert (await client.get_state(session_id, keys=["turn"])) == {"turn": 2}


async def test_an_append_without_a_delta_keeps_the_state_and_restarts_its_clock(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid, ttl_seconds=600)
    await client.update_state(session_id, {"a": 1})
    await raw.expire(state_key(session_id), 100)
    await client.append(session_id, [user("hi")])
    assert await client.get_state(session_id) == {"a": 1}
    assert await raw.ttl(state_key(session_id)) == 600


async def test_a_refused_append_changes_no_state(
    client: SessionClient, small_states: SessionClient, raw: GlideClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    await client.append(session_id, [user("one")], state_delta={"a": 1})
    before = await raw_state(raw, state_key(session_id))
    # A stale expected_last_seq.
    await raises(
        SeqMismatchError, client.append(session_id, [user("two")], expected_last_seq=0, state_delta={"a": 2})
    )
    # A bad message beside a good delta.
    await raises(InvalidArgumentError, client.append(session_id, [user("")], state_delta={"a": 3}))
    # A state too full refuses the messages too.
    error = await raises(
        FailedPreconditionError, small_states.append(session_id, [user("two")], state_delta={"b": "x" * 200})
    )
    assert error.precondition_violations[0].type == "STATE_FULL"
    assert error.precondition_violations[0].subject == "state_delta"
    assert await raw_state(raw, state_key(session_id)) == before
    assert (await client.get_session(session_id)).message_count == 1


async def test_a_replayed_append_applies_its_delta_once(client: SessionClient, uid: str) -> None:
    session_id = await new_session(client, uid)
    first = await client.append(session_id, [user("hi")], request_id="r1", state_delta={"count": 1})
    await client.update_state(session_id, {"count": 5})
    again = await client.append(session_id, [user("hi")], request_id="r1", state_delta={"count": 1})
    assert again.replayed
    assert [m.seq for m in again.messages] == [m.seq for m in first.messages]
    assert await client.get_state(session_id) == {"count": 5}
    # The same request_id with another change is another request.
    await raises(
        RequestIdReusedError,
        client.append(session_id, [user("hi")], request_id="r1", state_delta={"count": 2}),
    )
    await raises(RequestIdReusedError, client.append(session_id, [user("hi")], request_id="r1"))
    # And an append recorded without a change is not one with a change.
    await client.append(session_id, [user("plain")], request_id="r2")
    await raises(
        RequestIdReusedError,
        client.append(session_id, [user("plain")], request_id="r2", state_delta={"x": 1}),
    )
    assert await client.get_state(session_id) == {"count": 5}


# --- A user's state ----------------------------------------------------------------------------


async def test_a_user_state_is_shared_by_the_user_and_never_expires(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    assert await client.get_state(user_id=uid) == {}
    assert await client.update_state(user_id=uid, values={"theme": "dark", "n": 1}) == {
        "theme": "dark",
        "n": 1,
    }
    session_id = await new_session(client, uid)
    await client.update_state(session_id, {"n": 2})  # a session's own state is apart
    await client.delete_session(session_id)
    assert await client.get_state(user_id=uid) == {"theme": "dark", "n": 1}
    assert await client.get_state(user_id=uid, keys=["n"]) == {"n": 1}
    key = f"user_state:{{{uid}}}"
    assert await raw.ttl(key) == -1
    held = await raw_state(raw, key)
    assert held["n"] == "1"
    assert int(held[""]) == counted_bytes(held)
    assert await client.update_state(user_id=uid, remove=["theme", "n"]) == {}
    assert not await raw.exists([key])


async def test_a_user_state_has_the_limits_of_a_session_state(small_states: SessionClient, uid: str) -> None:
    await small_states.update_state(user_id=uid, values={"a": 1, "b": 2, "c": 3})
    error = await raises(FailedPreconditionError, small_states.update_state(user_id=uid, values={"d": 4}))
    assert error.precondition_violations[0].type == "STATE_FULL"
    assert await small_states.get_state(user_id=uid) == {"a": 1, "b": 2, "c": 3}


# --- Who may read and change a state -----------------------------------------------------------


@pytest.fixture(scope="module")
async def auth_target(settings: Settings, valkey_url: str, tokens_file: Path) -> AsyncIterator[str]:
    async with serving(settings, valkey_url, auth_tokens_file=str(tokens_file)) as running:
        yield f"127.0.0.1:{running.port}"


async def test_another_users_session_state_is_not_found_and_their_user_state_is_denied(
    auth_target: str, raw: GlideClient, uid: str
) -> None:
    async with (
        client_for(auth_target, ALICE_TOKEN) as alice,
        client_for(auth_target, BOB_TOKEN) as bob,
        client_for(auth_target, SERVICE_TOKEN) as service,
    ):
        session_id = await new_session(alice, ALICE, session_id=f"{ALICE}/{uid}")
        await alice.update_state(session_id, {"secret": 1})
        await alice.update_state(user_id=ALICE, values={"secret": 2})
        await raises(NotFoundError, bob.get_state(session_id))
        await raises(NotFoundError, bob.update_state(session_id, {"secret": 0}))
        await raises(NotFoundError, bob.append(session_id, [user("x")], state_delta={"secret": 0}))
        await raises(PermissionDeniedError, bob.get_state(user_id=ALICE))
        await raises(PermissionDeniedError, bob.update_state(user_id=ALICE, values={"secret": 0}))
        assert await alice.get_state(session_id) == {"secret": 1}
        assert await alice.get_state(user_id=ALICE) == {"secret": 2}
        # A grant of two users reaches both; a grant of every user reaches any.
        assert await alice.update_state(user_id=CAROL, values={"c": 1}) == {"c": 1}
        assert await service.get_state(session_id) == {"secret": 1}
        assert await service.get_state(user_id=BOB) == {}
        await service.update_state(user_id=ALICE, remove=["secret"])
        await alice.update_state(user_id=CAROL, remove=["c"])
    assert not await raw.exists([f"user_state:{{{ALICE}}}"])


# --- Other clients -----------------------------------------------------------------------------


async def test_grpcurl_shows_state_values_as_json(target: str, client: SessionClient, uid: str) -> None:
    session_id = await new_session(client, uid)
    body = {"scope": {"session_id": session_id}, "delta": {"set": {"cart": {"items": [1, 2.5]}, "n": None}}}
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps(body), target, "chatsession.v1.SessionService/UpdateState"
    )
    assert code == 0, out
    assert json.loads(out) == {"state": {"cart": {"items": [1, 2.5]}, "n": None}}
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps({"scope": {"session_id": session_id}, "keys": ["cart"]}), target,
        "chatsession.v1.SessionService/GetState",
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out) == {"state": {"cart": {"items": [1, 2.5]}}}
    assert await client.get_state(session_id) == {"cart": {"items": [1, 2.5]}, "n": None}


async def test_the_blocking_client_reads_and_changes_state(
    target: str, client: SessionClient, uid: str
) -> None:
    session_id = await new_session(client, uid)

    def use() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        with SyncSessionClient(target) as blocking:
            blocking.append(session_id, [user("hi")], state_delta={"a": [1, {"b": None}]})
            changed = blocking.update_state(session_id, {"c": 1.5}, remove=["a"])
            mine = blocking.update_state(user_id=uid, values={"u": True})
            return changed, blocking.get_state(session_id), mine

    changed, read, mine = await asyncio.to_thread(use)
    assert changed == read == {"c": 1.5}
    assert mine == {"u": True}


def test_the_client_refuses_what_json_cannot_hold_before_sending() -> None:
    with pytest.raises(TypeError):
        state_delta({"a": {1, 2}})
    with pytest.raises(TypeError):
        state_delta({"a": {1: "x"}})
    with pytest.raises(ValueError, match="2\\*\\*53"):
        state_delta({"a": 2**60})


# --- The README's State section, as a reader runs it ---------------------------------------------


def _readme_state_section() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("## State\n")
    return text[start : text.index("\n## ", start + 1)]


async def test_the_readme_state_recipes_run_in_order(target: str, client: SessionClient, uid: str) -> None:
    block = re.search(r"```sh\n(.*?)^```", _readme_state_section(), flags=re.MULTILINE | re.DOTALL)
    assert block is not None
    words = shlex.split(block.group(1).replace("\\\n", " "), comments=True)
    starts = [i for i, word in enumerate(words) if word == "grpcurl"]
    session_id = f"{uid}-trip"
    await client.create_session(uid, session_id=session_id)
    replies = []
    for start, end in zip(starts, [*starts[1:], len(words)], strict=True):
        args = [
            target
            if a == "localhost:50051"
            else a.replace("trip-42", session_id).replace("alice", uid).replace('"travel"', f'"{uid}-travel"')
            for a in words[start + 1 : end]
        ]
        code, out = await grpcurl(*args)
        assert code == 0, (args, out)
        replies.append(json.loads(out))
    assert replies[0] == {"state": {"cart": {"hotel": "Bristol", "nights": 3}, "step": "booking"}}
    assert replies[1]["messages"][0]["seq"] == "1"
    assert replies[2] == {"state": {"step": "done"}}
    assert replies[3] == {"state": {"home": "Bergen"}}
    assert replies[4] == {"state": {"banner": "Spring sale"}}


async def test_the_readme_state_snippet_runs_as_a_script(target: str, uid: str) -> None:
    code = re.search(r"```python\n(.*?)```", _readme_state_section(), re.DOTALL)
    assert code is not None
    script = code.group(1).replace("localhost:50051", target).replace('"alice"', repr(uid))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["{'rating': 5, 'step': 'done'}", "{'home': 'Bergen'}"]


# --- The command line --------------------------------------------------------------------------


async def test_the_command_line_reads_and_changes_a_state(
    target: str, client: SessionClient, uid: str
) -> None:
    session_id = await new_session(client, uid)
    result = await cli(
        "--address", target, "state", session_id, "--set", 'cart={"nights": 3}', "--set", "step=search",
        "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.json() == {"state": {"cart": {"nights": 3}, "step": "search"}}
    result = await cli(
        "--address", target, "append", session_id, "Book it.", "--state-set", "step=done",
        "--state-remove", "cart",
    )  # fmt: skip
    assert (result.code, result.out) == (0, "1\n"), result.err
    result = await cli("--address", target, "state", session_id)
    assert result.out == 'step: "done"\n'
    result = await cli("--address", target, "state", "--user", uid, "--set", "n=2", "--json")
    assert result.json() == {"state": {"n": 2}}
    result = await cli("--address", target, "state", "--user", uid, "--key", "n", "--key", "x")
    assert result.out == "n: 2\n"
    # One state, named once; a KEY=JSON pair; --key only to read.
    for argv in (["state"], ["state", session_id, "--user", uid], ["state", session_id, "--set", "novalue"]):
        result = await cli("--address", target, *argv)
        assert result.code == 2, argv
        assert result.err.count("\n") == 1
    result = await cli("--address", target, "state", session_id, "--set", "a=1", "--key", "a")
    assert result.code == 2
    result = await cli("--address", target, "state", session_id, "--set", "a\nb=1")
    assert result.code == 3  # INVALID_ARGUMENT, from the server
    assert "state keys" in result.err
