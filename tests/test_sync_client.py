"""The blocking client against a real server and Valkey. The server runs on the test's event
loop, so the client's calls run in a thread (asyncio.to_thread), as in a Flask or Django worker
beside an async service. Scripted failures (retries, RetryInfo, details): test_sync_client_unit.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from glide import GlideClient

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import (
    NO_RETRY,
    AlreadyCompactedError,
    AtSeqBeyondLastError,
    AtSeqTrimmedError,
    ContextOverBudgetError,
    FailedPreconditionError,
    NotFoundError,
    SeqMismatchError,
    SessionClient,
    SummaryClearedError,
    SyncSessionClient,
    UpToSeqAheadError,
    UpToSeqInPromptError,
    assistant,
    payload_of,
    system,
    user,
)
from tests.helpers import session_keys_exist, stored_messages


@pytest.fixture
def sync_client(target: str) -> Iterator[SyncSessionClient]:
    with SyncSessionClient(target, retry=NO_RETRY) as c:
        yield c


async def test_the_blocking_client_creates_appends_reads_and_deletes(
    sync_client: SyncSessionClient, raw: GlideClient, uid: str
) -> None:
    def work() -> tuple[str, list[int], list[str], list[str], int]:
        s = sync_client.create_session(uid, title="sync", labels={"k": "v"}, max_messages=10)
        first = sync_client.append(s.session_id, [system("be brief"), user("hi", tokens=3)])
        sync_client.append(s.session_id, [user(f"m{i}") for i in range(3)], expected_last_seq=2)
        updated = sync_client.update_session(s.session_id, title="renamed")
        assert updated.title == "renamed"
        assert sync_client.get_session(s.session_id).message_count == 5
        newest = sync_client.list_messages(s.session_id, page_size=2)
        assert [m.seq for m in newest.messages] == [4, 5]
        assert newest.has_more
        every = [m.content for m in sync_client.iter_messages(s.session_id, page_size=2)]
        listed = [x.session_id for x in sync_client.iter_sessions(uid, page_size=1)]
        one_page = sync_client.list_sessions(uid, page_size=1)
        return s.session_id, [m.seq for m in first.messages], every, listed, len(one_page.sessions)

    session_id, first_seqs, every, listed, page_length = await asyncio.to_thread(work)
    assert first_seqs == [1, 2]
    assert every == ["be brief", "hi", "m0", "m1", "m2"]
    assert listed == [session_id]
    assert page_length == 1
    assert [m["content"] for m in await stored_messages(raw, session_id)] == every
    await asyncio.to_thread(sync_client.delete_session, session_id)
    assert await stored_messages(raw, session_id) == []
    error = await asyncio.to_thread(pytest.raises, NotFoundError, sync_client.get_session, session_id)
    assert error.value.resource is not None
    assert error.value.resource.resource_name == session_id


async def test_an_optimistic_append_that_lost_the_race_is_a_seq_mismatch(
    sync_client: SyncSessionClient, raw: GlideClient, uid: str
) -> None:
    s = await asyncio.to_thread(sync_client.create_session, uid)
    await asyncio.to_thread(sync_client.append, s.session_id, [user("a")], expected_last_seq=0)
    with pytest.raises(SeqMismatchError) as info:
        await asyncio.to_thread(sync_client.append, s.session_id, [user("b")], expected_last_seq=0)
    assert info.value.precondition_violations[0].subject == "expected_last_seq"
    assert [m["content"] for m in await stored_messages(raw, s.session_id)] == ["a"]


async def test_a_blocking_watch_follows_appends_until_the_session_is_deleted(
    sync_client: SyncSessionClient, client: SessionClient, uid: str
) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("before")])
    delivered: asyncio.Queue[pb.WatchMessagesResponse] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def follow() -> None:
        for event in sync_client.watch(s.session_id, after_seq=0):
            loop.call_soon_threadsafe(delivered.put_nowait, event)

    watching = asyncio.create_task(asyncio.to_thread(follow))
    assert (await asyncio.wait_for(delivered.get(), 10)).message.content == "before"
    await client.append(s.session_id, [user("live")])
    live = await asyncio.wait_for(delivered.get(), 10)
    assert (live.message.seq, live.message.content) == (2, "live")
    await client.delete_session(s.session_id)
    with pytest.raises(NotFoundError):
        await asyncio.wait_for(watching, 10)


async def summary_of(raw: GlideClient, session_id: str) -> dict[str, Any] | None:
    value = await raw.get(f"summary:{{{session_id}}}")
    return None if value is None else json.loads(value)


async def test_the_blocking_client_reads_context_compacts_forks_clears_and_reads_usage(
    sync_client: SyncSessionClient, raw: GlideClient, uid: str
) -> None:
    sid = f"{uid}-s"
    s = await asyncio.to_thread(sync_client.create_session, uid, session_id=sid, model="m1")
    opening = [
        system("be brief", tokens=2),
        user("a", tokens=3),
        assistant("b", tokens=4),
        user("c", tokens=5),
    ]
    await asyncio.to_thread(sync_client.append, s.session_id, opening)

    masked = await asyncio.to_thread(sync_client.get_session, sid, read_mask=["token_count"])
    assert (masked.token_count, masked.message_count, masked.user_id) == (14, 0, "")  # that field alone

    context = await asyncio.to_thread(sync_client.get_context, sid, max_tokens=7)
    assert ([m.seq for m in context.messages], context.tokens, context.truncated) == ([1, 4], 7, True)

    forked = await asyncio.to_thread(sync_client.fork_session, sid, at_seq=3, new_session_id=f"{uid}-f")
    assert (forked.session.session_id, forked.session.message_count, forked.replayed) == (
        f"{uid}-f",
        3,
        False,
    )
    assert [m["content"] for m in await stored_messages(raw, f"{uid}-f")] == ["be brief", "a", "b"]

    compacted = await asyncio.to_thread(
        sync_client.compact_messages, sid, 3, assistant("asked a, got b", tokens=1), request_id="c1"
    )
    assert (compacted.summary.seq, compacted.replayed) == (3, False)
    summary = await summary_of(raw, sid)
    assert summary is not None
    assert (summary["content"], summary["summarizes"]) == ("asked a, got b", [2, 3])
    assert [m["seq"] for m in await stored_messages(raw, sid)] == [1, 4]
    again = await asyncio.to_thread(
        sync_client.compact_messages, sid, 3, assistant("asked a, got b", tokens=1), request_id="c1"
    )
    assert again.replayed

    cleared = await asyncio.to_thread(sync_client.clear_messages, sid, keep_system_prompt=True)
    assert cleared.message_count == 4  # counters stay
    assert [m["content"] for m in await stored_messages(raw, sid)] == ["be brief"]
    assert await summary_of(raw, sid) is None

    usage = await asyncio.to_thread(sync_client.get_user_usage, uid)
    # The fork is a session created; the messages it copied are not appended ones.
    assert (usage.total.messages, usage.total.tokens, usage.total.sessions) == (4, 14, 2)
    assert [m.model for m in usage.models] == ["m1"]


def session_keys(session_id: str) -> list[str]:
    return [f"{prefix}:{{{session_id}}}" for prefix in ("chat", "meta", "reqs", "summary")]


async def dumps(raw: GlideClient, session_id: str) -> list[Any]:
    """DUMP of each of the session's keys (None where there is none)."""
    return [await raw.custom_command(["DUMP", key]) for key in session_keys(session_id)]


@pytest.mark.parametrize(
    ("refused", "expected", "subject"),
    [
        (lambda c, sid, new: c.get_context(sid, max_tokens=2), ContextOverBudgetError, "max_tokens"),
        (lambda c, sid, new: c.compact_messages(sid, 9, system("s")), UpToSeqAheadError, "up_to_seq"),
        (lambda c, sid, new: c.compact_messages(sid, 1, system("s")), UpToSeqInPromptError, "up_to_seq"),
        (lambda c, sid, new: c.compact_messages(sid, 2, system("s")), AlreadyCompactedError, "up_to_seq"),
        (
            lambda c, sid, new: c.fork_session(sid, at_seq=9, new_session_id=new),
            AtSeqBeyondLastError,
            "at_seq",
        ),
        (lambda c, sid, new: c.fork_session(sid, at_seq=2, new_session_id=new), AtSeqTrimmedError, "at_seq"),
    ],
    ids=["over-budget", "ahead", "in-prompt", "already-compacted", "beyond-last", "trimmed"],
)
async def test_refusals_of_the_new_calls_are_typed_and_change_nothing(
    sync_client: SyncSessionClient,
    raw: GlideClient,
    uid: str,
    refused: Callable[[SyncSessionClient, str, str], object],
    expected: type[FailedPreconditionError],
    subject: str,
) -> None:
    sid, new = f"{uid}-s", f"{uid}-f"
    await asyncio.to_thread(sync_client.create_session, uid, session_id=sid)
    # The prompt (2 tokens) at 1, 2-3 compacted into a summary (1 token) at 3, then 4 and 5.
    turns = [system("p", tokens=2), user("a"), assistant("b"), user("c"), assistant("d")]
    await asyncio.to_thread(sync_client.append, sid, turns)
    await asyncio.to_thread(sync_client.compact_messages, sid, 3, system("a, b", tokens=1))
    before = await dumps(raw, sid)

    with pytest.raises(expected) as info:
        await asyncio.to_thread(refused, sync_client, sid, new)
    assert [(v.type, v.subject) for v in info.value.precondition_violations] == [
        (expected.violation_type, subject)
    ]
    assert await dumps(raw, sid) == before
    assert await session_keys_exist(raw, new) == 0
    await asyncio.to_thread(sync_client.fork_session, sid, new_session_id=new)  # the same read sees a fork
    assert await session_keys_exist(raw, new) == 2


async def test_a_compaction_retried_after_a_clear_is_summary_cleared(
    sync_client: SyncSessionClient, raw: GlideClient, uid: str
) -> None:
    s = await asyncio.to_thread(sync_client.create_session, uid)
    await asyncio.to_thread(sync_client.append, s.session_id, [user("a"), user("b")])

    def compact() -> object:
        return sync_client.compact_messages(s.session_id, 1, system("a"), request_id="once")

    await asyncio.to_thread(compact)
    assert await summary_of(raw, s.session_id) is not None  # the read below sees the summary
    await asyncio.to_thread(sync_client.clear_messages, s.session_id)
    with pytest.raises(SummaryClearedError):
        await asyncio.to_thread(compact)
    assert await stored_messages(raw, s.session_id) == []
    assert await summary_of(raw, s.session_id) is None


async def test_the_blocking_client_stores_and_reads_back_a_payload(
    sync_client: SyncSessionClient, raw: GlideClient, uid: str
) -> None:
    payload = {"type": "function_call", "x": 0.30000000000000004, "ids": [2**53, -0.0], "none": None}

    def work() -> tuple[Any, Any, Any]:
        s = sync_client.create_session(uid)
        appended = sync_client.append(s.session_id, [assistant("calling", payload=payload), user("plain")])
        listed = sync_client.list_messages(s.session_id).messages
        context = sync_client.get_context(s.session_id).messages
        return (
            [payload_of(m, "none") for m in appended.messages],
            [payload_of(m, "none") for m in listed],
            [payload_of(m, "none") for m in context],
        )

    appended, listed, context = await asyncio.to_thread(work)
    assert appended == listed == context == [payload, "none"]
    assert str(listed[0]["ids"][1]) == "-0.0"
