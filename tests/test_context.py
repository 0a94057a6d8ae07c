"""GetContext, CompactMessages, ClearMessages and GetSession's read_mask (issue 15)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from glide import GlideClient, GlideClusterClient, SlotKeyRoute, SlotType

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SessionClient,
    assistant,
    system,
    tool,
    user,
)
from chatsession_client.errors import from_rpc_error
from chatsession_server.app import RunningServer
from chatsession_server.domain import NewMessage, NewSession, Role
from tests.helpers import meta, raises, stored_messages, violated_fields


def keys_of(session_id: str) -> list[str]:
    return [f"{prefix}:{{{session_id}}}" for prefix in ("chat", "meta", "reqs", "summary")]


async def dumps(raw: GlideClient, session_id: str) -> list[Any]:
    """DUMP of each of the session's keys (None where there is none)."""
    return [await raw.custom_command(["DUMP", key]) for key in keys_of(session_id)]


async def summary_of(raw: GlideClient, session_id: str) -> dict[str, Any] | None:
    value = await raw.get(f"summary:{{{session_id}}}")
    return None if value is None else json.loads(value)


async def stored_bytes_match(raw: GlideClient, session_id: str) -> None:
    """meta's stored_bytes is exactly what the LIST and the summary hold."""
    items = await raw.lrange(f"chat:{{{session_id}}}", 0, -1)
    summary = await raw.get(f"summary:{{{session_id}}}")
    expected = sum(len(item) for item in items) + (len(summary) if summary else 0)
    assert int((await meta(raw, session_id))["stored_bytes"]) == expected


def seqs(messages: Any) -> list[int]:
    return [m.seq for m in messages]


async def conversation(client: SessionClient, uid: str) -> str:
    """Prompt (5 tokens), then 10 + tool call 10 + result 3 + 7 + 4 tokens: seqs 1..6."""
    s = await client.create_session(uid)
    await client.append(
        s.session_id,
        [
            system("You are terse.", tokens=5),
            user("Weather in Oslo?", tokens=10),
            assistant("", tokens=10, tool_calls=[("c1", "weather", '{"city":"Oslo"}')]),
            tool("-3C", tokens=3, tool_call_id="c1"),
            assistant("Cold: -3C.", tokens=7),
            user("Thanks", tokens=4),
        ],
    )
    return s.session_id


# --- GetContext ---------------------------------------------------------------------------------


async def test_context_budget_edges(client: SessionClient, uid: str) -> None:
    sid = await conversation(client, uid)

    whole = await client.get_context(sid)
    assert (seqs(whole.messages), whole.tokens, whole.truncated) == ([1, 2, 3, 4, 5, 6], 39, False)

    exact = await client.get_context(sid, max_tokens=5 + 7 + 4)
    assert (seqs(exact.messages), exact.tokens, exact.truncated) == ([1, 5, 6], 16, True)

    one_under = await client.get_context(sid, max_tokens=5 + 7 + 4 - 1)
    assert (seqs(one_under.messages), one_under.tokens, one_under.truncated) == ([1, 6], 9, True)

    # The tool result fits (19) but its calling assistant message does not: it goes too.
    cut_at_tool = await client.get_context(sid, max_tokens=5 + 7 + 4 + 3)
    assert (seqs(cut_at_tool.messages), cut_at_tool.tokens, cut_at_tool.truncated) == ([1, 5, 6], 16, True)
    with_call = await client.get_context(sid, max_tokens=5 + 7 + 4 + 3 + 10)
    assert seqs(with_call.messages) == [1, 3, 4, 5, 6]

    by_count = await client.get_context(sid, max_messages=2)
    assert (seqs(by_count.messages), by_count.truncated) == ([1, 5, 6], True)

    prompt_only = await client.get_context(sid, max_tokens=5)
    assert (seqs(prompt_only.messages), prompt_only.tokens, prompt_only.truncated) == ([1], 5, True)

    error = await raises(FailedPreconditionError, client.get_context(sid, max_tokens=4))
    assert [(v.type, v.subject) for v in error.precondition_violations] == [
        ("CONTEXT_OVER_BUDGET", "max_tokens")
    ]


async def test_context_of_an_empty_session_and_a_missing_one(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    empty = await client.get_context(s.session_id, max_tokens=10)
    assert (list(empty.messages), empty.tokens, empty.truncated) == ([], 0, False)
    await raises(NotFoundError, client.get_context(f"{uid}-missing"))


async def test_context_reply_stops_short_of_the_reply_limit(
    server: RunningServer, client: SessionClient, uid: str
) -> None:
    """With no budget, a session larger than a reply holds comes back as its newest ~3 MiB, which
    a client with gRPC's default 4 MiB limit receives."""
    sid = f"{uid}-big"
    await server.store.create(
        NewSession(sid, uid, model="", title="", labels={}, ttl_seconds=600, max_messages=-1)
    )
    await server.store.append(sid, [NewMessage(Role.SYSTEM, "p" * 100_000, tokens=1)])
    for _ in range(4):
        await server.store.append(sid, [NewMessage(Role.USER, "x" * 200_000, tokens=1) for _ in range(5)])
    found = await client.get_context(sid)
    assert found.truncated
    assert sum(len(m.content) for m in found.messages) < 3 * 1024 * 1024
    assert seqs(found.messages) == [1, *range(23 - len(found.messages), 22)]
    assert len(found.messages) >= 14


# --- CompactMessages ----------------------------------------------------------------------------


async def test_compaction_replaces_a_prefix_without_gap_or_overlap(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    before = await client.get_session(sid)
    r = await client.compact_messages(sid, 4, assistant("Asked the weather; -3C.", tokens=6))
    assert not r.replayed
    assert (r.summary.seq, r.summary.summarizes.first_seq, r.summary.summarizes.last_seq) == (4, 2, 4)
    assert (r.session.message_count, r.session.token_count) == (before.message_count, before.token_count)
    assert r.session.messages_stored == 3

    page = await client.list_messages(sid)
    assert seqs(page.messages) == [1, 4, 5, 6]
    assert [m.HasField("summarizes") for m in page.messages] == [False, True, False, False]
    assert not page.history_trimmed
    context = await client.get_context(sid)
    assert seqs(context.messages) == [1, 4, 5, 6]
    assert context.tokens == 5 + 6 + 7 + 4

    stored = await summary_of(raw, sid)
    assert stored is not None
    assert (stored["seq"], stored["role"], stored["summarizes"]) == (4, "assistant", [2, 4])
    assert [m["seq"] for m in await stored_messages(raw, sid)] == [1, 5, 6]
    await stored_bytes_match(raw, sid)
    ttl = await raw.ttl(f"summary:{{{sid}}}")
    assert 0 < ttl <= await raw.ttl(f"meta:{{{sid}}}")

    # A second compaction folds the first in.
    again = await client.compact_messages(sid, 5, assistant("Weather asked and answered.", tokens=5))
    assert (again.summary.summarizes.first_seq, again.summary.summarizes.last_seq) == (2, 5)
    assert seqs((await client.list_messages(sid)).messages) == [1, 5, 6]
    await stored_bytes_match(raw, sid)
    # Paging forward and backward meets the summary once, in its place.
    forward = [m.seq for m in [m async for m in client.iter_messages(sid, page_size=1)]]
    assert forward == [1, 5, 6]
    backward = await client.list_messages(sid, page_size=2)
    assert (seqs(backward.messages), backward.has_more) == ([5, 6], True)
    older = await client.list_messages(sid, page_size=2, before_seq=5)
    assert (seqs(older.messages), older.has_more) == ([1], False)


async def test_compaction_refusals_change_nothing(client: SessionClient, raw: GlideClient, uid: str) -> None:
    sid = await conversation(client, uid)
    await client.compact_messages(sid, 3, system("Summary.", tokens=2))
    snapshot = await dumps(raw, sid)
    cases: list[tuple[int, str]] = [
        (7, "UP_TO_SEQ_AHEAD"),
        (1, "UP_TO_SEQ_IN_PROMPT"),
        (2, "ALREADY_COMPACTED"),
    ]
    for up_to, kind in cases:
        error = await raises(FailedPreconditionError, client.compact_messages(sid, up_to, system("S.")))
        assert [(v.type, v.subject) for v in error.precondition_violations] == [(kind, "up_to_seq")]
    bad: list[tuple[Awaitable[Any], set[str]]] = [
        (client.compact_messages(sid, 0, system("S.")), {"up_to_seq"}),
        (client.compact_messages(sid, 5, user("S.")), {"summary.role"}),
        (
            client.compact_messages(sid, 5, tool("S.", tool_call_id="c")),
            {"summary.role"},
        ),
        (client.compact_messages(sid, 5, system("")), {"summary.content"}),
        (client.compact_messages(sid, 5, system("S.", tokens=-1)), {"summary.tokens"}),
        (
            client.compact_messages(sid, 5, assistant("", tool_calls=[("c", "f", "{}")])),
            {"summary.tool_calls", "summary.content"},
        ),
        (client.compact_messages(sid, 5, system("S."), request_id="bad id"), {"request_id"}),
        (client.compact_messages("bad id", 5, system("S.")), {"session_id"}),
    ]
    for call, fields in bad:
        assert violated_fields(await raises(InvalidArgumentError, call)) == fields
    missing = pb.CompactMessagesRequest(session_id=sid, up_to_seq=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client._stub.CompactMessages(missing)
    assert violated_fields(from_rpc_error(info.value)) == {"summary"}
    assert await dumps(raw, sid) == snapshot


async def test_compaction_retry_is_idempotent(client: SessionClient, raw: GlideClient, uid: str) -> None:
    sid = await conversation(client, uid)
    first = await client.compact_messages(sid, 4, system("S.", tokens=1), request_id="compact-1")
    snapshot = await dumps(raw, sid)
    retry = await client.compact_messages(sid, 4, system("S.", tokens=1), request_id="compact-1")
    assert retry.replayed
    assert retry.summary == first.summary
    assert await dumps(raw, sid) == snapshot
    error = await raises(
        FailedPreconditionError, client.compact_messages(sid, 5, system("T."), request_id="compact-1")
    )
    assert error.precondition_violations[0].type == "REQUEST_ID_REUSED"
    # An append's request_id is not a compaction's, nor the other way round.
    await client.append(sid, [user("more")], request_id="turn-7")
    error = await raises(
        FailedPreconditionError, client.compact_messages(sid, 5, system("T."), request_id="turn-7")
    )
    assert error.precondition_violations[0].type == "REQUEST_ID_REUSED"
    error = await raises(FailedPreconditionError, client.append(sid, [user("x")], request_id="compact-1"))
    assert error.precondition_violations[0].type == "REQUEST_ID_REUSED"


async def test_compaction_racing_appends_loses_and_repeats_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    sid = s.session_id
    await client.append(sid, [system("prompt", tokens=1)])
    for i in range(20):
        await client.append(sid, [user(f"m{i + 2}", tokens=1)])
    events: list[pb.WatchMessagesResponse] = []
    started = asyncio.Event()

    async def follow() -> None:
        async for event in client.watch(sid, after_seq=0, include_heartbeats=True):
            if event.HasField("heartbeat"):
                started.set()
                continue
            events.append(event)
            if event.HasField("message") and event.message.seq == 121:
                return

    watcher = asyncio.create_task(follow())
    await asyncio.wait_for(started.wait(), 10)
    appends = [client.append(sid, [user(f"m{i}", tokens=1)]) for i in range(22, 122)]
    compaction = client.compact_messages(sid, 15, system("the first part", tokens=3))
    results = await asyncio.gather(*appends[:50], compaction, *appends[50:])
    compacted = results[50]
    assert isinstance(compacted, pb.CompactMessagesResponse)
    await asyncio.wait_for(watcher, 30)

    listed = [m async for m in client.iter_messages(sid, page_size=7)]
    assert seqs(listed) == [1, 15, *range(16, 122)]
    assert listed[1].summarizes.first_seq == 2
    contents = sorted(m.content for m in listed[2:])
    assert len(set(contents)) == len(contents) == 106
    context = await client.get_context(sid)
    assert seqs(context.messages) == seqs(listed)
    assert context.tokens == 1 + 3 + 106
    assert (await client.get_session(sid)).message_count == 121
    await stored_bytes_match(raw, sid)

    # The watch delivered each message once, in order; the compaction was announced once, and
    # whatever of 2..15 it had not delivered yet is what the summary stands for.
    delivered = [e.message.seq for e in events if e.HasField("message")]
    assert delivered == sorted(set(delivered))
    announced = [e.compacted.summarizes for e in events if e.HasField("compacted")]
    assert [(r.first_seq, r.last_seq) for r in announced] == [(2, 15)]
    assert set(range(16, 122)) <= set(delivered)
    assert set(delivered) - set(range(1, 122)) == set()


async def test_watch_from_the_start_meets_the_summary_in_its_place(client: SessionClient, uid: str) -> None:
    sid = await conversation(client, uid)
    await client.compact_messages(sid, 3, system("S.", tokens=1))
    kinds: list[tuple[str, int]] = []
    async for event in client.watch(sid, after_seq=0):
        if event.HasField("message"):
            kinds.append(("message", event.message.seq))
        elif event.HasField("compacted"):
            kinds.append(("compacted", event.compacted.summarizes.last_seq))
        if kinds[-1] == ("message", 6):
            break
    assert kinds == [("message", 1), ("compacted", 3), ("message", 4), ("message", 5), ("message", 6)]


# --- ClearMessages ------------------------------------------------------------------------------


async def test_clear_with_watchers_attached(client: SessionClient, raw: GlideClient, uid: str) -> None:
    sid = await conversation(client, uid)
    await client.compact_messages(sid, 3, system("S.", tokens=1))
    ttl_before = await raw.ttl(f"meta:{{{sid}}}")
    before = await client.get_session(sid)

    async def follow(events: list[pb.WatchMessagesResponse], started: asyncio.Event) -> None:
        async for event in client.watch(sid, include_heartbeats=True):
            if event.HasField("heartbeat"):
                started.set()
                continue
            events.append(event)
            if event.HasField("message"):
                return

    streams: list[list[pb.WatchMessagesResponse]] = [[] for _ in range(3)]
    starts = [asyncio.Event() for _ in streams]
    watchers = [
        asyncio.create_task(follow(events, started)) for events, started in zip(streams, starts, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(started.wait() for started in starts)), 10)
    cleared = await client.clear_messages(sid, keep_system_prompt=True)
    assert (cleared.message_count, cleared.token_count, cleared.messages_stored) == (
        before.message_count,
        before.token_count,
        1,
    )
    await client.append(sid, [user("again", tokens=2)])
    await asyncio.wait_for(asyncio.gather(*watchers), 30)
    for events in streams:
        kinds = [(e.WhichOneof("event"), e.cleared.last_seq or e.message.seq) for e in events]
        assert kinds == [("cleared", 6), ("message", 7)]

    assert seqs((await client.list_messages(sid)).messages) == [1, 7]
    assert await summary_of(raw, sid) is None
    await stored_bytes_match(raw, sid)
    assert 0 < await raw.ttl(f"chat:{{{sid}}}") <= ttl_before
    m = await meta(raw, sid)
    assert (m["pinned"], m["message_count"]) == ("1", "7")

    everything = await client.clear_messages(sid)
    assert everything.messages_stored == 0
    assert await raw.exists([f"chat:{{{sid}}}", f"summary:{{{sid}}}"]) == 0
    assert (await meta(raw, sid))["stored_bytes"] == "0"
    later = await client.append(sid, [system("not pinned now"), user("hi")])
    assert seqs(later.messages) == [8, 9]
    assert (await meta(raw, sid))["pinned"] == "0"
    assert violated_fields(await raises(InvalidArgumentError, client.clear_messages(""))) == {"session_id"}
    await raises(NotFoundError, client.clear_messages(f"{uid}-missing"))


# --- GetSession read_mask -----------------------------------------------------------------------


async def command_calls(raw: GlideClient, key: str) -> dict[str, int]:
    """Calls per command Valkey has served (on the node of `key`, in a cluster)."""
    if isinstance(raw, GlideClusterClient):
        text: Any = await raw.custom_command(
            ["INFO", "commandstats"], route=SlotKeyRoute(SlotType.PRIMARY, key)
        )
    else:
        text = await raw.custom_command(["INFO", "commandstats"])
    calls: dict[str, int] = {}
    for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line.partition(":")
            calls[name[len("cmdstat_") :]] = int(stats.split(",")[0].split("=")[1])
    return calls


async def test_read_mask_reads_only_the_named_fields(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, title="t", labels={"team": "a", "other": "b"})
    await client.append(s.session_id, [user("hi", tokens=9)])
    key = f"meta:{{{s.session_id}}}"
    before = await command_calls(raw, key)
    got = await client.get_session(s.session_id, read_mask=["token_count", "labels.team"])
    after = await command_calls(raw, key)
    assert got.token_count == 9
    assert dict(got.labels) == {"team": "a"}
    assert (got.title, got.session_id, got.message_count) == ("", "", 0)
    assert not got.HasField("created_at")
    ran = {name for name in after if after[name] != before.get(name, 0)}
    assert "hmget" in ran
    assert not ran & {"hgetall", "llen", "ttl", "hget"}, ran

    counted = await client.get_session(s.session_id, read_mask=["messages_stored", "expires_in_seconds"])
    assert counted.messages_stored == 1
    assert counted.expires_in_seconds > 0
    assert counted.user_id == ""
    whole = await client.get_session(s.session_id, read_mask=["*"])
    assert (whole.title, whole.message_count, dict(whole.labels)) == ("t", 1, {"team": "a", "other": "b"})
    labels = await client.get_session(s.session_id, read_mask=["labels", "created_at"])
    assert dict(labels.labels) == {"team": "a", "other": "b"}
    assert labels.HasField("created_at")

    for mask in (["nope"], ["labels."], ["title", "session.title"]):
        error = await raises(InvalidArgumentError, client.get_session(s.session_id, read_mask=mask))
        assert violated_fields(error) == {"read_mask"}
    await raises(NotFoundError, client.get_session(f"{uid}-missing", read_mask=["title"]))


# --- bad input -----------------------------------------------------------------------------------


async def test_bad_context_requests_name_their_fields(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    snapshot = await dumps(raw, sid)
    cases: list[tuple[Awaitable[Any], set[str]]] = [
        (client.get_context(sid, max_tokens=-1), {"max_tokens"}),
        (client.get_context(sid, max_messages=-1), {"max_messages"}),
        (client.get_context("", max_tokens=-1), {"session_id", "max_tokens"}),
    ]
    for call, fields in cases:
        assert violated_fields(await raises(InvalidArgumentError, call)) == fields
    assert await dumps(raw, sid) == snapshot


async def test_summary_key_lives_and_dies_with_the_session(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    await client.compact_messages(sid, 3, system("S.", tokens=1))
    await client.update_session(sid, ttl_seconds=5000)
    assert 4000 < await raw.ttl(f"summary:{{{sid}}}") <= 5000
    await client.append(sid, [user("more")])  # every append restarts the clock of all four keys
    ttls = [await raw.ttl(key) for key in keys_of(sid)]
    assert all(4000 < ttl <= 5000 for ttl in ttls), ttls
    await client.delete_session(sid)
    assert await raw.exists(keys_of(sid)) == 0


async def test_compaction_of_a_range_the_window_trimmed(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=3)
    await client.append(s.session_id, [user(f"m{i}", tokens=1) for i in range(1, 7)])  # keeps 4..6
    r = await client.compact_messages(s.session_id, 2, assistant("S.", tokens=1))
    assert (r.summary.summarizes.first_seq, r.summary.summarizes.last_seq) == (1, 2)
    page = await client.list_messages(s.session_id, after_seq=0)
    assert seqs(page.messages) == [2, 4, 5, 6]
    assert page.history_trimmed  # seq 3: trimmed, not compacted
    assert page.window_start_seq == 4
    await stored_bytes_match(raw, s.session_id)


async def test_context_is_one_script_call(client: SessionClient, raw: GlideClient, uid: str) -> None:
    sid = await conversation(client, uid)
    key = f"meta:{{{sid}}}"
    before = await command_calls(raw, key)
    await client.get_context(sid, max_tokens=20)
    after = await command_calls(raw, key)
    ran = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    scripts = {name: n for name, n in ran.items() if name.startswith(("evalsha", "eval", "fcall"))}
    assert sum(scripts.values()) == 1, ran
    assert set(ran) - set(scripts) <= {"info", "lrange", "llen", "hmget", "get"}, ran
