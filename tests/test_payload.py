"""A message's payload: any JSON value, stored as JSON text no script parses, and returned exactly
by every read (append and its replay, ListMessages, GetContext, WatchMessages, ForkSession),
untouched by compaction, clears and window trims; refused with a field-named INVALID_ARGUMENT
(nothing written) when too deep, too large or not JSON; shown as JSON by grpcurl."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from glide import GlideClient
from google.protobuf import struct_pb2

from chatsession.v1 import session_pb2
from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import (
    NO_RETRY,
    InvalidArgumentError,
    SessionClient,
    assistant,
    message,
    payload_of,
    payload_value,
    system,
    tool,
    user,
)
from chatsession_server.api.limits import (
    MAX_PAYLOAD_DEPTH,
    MAX_PAYLOAD_VALUES,
    MAX_PAYLOAD_VALUES_PER_APPEND,
    REPLY_BYTES_PER_VALUE,
)
from chatsession_server.api.payload import payload_field, payload_json
from chatsession_server.app import RunningServer
from chatsession_server.settings import Settings
from chatsession_server.store import session_store
from tests.helpers import (
    eventually,
    grpcurl,
    meta,
    raises,
    serving,
    stored_messages,
    subscribers,
    violated_fields,
)

# Values a JSON round trip through Lua's cjson (14 significant digits) or a careless converter
# would change.
TRICKY: list[Any] = [
    0.1 + 0.2,  # 0.30000000000000004: 17 significant digits
    1.2345678901234567,
    -9.87654321098765e-300,
    5e-324,
    1.7976931348623157e308,
    2**53,
    -(2**53),
    2**53 - 1,
    123456789012345,
    'unicode é 日本 🎉, escapes " \\ / \n \t \u0000 \u2028 and a lone \u001f',
    {"nested": [[{"a": [1, {"b": None}]}], []], "t": True, "f": False, "": "empty key", 'q"k': 2},
    {},
    [],
    None,
    True,
    False,
    "",
    0,
    -0.0,
    1.5,
    [0.1, 2.5e-10, -3, {"x": [{}]}],
]


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, with -0.0 told from 0 and a bool from a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a == 0:
        return isinstance(b, float) and b == 0 and math.copysign(1, a) == math.copysign(1, b)
    return (
        type(a) is type(b) and a == b
        if not isinstance(a, int | float)
        else a == b and type(b) in (int, float)
    )


def assert_payloads(messages: Any, expected: list[Any]) -> None:
    got = [payload_of(m) for m in messages]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert same(g, e), (g, e)
    for m in messages:
        assert m.HasField("payload")


def tricky_messages() -> list[session_pb2.Message]:
    return [user(f"m{i}", tokens=1, payload=value) for i, value in enumerate(TRICKY)]


async def test_every_read_returns_the_payload_exactly(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session = await client.create_session(uid, session_id=f"{uid}-p")
    sid = session.session_id
    watched: list[session_pb2.Message] = []

    async def watch() -> None:
        async for event in client.watch(sid, after_seq=0):
            if event.HasField("message"):
                watched.append(event.message)

    watcher = asyncio.create_task(watch())
    try:
        appended = await client.append(sid, tricky_messages(), request_id="r1")
        assert_payloads(appended.messages, TRICKY)
        replay = await client.append(sid, tricky_messages(), request_id="r1")
        assert replay.replayed
        assert_payloads(replay.messages, TRICKY)
        assert list(replay.messages) == list(appended.messages)  # protobuf equality, created_at too
        page = await client.list_messages(sid, page_size=100)
        assert_payloads(page.messages, TRICKY)
        context = await client.get_context(sid)
        assert_payloads(context.messages, TRICKY)
        await eventually(lambda: len(watched) == len(TRICKY))
        assert_payloads(watched, TRICKY)
        fork = await client.fork_session(sid, new_session_id=f"{uid}-pf")
        assert_payloads((await client.list_messages(fork.session.session_id, page_size=100)).messages, TRICKY)
    finally:
        watcher.cancel()

    # Stored as a JSON string holding the payload's JSON text, numbers in their shortest exact form.
    items = await stored_messages(raw, sid)
    assert [type(item["payload"]) for item in items] == [str] * len(TRICKY)
    assert items[0]["payload"] == "0.30000000000000004"
    assert items[5]["payload"] == str(2**53)
    assert items[18]["payload"] == "-0.0"
    for item, value in zip(items, TRICKY, strict=True):
        assert same(json.loads(item["payload"]), value)
    assert (await client.get_session(sid)).message_count == len(TRICKY)


async def test_a_message_without_a_payload_stores_nothing_of_one(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    session = await client.create_session(uid)
    sid = session.session_id
    await client.append(sid, [user("first", tokens=1)])
    # A session that never stored a payload is marked as such: its reads look for none.
    assert "payloads" not in await meta(raw, sid)
    reply = await client.append(sid, [user("plain", tokens=1), user("null", payload=None)])
    assert not reply.messages[0].HasField("payload")
    assert reply.messages[1].HasField("payload")
    assert payload_of(reply.messages[1], "none") is None
    assert payload_of(reply.messages[0], "none") == "none"
    _, plain, null = await stored_messages(raw, sid)
    assert (await meta(raw, sid))["payloads"] == "1"
    assert "payload" not in plain
    assert "reply_bytes" not in plain
    assert null["payload"] == "null"
    listed = (await client.list_messages(sid)).messages
    assert not listed[1].HasField("payload")
    assert listed[2].HasField("payload")
    # A compaction's summary with a payload marks a session too.
    other = (await client.create_session(uid)).session_id
    await client.append(other, [user("a"), user("b")])
    await client.compact_messages(other, 1, assistant("sum", payload={"k": 1}))
    assert (await meta(raw, other))["payloads"] == "1"


async def test_compaction_clear_and_window_trims_leave_payloads_as_they_are(
    client: SessionClient, uid: str
) -> None:
    session = await client.create_session(uid, max_messages=4)
    sid = session.session_id
    prompt = system("be exact", payload={"prompt": 0.30000000000000004})
    await client.append(sid, [prompt])
    values = [{"turn": i, "x": 1 / (i + 3), "big": 2**53 - i} for i in range(8)]
    for i, value in enumerate(values):
        await client.append(sid, [user(f"u{i}", tokens=2, payload=value)])
    # The window keeps the prompt and the newest three.
    page = await client.list_messages(sid)
    assert_payloads(page.messages, [{"prompt": 0.30000000000000004}, *values[-3:]])

    summary = assistant("summary so far", tokens=3, payload={"summary_of": [6, 7], "pi": math.pi})
    last = page.messages[-1].seq
    compacted = await client.compact_messages(sid, last - 1, summary)
    assert same(payload_of(compacted.summary), {"summary_of": [6, 7], "pi": math.pi})
    page = await client.list_messages(sid)
    assert_payloads(
        page.messages, [{"prompt": 0.30000000000000004}, {"summary_of": [6, 7], "pi": math.pi}, values[-1]]
    )
    context = await client.get_context(sid)
    assert [payload_of(m) for m in context.messages] == [payload_of(m) for m in page.messages]
    # A fork of a compacted session carries the summary's payload too.
    fork = await client.fork_session(sid)
    forked = (await client.list_messages(fork.session.session_id)).messages
    assert [payload_of(m) for m in forked] == [payload_of(m) for m in page.messages]

    await client.clear_messages(sid, keep_system_prompt=True)
    assert_payloads((await client.list_messages(sid)).messages, [{"prompt": 0.30000000000000004}])
    await client.append(sid, [tool("r", tool_call_id="c1", payload=[-0.0, "x"])])
    assert_payloads(
        (await client.list_messages(sid)).messages, [{"prompt": 0.30000000000000004}, [-0.0, "x"]]
    )


def deep(levels: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value} if kind == "object" else [value]
    return value


@pytest.mark.parametrize("kind", ["object", "list"])
async def test_a_payload_nested_deeper_than_the_limit_is_refused_and_nothing_written(
    client: SessionClient, raw: GlideClient, uid: str, kind: str
) -> None:
    session = await client.create_session(uid)
    sid = session.session_id
    ok = await client.append(sid, [user("deepest allowed", payload=deep(MAX_PAYLOAD_DEPTH, kind))])
    assert same(payload_of(ok.messages[0]), deep(MAX_PAYLOAD_DEPTH, kind))
    error = await raises(
        InvalidArgumentError,
        client.append(sid, [user("fine"), user("too deep", payload=deep(MAX_PAYLOAD_DEPTH + 1, kind))]),
    )
    assert violated_fields(error) == {"messages[1].payload"}
    assert f"at most {MAX_PAYLOAD_DEPTH} levels" in error.field_violations[0].description
    assert (await meta(raw, sid))["message_count"] == "1"
    assert len(await stored_messages(raw, sid)) == 1


async def test_a_payload_no_decoder_could_read_back_is_refused_with_invalid_argument(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    # Deeper than protobuf's own parsers go (100 levels of messages): still the caller's error.
    session = await client.create_session(uid)
    sid = session.session_id
    request = pb.AppendMessagesRequest(session_id=sid, messages=[user("x")])
    value = struct_pb2.Value(number_value=1)
    for _ in range(60):
        outer = struct_pb2.Value()
        outer.struct_value.fields["a"].CopyFrom(value)
        value = outer
    request.messages[0].payload.CopyFrom(value)
    error = await raises(InvalidArgumentError, client._call(client._stub.AppendMessages, request))
    assert error.code.name == "INVALID_ARGUMENT"
    assert (await meta(raw, sid))["message_count"] == "0"


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
async def test_a_payload_number_json_cannot_hold_is_refused(
    client: SessionClient, raw: GlideClient, uid: str, number: float
) -> None:
    session = await client.create_session(uid)
    sid = session.session_id
    bad = user("x")
    bad.payload.list_value.values.add().number_value = number  # what a careless client could send
    error = await raises(InvalidArgumentError, client.append(sid, [user("ok"), bad]))
    assert violated_fields(error) == {"messages[1].payload"}
    assert "NaN or an infinity" in error.field_violations[0].description
    assert await stored_messages(raw, sid) == []


async def test_a_payload_counts_in_the_message_size_limit(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_message_bytes=4096) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        sid = (await c.create_session(uid)).session_id
        await c.append(sid, [user("fits", payload={"blob": "x" * 3000})])
        error = await raises(
            InvalidArgumentError, c.append(sid, [user("too big", payload={"blob": "x" * 5000})])
        )
        assert {"messages[0].payload", "messages[0]"} == violated_fields(error)
        error = await raises(
            InvalidArgumentError, c.append(sid, [user("y" * 800, payload={"blob": "x" * 3500})])
        )
        assert violated_fields(error) == {"messages[0]"}  # the payload fits; the whole message does not
        assert len(await stored_messages(raw, sid)) == 1


async def test_a_page_or_context_of_payloads_converts_a_bounded_number_of_values(
    settings: Settings, valkey_url: str, uid: str, server: RunningServer
) -> None:
    # Converting a payload costs CPU per value, and small numbers are 2 bytes of JSON each but 11
    # encoded: pages and contexts count a payload message as 64 bytes a value at the least (or its
    # encoded size when more), so a reply converts at most about 49000 values and fits the 4 MiB
    # a default client takes.
    async with SessionClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as c:
        sid = (await c.create_session(uid, max_messages=-1)).session_id
        numbers = [7] * (MAX_PAYLOAD_VALUES - 1)  # ~20 KB stored, ~110 KB encoded, 640 KB counted
        for _ in range(8):
            await c.append(sid, [user("n", tokens=1, payload=numbers)])
        page = await c.list_messages(sid, page_size=100)
        assert page.has_more
        assert len(page.messages) == 3 * 1024 * 1024 // (MAX_PAYLOAD_VALUES * REPLY_BYTES_PER_VALUE)
        assert page.ByteSize() < 4 * 1024 * 1024
        read = [m async for m in c.iter_messages(sid)]
        assert len(read) == 8
        assert all(payload_of(m) == numbers for m in read)
        # A fork's pages are counted the same way (it is marked as holding payloads too).
        fork = (await c.fork_session(sid)).session.session_id
        forked = await c.list_messages(fork, page_size=100)
        assert forked.has_more
        assert len(forked.messages) == len(page.messages)
        context = await c.get_context(sid)
        assert context.truncated
        assert len(context.messages) == len(page.messages)
        assert all(payload_of(m) == numbers for m in context.messages)


async def test_a_payload_or_an_append_with_too_many_values_is_refused(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid)).session_id
    error = await raises(
        InvalidArgumentError, client.append(sid, [user("x", payload=[None] * MAX_PAYLOAD_VALUES)])
    )
    assert violated_fields(error) == {"messages[0].payload"}
    assert f"at most {MAX_PAYLOAD_VALUES} values" in error.field_violations[0].description
    # Each within the limit, together past the request's.
    part = [None] * (MAX_PAYLOAD_VALUES_PER_APPEND // 2 - 10)
    messages = [user("a", payload=part), user("b", payload=part), user("c", payload=[1] * 30), user("d")]
    error = await raises(InvalidArgumentError, client.append(sid, messages))
    assert violated_fields(error) == {"messages[2].payload"}
    assert f"past {MAX_PAYLOAD_VALUES_PER_APPEND} values" in error.field_violations[0].description
    assert await stored_messages(raw, sid) == []
    assert len((await client.append(sid, messages[:2])).messages) == 2


async def test_grpcurl_sends_and_shows_a_payload_as_json(target: str, uid: str) -> None:
    sid = f"{uid}-gp"
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps({"user_id": uid, "session_id": sid}),
        target, "chatsession.v1.SessionService/CreateSession",
    )  # fmt: skip
    assert code == 0, out
    payload = {"type": "function_call", "arguments": {"x": 0.30000000000000004, "n": [1, None, True]}}
    body = {"session_id": sid, "messages": [{"role": "ROLE_USER", "content": "hi", "payload": payload}]}
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps(body), target, "chatsession.v1.SessionService/AppendMessages"
    )
    assert code == 0, out
    assert json.loads(out)["messages"][0]["payload"] == payload
    code, out = await grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"session_id": sid}),
        target,
        "chatsession.v1.SessionService/ListMessages",
    )
    assert code == 0, out
    assert json.loads(out)["messages"][0]["payload"] == payload
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps({"session_id": sid, "messages": [
            {"role": "ROLE_USER", "content": "deep", "payload": deep(MAX_PAYLOAD_DEPTH + 1, "list")}]}),
        target, "chatsession.v1.SessionService/AppendMessages",
    )  # fmt: skip
    assert code != 0
    assert "InvalidArgument" in out
    assert "messages[0].payload" in out


# --- The Python client's conversion, both ways ----------------------------------------------------


@pytest.mark.parametrize("value", TRICKY)
def test_the_client_converts_a_json_value_there_and_back(value: Any) -> None:
    m = message("user", "x", payload=value)
    assert same(payload_of(session_pb2.Message.FromString(m.SerializeToString())), value)


def test_integral_numbers_come_back_as_int_and_the_rest_as_float() -> None:
    back = payload_of(user("x", payload=[3, 3.0, -0.0, 0.0, 2.5, 2.0**53, 2.0**60, -(2**53)]))
    assert back == [3, 3, -0.0, 0, 2.5, 2**53, 2.0**60, -(2**53)]
    assert [type(v) for v in back] == [int, int, float, int, float, int, float, int]
    assert math.copysign(1, back[2]) == -1


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (2**53 + 1, ValueError),
        (-(2**53) - 1, ValueError),
        (math.nan, ValueError),
        ([math.inf], ValueError),
        ({1: "x"}, TypeError),
        ({"a": {1, 2}}, TypeError),
        (b"bytes", TypeError),
    ],
)
def test_the_client_refuses_what_would_not_come_back_the_same(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        payload_value(value)
    with pytest.raises(error):
        user("x", payload=value)


def test_a_message_built_without_a_payload_has_none() -> None:
    m = user("x")
    assert not m.HasField("payload")
    assert payload_of(m) is None
    assert payload_of(m, default="absent") == "absent"
    assert user("x", payload=None).HasField("payload")


@pytest.mark.parametrize("value", TRICKY)
def test_the_servers_encoding_of_a_stored_payload_is_the_value_protobuf_makes(value: Any) -> None:
    sent = user("x", payload=value)
    text, _ = payload_json(sent.payload, max_depth=MAX_PAYLOAD_DEPTH, max_values=MAX_PAYLOAD_VALUES)
    back = session_pb2.Message()
    back.MergeFromString(payload_field(text, 11))
    assert back.payload == sent.payload
    assert same(payload_of(back), value)


async def test_a_watch_delivers_payloads_in_the_announcement_and_read_back(
    client: SessionClient, raw: GlideClient, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Appends up to INLINE_PUBLISH_BYTES travel in the announcement; larger ones are announced
    # without their messages, and the watcher reads them back: 64 KiB here, for both ways.
    monkeypatch.setattr(session_store, "INLINE_PUBLISH_BYTES", 64 * 1024)
    sid = (await client.create_session(uid)).session_id
    big = {"blob": "é" * 40_000, "x": 0.30000000000000004}
    watched: list[session_pb2.Message] = []

    async def watch() -> None:
        async for event in client.watch(sid):  # new messages only: they come from the feed
            if event.HasField("message"):
                watched.append(event.message)

    watcher = asyncio.create_task(watch())
    try:

        async def subscribed() -> bool:
            return await subscribers(raw, f"watch:{{{sid}}}") > 0

        await eventually(subscribed)
        await client.append(sid, [user("small", payload=[1.5, -0.0])])
        await client.append(sid, [user("big", payload=big)])
        await eventually(lambda: len(watched) == 2)
    finally:
        watcher.cancel()
    assert same(payload_of(watched[0]), [1.5, -0.0])
    assert payload_of(watched[1]) == big
