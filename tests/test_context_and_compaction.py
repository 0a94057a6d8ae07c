"""GetContext, CompactMessages and ClearMessages: the budget's edges, a summary in place of the
prefix it replaces, refusals that change nothing, idempotent retries, the session's byte cap, what
a watch is told of compactions and clears; and a model-based test of compaction, clearing and the
window together, checked after every step against an in-memory model of what the service
promises."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from glide import GlideClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1.session_pb2 import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL, ROLE_USER
from chatsession_client import (
    NO_RETRY,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SessionClient,
    assistant,
    message,
    system,
    tool,
    user,
)
from chatsession_client.errors import from_rpc_error
from chatsession_server.api.validation import READABLE_FIELDS
from chatsession_server.app import RunningServer
from chatsession_server.domain import Cleared, Compacted, MessageQuery, NewMessage, NewSession, Role
from chatsession_server.settings import Settings
from chatsession_server.store.codec import MAX_PINNED
from chatsession_server.store.feed import _parse as parse_publish
from tests.helpers import command_counts, meta, raises, serving, stored_messages, violated_fields

T = TypeVar("T")


OnLoop = Callable[[Coroutine[Any, Any, Any]], Any]


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


# --- GetContext -----------------------------------------------------------------------------------


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


async def test_context_is_one_script_call(client: SessionClient, raw: GlideClient, uid: str) -> None:
    sid = await conversation(client, uid)
    key = f"meta:{{{sid}}}"
    before = await command_counts(raw, key=key)
    await client.get_context(sid, max_tokens=20)
    after = await command_counts(raw, key=key)
    ran = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    scripts = {name: n for name, n in ran.items() if name.startswith(("evalsha", "eval", "fcall"))}
    assert sum(scripts.values()) == 1, ran
    assert set(ran) - set(scripts) <= {"info", "lrange", "llen", "hmget", "get"}, ran


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


# --- CompactMessages ------------------------------------------------------------------------------


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


async def test_compaction_keeps_the_session_within_max_session_bytes(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_session_bytes=4000) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        sid = (await c.create_session(uid)).session_id
        await c.append(sid, [user("a"), *(user(letter * 1000) for letter in "bcd")])  # about 3.3 kB
        before = await dumps(raw, sid)
        # Replacing the 1-byte message with a 1000-byte summary would store about 4.3 kB.
        await raises(ResourceExhaustedError, c.compact_messages(sid, 1, system("s" * 1000, tokens=1)))
        assert await dumps(raw, sid) == before
        assert int((await meta(raw, sid))["stored_bytes"]) <= 4000


async def test_compaction_refused_by_the_cap_says_so_and_one_that_shrinks_is_allowed(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_session_bytes=8000) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        sid = (await c.create_session(uid)).session_id
        await c.append(sid, [user(letter * 1000) for letter in "abcde"])  # about 5.5 kB
    # The cap lowered below what the session stores: appends are refused, compactions that grow
    # it too, but one that shrinks it is what brings it back under.
    async with (
        serving(settings, valkey_url, max_session_bytes=2000) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        await c.compact_messages(sid, 2, system("short", tokens=1))
        stored = int((await meta(raw, sid))["stored_bytes"])
        assert 2000 < stored < 4500
        error = await raises(ResourceExhaustedError, c.compact_messages(sid, 2, system("s" * 1000, tokens=1)))
        assert "--max-session-bytes" in error.message
        assert [(v.quota_id, v.quota_value) for v in error.quota_violations] == [("max_session_bytes", 2000)]
        assert int((await meta(raw, sid))["stored_bytes"]) == stored
        await c.compact_messages(sid, 5, system("shorter", tokens=1))
        assert int((await meta(raw, sid))["stored_bytes"]) < 2000
        assert seqs((await c.list_messages(sid)).messages) == [5]


# --- ClearMessages --------------------------------------------------------------------------------


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

    await client.compact_messages(sid, 7, system("S.", tokens=1))  # the read below sees both keys
    assert await raw.exists([f"chat:{{{sid}}}", f"summary:{{{sid}}}"]) == 2
    everything = await client.clear_messages(sid)
    assert everything.messages_stored == 0
    assert await raw.exists([f"chat:{{{sid}}}", f"summary:{{{sid}}}"]) == 0
    assert (await meta(raw, sid))["stored_bytes"] == "0"
    later = await client.append(sid, [system("not pinned now"), user("hi")])
    assert seqs(later.messages) == [8, 9]
    assert (await meta(raw, sid))["pinned"] == "0"
    assert violated_fields(await raises(InvalidArgumentError, client.clear_messages(""))) == {"session_id"}
    await raises(NotFoundError, client.clear_messages(f"{uid}-missing"))


async def test_a_retried_clear_empties_nothing_appended_since(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    cleared = await client.clear_messages(sid, keep_system_prompt=True, request_id="clear-1")
    await client.append(sid, [user("after the clear")])
    before = await dumps(raw, sid)
    # The first answer was lost; the retry repeats the id: a no-op that returns the session.
    again = await client.clear_messages(sid, keep_system_prompt=True, request_id="clear-1")
    assert await dumps(raw, sid) == before
    assert seqs((await client.list_messages(sid)).messages) == [1, 7]
    assert (again.message_count, again.messages_stored) == (7, 2)
    assert cleared.messages_stored == 1
    assert await raw.ttl(f"reqs:{{{sid}}}") > 0  # expires with the session
    for reused in (
        client.clear_messages(sid, keep_system_prompt=False, request_id="clear-1"),
        client.append(sid, [user("x")], request_id="clear-1"),
        client.compact_messages(sid, 7, system("S."), request_id="clear-1"),
    ):
        error = await raises(FailedPreconditionError, reused)
        assert error.precondition_violations[0].type == "REQUEST_ID_REUSED"
    assert await dumps(raw, sid) == before
    invalid = await raises(InvalidArgumentError, client.clear_messages(sid, request_id="no spaces"))
    assert violated_fields(invalid) == {"request_id"}
    assert await dumps(raw, sid) == before


# --- what a watch is told of compactions and clears -----------------------------------------------


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


async def test_watch_announces_a_recompaction_of_a_range_it_read(client: SessionClient, uid: str) -> None:
    sid = await conversation(client, uid)  # prompt 1, then 2..6
    await client.compact_messages(sid, 3, system("S.", tokens=1))
    kinds: list[tuple[str, int]] = []

    async def follow() -> None:
        async for event in client.watch(sid, after_seq=0):
            if event.HasField("message"):
                kinds.append(("message", event.message.seq))
            elif event.HasField("compacted"):
                kinds.append(("compacted", event.compacted.summarizes.last_seq))
            if kinds[-1] == ("message", 6):
                # A worker writes a better summary of the same range; then the user goes on.
                await client.compact_messages(sid, 3, system("A better summary.", tokens=2))
                await client.append(sid, [user("next")])
            if kinds[-1] == ("message", 7):
                return

    await asyncio.wait_for(follow(), 30)
    assert kinds == [
        ("message", 1),
        ("compacted", 3),
        ("message", 4),
        ("message", 5),
        ("message", 6),
        ("compacted", 3),
        ("message", 7),
    ]
    assert seqs((await client.list_messages(sid)).messages) == [1, 3, 4, 5, 6, 7]


async def test_watch_resumed_before_a_compaction_it_missed_meets_the_summary(
    client: SessionClient, uid: str
) -> None:
    sid = await conversation(client, uid)  # the watcher delivered 1..3, then lost its stream
    await client.compact_messages(sid, 4, system("S.", tokens=1))
    kinds: list[tuple[str, int]] = []
    async for event in client.watch(sid, after_seq=3):
        kinds.append(
            (str(event.WhichOneof("event")), event.compacted.summarizes.last_seq or event.message.seq)
        )
        if event.HasField("message"):
            break
    assert kinds == [("compacted", 4), ("message", 5)]


async def test_watch_resumed_across_a_clear_announces_it(client: SessionClient, uid: str) -> None:
    sid = await conversation(client, uid)  # the watcher delivered 1..6, then lost its stream
    await client.clear_messages(sid, keep_system_prompt=True)
    await client.append(sid, [user("again")])
    kinds: list[tuple[str, int]] = []
    async for event in client.watch(sid, after_seq=6):
        kinds.append((str(event.WhichOneof("event")), event.cleared.last_seq or event.message.seq))
        if event.HasField("message"):
            break
    assert kinds == [("cleared", 6), ("message", 7)]


async def test_watch_resumed_at_the_seq_of_a_clear_is_told_and_one_past_it_is_not(
    client: SessionClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    await client.clear_messages(sid, keep_system_prompt=False)

    async def first_events(after_seq: int) -> list[tuple[str, int]]:
        kinds: list[tuple[str, int]] = []
        async for event in client.watch(sid, after_seq=after_seq):
            kinds.append((str(event.WhichOneof("event")), event.cleared.last_seq or event.message.seq))
            if event.HasField("message"):
                return kinds
            if len(kinds) == 1:  # the resume point at the tail: nothing more is stored yet
                await client.append(sid, [user("again")])
        return kinds

    assert await asyncio.wait_for(first_events(6), 30) == [("cleared", 6), ("message", 7)]
    # Resumed past the clear (it delivered 7): told nothing of it.
    await client.append(sid, [user("more")])
    kinds: list[tuple[str, int]] = []
    async for event in client.watch(sid, after_seq=7):
        kinds.append((str(event.WhichOneof("event")), event.message.seq))
        break
    assert kinds == [("message", 8)]


async def test_two_server_processes_announce_compactions_and_clears_alike(
    client: SessionClient, settings: Settings, valkey_url: str, uid: str
) -> None:
    """Watchers on two servers (two feeds, two pub/sub connections) see the same events."""
    sid = await conversation(client, uid)
    async with (
        serving(settings, valkey_url) as other,
        SessionClient(f"127.0.0.1:{other.port}", retry=NO_RETRY) as other_client,
    ):
        streams: list[list[tuple[str, int]]] = [[], []]
        starts = [asyncio.Event(), asyncio.Event()]

        async def follow(c: SessionClient, events: list[tuple[str, int]], started: asyncio.Event) -> None:
            async for event in c.watch(sid, include_heartbeats=True):
                kind = event.WhichOneof("event")
                if kind == "heartbeat":
                    started.set()
                    continue
                seq = {
                    "message": event.message.seq,
                    "compacted": event.compacted.summarizes.last_seq,
                    "cleared": event.cleared.last_seq,
                }.get(str(kind), -1)
                events.append((str(kind), seq))
                if kind == "message":
                    return

        watchers = [
            asyncio.create_task(follow(c, events, started))
            for c, events, started in zip((client, other_client), streams, starts, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 10)
        await other_client.compact_messages(sid, 4, system("S.", tokens=1))
        await client.clear_messages(sid, keep_system_prompt=True)
        await other_client.append(sid, [user("again")])
        await asyncio.wait_for(asyncio.gather(*watchers), 30)
    assert streams[0] == streams[1] == [("compacted", 4), ("cleared", 6), ("message", 7)]


async def test_meta_records_the_latest_compaction_while_its_summary_is_stored(
    server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    """meta's `compacted` ("<first> <last> <rewrite>") is what a watch that reads past a summary
    is told of: the latest compaction's range (taking in the earlier), kept while its summary is
    stored, gone with it; and the LIST read returns it only while it names the stored summary."""

    async def record(session_id: str) -> str | None:
        return (await meta(raw, session_id)).get("compacted")

    async def page_record(session_id: str) -> tuple[tuple[int, int] | None, int]:
        page = await server.store.list_messages(session_id, MessageQuery(limit=1, after_seq=6))
        return page.compacted, page.compaction_rewrite

    sid = await conversation(client, uid)  # prompt 1, then 2..6
    assert await record(sid) is None
    assert await page_record(sid) == (None, 0)
    await client.compact_messages(sid, 3, system("S.", tokens=1))
    assert await record(sid) == "2 3 1"
    await client.compact_messages(sid, 4, system("S2.", tokens=1), request_id="c-4")
    assert await record(sid) == "2 4 2"
    assert await page_record(sid) == ((2, 4), 2)
    await client.compact_messages(sid, 4, system("S2.", tokens=1), request_id="c-4")  # a replay
    assert await record(sid) == "2 4 2"
    # A fork's summary is none of its own compactions: no record, as a session never compacted.
    fork = (await client.fork_session(sid)).session.session_id
    assert "compacted" not in await meta(raw, fork)
    # A truncation that keeps the summary keeps the record; one that removes it removes it.
    await client.truncate_messages(sid, 5)
    assert (await record(sid), (await meta(raw, sid))["rewrites"]) == ("2 4 2", "3")
    await client.truncate_messages(sid, 1)  # back to the prompt: the summary goes
    assert await record(sid) is None
    await client.append(sid, [user("seven"), user("eight")])
    await client.compact_messages(sid, 7, system("S3.", tokens=1))
    assert await record(sid) == "2 7 5"
    await client.clear_messages(sid, keep_system_prompt=True)
    assert await record(sid) is None
    assert await page_record(sid) == (None, 0)

    # A record a server from before it was kept left behind (it cleared, or re-compacted, without
    # touching it) names no stored summary: the read leaves it out.
    await raw.hset(f"meta:{{{sid}}}", {"compacted": "2 7 5"})
    assert await page_record(sid) == (None, 0)
    await client.append(sid, [user("nine")])
    await client.compact_messages(sid, 9, system("S4.", tokens=1))
    await raw.hset(f"meta:{{{sid}}}", {"compacted": "2 7 5"})
    assert await page_record(sid) == (None, 0)


def test_publishes_carry_their_rewrite_number_and_older_ones_parse_without() -> None:
    assert parse_publish(b"C2 4 alice 3") == Compacted(2, 4, "alice", 3)
    assert parse_publish(b"X6 alice 4") == Cleared(6, "alice", 4)
    assert parse_publish(b"C2 4 alice") == Compacted(2, 4, "alice", None)
    assert parse_publish(b"X6 alice") == Cleared(6, "alice", None)


# --- a model of one session under appends, compactions, clears and window changes -----------------


@dataclass
class Row:
    seq: int
    role: int
    content: str
    tokens: int
    summarizes: tuple[int, int] | None = None


@dataclass
class Model:
    max_messages: int = -1
    stored: list[Row] = field(default_factory=list)
    """the pinned prompt, then the window"""
    pinned: int = 0
    message_count: int = 0
    token_count: int = 0
    summary: Row | None = None
    rewrites: int = 0
    """compactions and clears so far (meta's `rewrites`)"""
    compaction_rewrite: int = 0
    """the rewrite the summary's compaction was"""

    def append(self, rows: list[tuple[int, str, int]]) -> None:
        for role, content, tokens in rows:
            seq = self.message_count + 1
            if self.pinned == seq - 1 and self.pinned < MAX_PINNED and role == ROLE_SYSTEM:
                self.pinned = seq
            self.stored.append(Row(seq, role, content, tokens))
            self.message_count = seq
            self.token_count += tokens
        self.trim()

    def trim(self) -> None:
        if self.max_messages <= 0:
            return
        unpinned = len(self.stored) - self.pinned
        drop = unpinned - max(self.max_messages - self.pinned, 1)
        if drop <= 0:
            return
        while drop < unpinned and self.stored[self.pinned + drop].role == ROLE_TOOL:
            drop += 1
        del self.stored[self.pinned : self.pinned + drop]

    def compact_refusal(self, up_to: int) -> str | None:
        if up_to > self.message_count:
            return "UP_TO_SEQ_AHEAD"
        if up_to <= self.pinned:
            return "UP_TO_SEQ_IN_PROMPT"
        if self.summary is not None and up_to < self.summary.seq:
            return "ALREADY_COMPACTED"
        return None

    def compact(self, up_to: int, content: str, tokens: int) -> None:
        self.stored = self.stored[: self.pinned] + [r for r in self.stored[self.pinned :] if r.seq > up_to]
        self.summary = Row(up_to, ROLE_SYSTEM, content, tokens, (self.pinned + 1, up_to))
        self.rewrites += 1
        self.compaction_rewrite = self.rewrites

    def compaction_record(self) -> str | None:
        """meta's `compacted`: the summary's range and its compaction's rewrite, while it is stored."""
        if self.summary is None or self.summary.summarizes is None:
            return None
        first, last = self.summary.summarizes
        return f"{first} {last} {self.compaction_rewrite}"

    def clear(self, keep: bool) -> None:
        self.stored = self.stored[: self.pinned] if keep else []
        if not keep:
            self.pinned = 0
        self.summary = None
        self.rewrites += 1

    def listed(self) -> list[Row]:
        head = self.stored[: self.pinned]
        return head + ([self.summary] if self.summary else []) + self.stored[self.pinned :]

    def context(self, max_tokens: int, max_messages: int) -> tuple[list[Row], int, bool] | None:
        """GetContext as the API specifies it; None: FAILED_PRECONDITION (over budget)."""
        head = self.stored[: self.pinned] + ([self.summary] if self.summary else [])
        tokens = sum(r.tokens for r in head)
        if max_tokens and tokens > max_tokens:
            return None
        window = self.stored[self.pinned :]
        recent: list[Row] = []
        for row in reversed(window):
            if (max_messages and len(recent) >= max_messages) or (
                max_tokens and tokens + row.tokens > max_tokens
            ):
                break
            recent.append(row)
            tokens += row.tokens
        while recent and recent[-1].role == ROLE_TOOL:
            tokens -= recent.pop().tokens
        return head + recent[::-1], tokens, len(recent) < len(window)


def shape(messages: Any) -> list[tuple[int, int, str, tuple[int, int] | None]]:
    return [
        (
            m.seq,
            m.role,
            m.content,
            (m.summarizes.first_seq, m.summarizes.last_seq) if m.HasField("summarizes") else None,
        )
        for m in messages
    ]


def rows_shape(rows: list[Row]) -> list[tuple[int, int, str, tuple[int, int] | None]]:
    return [(r.seq, r.role, r.content, r.summarizes) for r in rows]


ROLES = st.sampled_from([ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL])


CONTENT = st.text("abcxyzé", min_size=1, max_size=6)


SENT = st.tuples(ROLES, CONTENT, st.integers(0, 20))


class ContextMachine(RuleBasedStateMachine):
    def __init__(self, client: SessionClient, raw: GlideClient, on_loop: OnLoop, user_id: str) -> None:
        super().__init__()
        self.client, self.raw, self.on_loop = client, raw, on_loop
        self.model = Model()
        self.last_append: tuple[str, list[tuple[int, str, int]], int] | None = None
        self.last_compaction: tuple[str, int, str, int] | None = None
        self.sid: str = on_loop(client.create_session(user_id)).session_id

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        result: T = self.on_loop(coroutine)
        return result

    @rule(rows=st.lists(SENT, min_size=1, max_size=4))
    def append(self, rows: list[tuple[int, str, int]]) -> None:
        request_id = uuid.uuid4().hex
        sent = [message(r, c, tokens=t) for r, c, t in rows]
        self.call(self.client.append(self.sid, sent, request_id=request_id))
        self.last_append = (request_id, rows, self.model.message_count + 1)
        self.model.append(rows)

    @rule()
    def replay_last_append(self) -> None:
        """A retry stores nothing again and returns those of its messages still stored."""
        if self.last_append is None:
            return
        request_id, rows, first = self.last_append
        sent = [message(r, c, tokens=t) for r, c, t in rows]
        reply = self.call(self.client.append(self.sid, sent, request_id=request_id))
        assert reply.replayed
        last = first + len(rows) - 1
        assert shape(reply.messages) == rows_shape([r for r in self.model.stored if first <= r.seq <= last])

    @rule()
    def replay_last_compaction(self) -> None:
        if self.last_compaction is None:
            return
        request_id, up_to, content, tokens = self.last_compaction
        call = self.client.compact_messages(
            self.sid, up_to, system(content, tokens=tokens), request_id=request_id
        )
        if self.model.summary is None:  # cleared since
            with pytest.raises(FailedPreconditionError) as info:
                self.call(call)
            assert info.value.precondition_violations[0].type == "SUMMARY_CLEARED"
            return
        reply = self.call(call)
        assert reply.replayed
        assert shape([reply.summary]) == rows_shape([self.model.summary])

    @rule(paths=st.lists(st.sampled_from(READABLE_FIELDS), min_size=1, max_size=4))
    def get_masked(self, paths: list[str]) -> None:
        full = self.call(self.client.get_session(self.sid))
        masked = self.call(self.client.get_session(self.sid, read_mask=paths))
        for name in READABLE_FIELDS:
            if name in paths and name != "expires_in_seconds":
                assert getattr(masked, name) == getattr(full, name), name
            elif name not in paths and name not in ("created_at", "last_active"):
                assert not getattr(masked, name), name

    @rule(back=st.integers(-1, 6), content=CONTENT, tokens=st.integers(0, 20))
    def compact(self, back: int, content: str, tokens: int) -> None:
        up_to = max(self.model.message_count - back, 1)
        request_id = uuid.uuid4().hex
        call = self.client.compact_messages(
            self.sid, up_to, system(content, tokens=tokens), request_id=request_id
        )
        refusal = self.model.compact_refusal(up_to)
        if refusal is not None:
            with pytest.raises(FailedPreconditionError) as info:
                self.call(call)
            assert info.value.precondition_violations[0].type == refusal
            return
        reply = self.call(call)
        self.model.compact(up_to, content, tokens)
        self.last_compaction = (request_id, up_to, content, tokens)
        assert shape([reply.summary]) == rows_shape([self.model.summary])  # type: ignore[list-item]

    @rule(keep=st.booleans())
    def clear(self, keep: bool) -> None:
        self.call(self.client.clear_messages(self.sid, keep_system_prompt=keep))
        self.model.clear(keep)

    @rule(window=st.sampled_from([-1, 1, 2, 3, 5]))
    def window(self, window: int) -> None:
        self.call(self.client.update_session(self.sid, max_messages=window))
        self.model.max_messages = window
        self.model.trim()

    @rule(max_tokens=st.integers(0, 60), max_messages=st.integers(0, 4))
    def get_context(self, max_tokens: int, max_messages: int) -> None:
        expected = self.model.context(max_tokens, max_messages)
        call = self.client.get_context(self.sid, max_tokens=max_tokens, max_messages=max_messages)
        if expected is None:
            with pytest.raises(FailedPreconditionError):
                self.call(call)
            return
        got = self.call(call)
        rows, tokens, truncated = expected
        assert (shape(got.messages), got.tokens, got.truncated) == (rows_shape(rows), tokens, truncated)

    @rule(page_size=st.integers(1, 3))
    def page_through(self, page_size: int) -> None:
        """Forward and backward paging meet every message and the summary once, in order."""
        expected = rows_shape(self.model.listed())
        forward: list[Any] = []
        after = 0
        for _ in range(100):
            page = self.call(self.client.list_messages(self.sid, page_size=page_size, after_seq=after))
            forward += shape(page.messages)
            if not page.has_more:
                break
            after = page.messages[-1].seq
        assert forward == expected
        backward: list[Any] = []
        before: int | None = None
        for _ in range(100):
            page = self.call(self.client.list_messages(self.sid, page_size=page_size, before_seq=before))
            backward = shape(page.messages) + backward
            if not page.has_more:
                break
            before = page.messages[0].seq
        assert backward == expected

    @rule(
        after=st.integers(0, 30),
        before=st.none() | st.integers(1, 31),
        page_size=st.integers(1, 3),
        forward=st.booleans(),
    )
    def page_a_range(self, after: int, before: int | None, page_size: int, forward: bool) -> None:
        """Paging from any seq (inside the compacted range, at the summary's seq, past the end)
        meets exactly the stored messages and the summary of the range, once each, in order."""
        after = min(after, self.model.message_count)
        top = before if before is not None else self.model.message_count + 1
        expected = rows_shape([r for r in self.model.listed() if (after if forward else 0) < r.seq < top])
        got: list[Any] = []
        cursor = after if forward else before
        for _ in range(100):
            if forward:
                page = self.call(
                    self.client.list_messages(
                        self.sid, page_size=page_size, after_seq=cursor, before_seq=before
                    )
                )
                got += shape(page.messages)
            else:
                page = self.call(self.client.list_messages(self.sid, page_size=page_size, before_seq=cursor))
                got = shape(page.messages) + got
            if not page.has_more:
                break
            cursor = page.messages[-1].seq if forward else page.messages[0].seq
        assert got == expected

    @invariant()
    def service_agrees_with_the_model(self) -> None:
        m = self.model
        page = self.call(self.client.list_messages(self.sid, page_size=1000))
        assert shape(page.messages) == rows_shape(m.listed())
        base = m.message_count - (len(m.stored) - m.pinned)
        compacted_to = m.summary.seq if m.summary else m.pinned
        assert (page.last_seq, page.window_start_seq, page.has_more) == (m.message_count, base + 1, False)
        assert page.history_trimmed == (base > max(compacted_to, m.pinned))
        session = self.call(self.client.get_session(self.sid))
        assert (session.message_count, session.token_count, session.messages_stored) == (
            m.message_count,
            m.token_count,
            len(m.stored),
        )
        self.call(stored_bytes_match(self.raw, self.sid))
        self.call(self.expiries_agree())
        stored_meta = self.call(meta(self.raw, self.sid))
        assert stored_meta.get("compacted") == m.compaction_record()
        assert int(stored_meta.get("rewrites", "0")) == m.rewrites

    async def expiries_agree(self) -> None:
        """The session's keys expire together: none lives on without an expiry."""
        for name in ("chat", "summary", "reqs"):
            ttl = await self.raw.ttl(f"{name}:{{{self.sid}}}")
            assert ttl != -1, name

    def teardown(self) -> None:
        self.call(self.client.delete_session(self.sid, allow_missing=True))


async def test_context_compaction_and_clear_behave_like_the_model(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    loop = asyncio.get_running_loop()
    examples = itertools.count()

    def on_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    class Machine(ContextMachine):
        def __init__(self) -> None:
            super().__init__(client, raw, on_loop, f"{uid}-{next(examples)}")

    def run() -> None:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=int(os.environ.get("CHATSESSION_TEST_MODEL_EXAMPLES", "30")),
                stateful_step_count=20,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )

    await asyncio.to_thread(run)
