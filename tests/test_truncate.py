"""TruncateMessages and pop_message: the tail removed in one step with its side effects checked
in Valkey (LIST, meta fields, request records, usage), the edges (the pinned prompt, a summary,
the window's start, nothing to remove, an empty session), refusals that change nothing, retries,
concurrency, what a watch is told; and a model-based run of appends, truncations, pops,
compactions and the window together, checked after every step against what the service promises."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from glide import GlideClient

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import (
    AfterSeqAheadError,
    AfterSeqTrimmedError,
    InvalidArgumentError,
    NotFoundError,
    PoppedMessageLostError,
    RemovedTooLargeError,
    RequestIdReusedError,
    SeqMismatchError,
    SessionClient,
    SyncSessionClient,
    assistant,
    payload_of,
    system,
    user,
)
from chatsession_server.api.watch import Watch
from chatsession_server.app import RunningServer
from chatsession_server.domain import Heartbeat, NewMessage, NewSession, Role, StoredMessage, Truncated
from chatsession_server.settings import Settings
from chatsession_server.store.feed import _parse as parse_publish
from tests.helpers import (
    as_is,
    eventually,
    meta,
    new_session,
    raises,
    serving,
    stored_messages,
    violated_fields,
)


def seqs(messages: Any) -> list[int]:
    return [m.seq for m in messages]


async def dumps(raw: GlideClient, session_id: str) -> list[Any]:
    """DUMP of each of the session's keys (None where there is none)."""
    keys = [f"{prefix}:{{{session_id}}}" for prefix in ("chat", "meta", "reqs", "summary")]
    return [await raw.custom_command(["DUMP", key]) for key in keys]


async def stored_bytes_match(raw: GlideClient, session_id: str) -> None:
    """meta's stored_bytes is exactly what the LIST and the summary hold."""
    items = await raw.lrange(f"chat:{{{session_id}}}", 0, -1)
    summary = await raw.get(f"summary:{{{session_id}}}")
    expected = sum(len(item) for item in items) + (len(summary) if summary else 0)
    assert int((await meta(raw, session_id))["stored_bytes"]) == expected


async def usage(raw: GlideClient, user_id: str) -> dict[bytes, bytes]:
    return dict(await raw.hgetall(f"usage:{{{user_id}}}"))


async def conversation(client: SessionClient, uid: str, **create: Any) -> str:
    """Prompt (seq 1, 5 tokens), then user/assistant turns: seqs 2..6, 10+20+30+40+50 tokens."""
    s = await client.create_session(uid, **create)
    await client.append(
        s.session_id,
        [
            system("You are terse.", tokens=5),
            user("one", tokens=10),
            assistant("two", tokens=20),
            user("three", tokens=30),
            assistant("four", tokens=40),
            user("five", tokens=50),
        ],
    )
    return s.session_id


async def all_messages(client: SessionClient, sid: str) -> list[int]:
    page = await client.list_messages(sid, after_seq=0, page_size=1000)
    return seqs(page.messages)


async def test_pop_returns_the_newest_and_the_next_append_gets_message_count_plus_one(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    usage_before = await usage(raw, uid)
    last_active = (await meta(raw, sid))["last_active"]
    listed_at = await raw.zscore(f"user_sessions:{{{uid}}}", sid)
    popped = await client.pop_message(sid)
    assert popped is not None
    assert (popped.seq, popped.content, popped.tokens) == (6, "five", 50)

    fields = await meta(raw, sid)
    # Seqs are never reused: the counters keep counting what was appended.
    assert (fields["message_count"], fields["token_count"], fields.get("holes")) == ("6", "155", "1")
    assert [m["seq"] for m in await stored_messages(raw, sid)] == [1, 2, 3, 4, 5]
    await stored_bytes_match(raw, sid)
    assert await usage(raw, uid) == usage_before  # billing never goes down
    # No activity of the user's: the session keeps its place in the owner's listing.
    assert (fields["last_active"], fields["rewrites"]) == (last_active, "1")
    assert await raw.zscore(f"user_sessions:{{{uid}}}", sid) == listed_at

    session = await client.get_session(sid)
    assert (session.message_count, session.token_count, session.messages_stored) == (6, 155, 5)
    appended = await client.append(sid, [assistant("five again", tokens=7)])
    assert seqs(appended.messages) == [7]

    page = await client.list_messages(sid, after_seq=0)
    assert (seqs(page.messages), page.last_seq, page.window_start_seq, page.history_trimmed) == (
        [1, 2, 3, 4, 5, 7],
        7,
        2,  # the window's first seq, after the prompt
        False,
    )
    newest = await client.list_messages(sid, page_size=2)
    assert (seqs(newest.messages), newest.has_more) == ([5, 7], True)
    before = await client.list_messages(sid, before_seq=7, page_size=2)
    assert (seqs(before.messages), before.has_more) == ([4, 5], True)
    context = await client.get_context(sid)
    assert (seqs(context.messages), context.tokens) == ([1, 2, 3, 4, 5, 7], 5 + 10 + 20 + 30 + 40 + 7)


async def test_truncate_after_a_seq_returns_the_removed_oldest_first(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    reply = await client.truncate_messages(sid, 3, return_removed=True)
    assert (reply.removed_count, reply.after_seq, reply.replayed) == (3, 3, False)
    assert [(m.seq, m.content) for m in reply.removed_messages] == [(4, "three"), (5, "four"), (6, "five")]
    assert (reply.session.message_count, reply.session.messages_stored) == (6, 3)
    assert await all_messages(client, sid) == [1, 2, 3]
    await stored_bytes_match(raw, sid)

    quiet = await client.truncate_messages(sid, 2)  # without return_removed: only the count
    assert (quiet.removed_count, list(quiet.removed_messages)) == (1, [])
    assert await all_messages(client, sid) == [1, 2]


async def test_pop_count_removes_the_newest_few(client: SessionClient, raw: GlideClient, uid: str) -> None:
    sid = await conversation(client, uid)
    reply = await client.truncate_messages(sid, pop_count=2, return_removed=True)
    assert (seqs(reply.removed_messages), reply.after_seq) == ([5, 6], 4)
    await client.append(sid, [user("six")])  # seq 7, after the hole 5..6
    reply = await client.truncate_messages(sid, pop_count=2, return_removed=True)
    assert (seqs(reply.removed_messages), reply.after_seq) == ([4, 7], 3)
    everything = await client.truncate_messages(sid, pop_count=100, return_removed=True)
    assert (seqs(everything.removed_messages), everything.after_seq) == ([1, 2, 3], 0)
    assert await raw.exists([f"chat:{{{sid}}}"]) == 0
    fields = await meta(raw, sid)
    assert (fields["pinned"], fields["stored_bytes"], fields.get("holes")) == ("0", "0", None)
    assert await client.pop_message(sid) is None


async def test_truncating_into_the_prompt_shrinks_it_for_good(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    sid = s.session_id
    await client.append(sid, [system("a"), system("b"), user("hi")])
    assert (await meta(raw, sid))["pinned"] == "2"
    reply = await client.truncate_messages(sid, 1, return_removed=True)
    assert seqs(reply.removed_messages) == [2, 3]
    assert (await meta(raw, sid))["pinned"] == "1"
    # A system message appended now is not at the session's start: it is not pinned (as after a clear).
    await client.append(sid, [system("c")])
    assert (await meta(raw, sid))["pinned"] == "1"
    await client.update_session(sid, max_messages=2)
    assert await all_messages(client, sid) == [1, 4]
    await stored_bytes_match(raw, sid)


async def test_a_summary_goes_only_whole_and_a_seq_it_replaced_is_refused(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    await client.compact_messages(sid, 4, assistant("Summary of 2-4.", tokens=3))
    snapshot = await dumps(raw, sid)
    error = await raises(AfterSeqTrimmedError, client.truncate_messages(sid, 3))
    assert [(v.type, v.subject) for v in error.precondition_violations] == [
        ("AFTER_SEQ_TRIMMED", "after_seq")
    ]
    assert "0-1 (the prompt), 4 (keeps the summary)" in error.message
    assert await dumps(raw, sid) == snapshot

    kept = await client.truncate_messages(sid, 4, return_removed=True)
    assert seqs(kept.removed_messages) == [5, 6]
    assert await raw.exists([f"summary:{{{sid}}}"]) == 1
    summary = await client.pop_message(sid)
    assert summary is not None
    assert (summary.seq, summary.summarizes.first_seq, summary.summarizes.last_seq) == (4, 2, 4)
    assert await raw.exists([f"summary:{{{sid}}}"]) == 0
    await stored_bytes_match(raw, sid)
    prompt = await client.pop_message(sid)
    assert prompt is not None
    assert prompt.seq == 1
    assert await client.pop_message(sid) is None
    session = await client.get_session(sid)
    assert (session.message_count, session.messages_stored) == (6, 0)
    assert seqs((await client.append(sid, [user("again")])).messages) == [7]


async def test_a_summary_and_the_prompt_go_with_a_cut_before_them(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    await client.compact_messages(sid, 4, assistant("Summary.", tokens=3))
    reply = await client.truncate_messages(sid, 0, return_removed=True)
    assert seqs(reply.removed_messages) == [1, 4, 5, 6]
    assert reply.removed_messages[1].summarizes.last_seq == 4
    assert await raw.exists([f"chat:{{{sid}}}", f"summary:{{{sid}}}"]) == 0
    assert (await meta(raw, sid))["stored_bytes"] == "0"


async def test_below_the_window_start_is_refused_and_the_prompt_or_start_is_allowed(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid, max_messages=4)  # keeps 1 and 4..6
    assert await all_messages(client, sid) == [1, 4, 5, 6]
    snapshot = await dumps(raw, sid)
    error = await raises(AfterSeqTrimmedError, client.truncate_messages(sid, 2))
    assert "truncate at 0-1 (the prompt) or after 3" in error.message
    await raises(AfterSeqTrimmedError, client.truncate_messages(sid, 3))
    assert await dumps(raw, sid) == snapshot
    reply = await client.truncate_messages(sid, 4)
    assert (reply.removed_count, await all_messages(client, sid)) == (2, [1, 4])
    page = await client.list_messages(sid, after_seq=0)
    assert (page.window_start_seq, page.history_trimmed) == (4, True)
    reply = await client.truncate_messages(sid, 1)  # the whole window, the prompt stays
    assert (reply.removed_count, await all_messages(client, sid)) == (1, [1])
    assert "holes" not in await meta(raw, sid)


async def test_nothing_to_remove_succeeds_and_beyond_the_last_seq_is_refused(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    empty = (await client.create_session(uid)).session_id
    assert await client.pop_message(empty) is None
    assert (await client.truncate_messages(empty, 0)).removed_count == 0
    ahead = await raises(AfterSeqAheadError, client.truncate_messages(empty, 1))
    assert [(v.type, v.subject) for v in ahead.precondition_violations] == [("AFTER_SEQ_AHEAD", "after_seq")]

    sid = await conversation(client, uid)
    snapshot = await dumps(raw, sid)
    assert (await client.truncate_messages(sid, 6, request_id="noop-1")).removed_count == 0
    await raises(AfterSeqAheadError, client.truncate_messages(sid, 7))
    # Only the request record (a retry after an append must not remove it): not even a rewrite counted.
    changed = await dumps(raw, sid)
    assert (changed[:2], changed[3]) == (snapshot[:2], snapshot[3])
    assert await raw.hget(f"reqs:{{{sid}}}", "noop-1") == b"ta6 6 0"
    await client.truncate_messages(sid, 3)
    in_the_hole = await client.truncate_messages(sid, 5)  # 4..6 are gone already
    assert (in_the_hole.removed_count, in_the_hole.after_seq) == (0, 5)


async def test_a_retry_removes_nothing_more_even_after_new_appends(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    first = await client.truncate_messages(sid, 3, request_id="undo-1", return_removed=True)
    assert (first.removed_count, first.replayed) == (3, False)
    assert await raw.hget(f"reqs:{{{sid}}}", "undo-1") == b"ta3 3 3"
    await client.append(sid, [user("new turn")])  # seq 7
    again = await client.truncate_messages(sid, 3, request_id="undo-1", return_removed=True)
    assert (again.removed_count, again.after_seq, again.replayed, list(again.removed_messages)) == (
        3,
        3,
        True,
        [],
    )
    assert await all_messages(client, sid) == [1, 2, 3, 7]

    reused = await raises(RequestIdReusedError, client.truncate_messages(sid, 2, request_id="undo-1"))
    assert [v.subject for v in reused.precondition_violations] == ["request_id"]
    await client.append(sid, [user("x")], request_id="append-1")
    await raises(RequestIdReusedError, client.truncate_messages(sid, 2, request_id="append-1"))
    await raises(RequestIdReusedError, client.pop_message(sid, request_id="undo-1"))
    assert await all_messages(client, sid) == [1, 2, 3, 7, 8]

    # A pop whose answer was lost: the retry can only say that it was done.
    await client.truncate_messages(sid, pop_count=1, request_id="pop-1", return_removed=True)
    with pytest.raises(PoppedMessageLostError):
        await client.pop_message(sid, request_id="pop-1")
    assert await all_messages(client, sid) == [1, 2, 3, 7]


async def test_a_stale_expected_last_seq_changes_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    snapshot = await dumps(raw, sid)
    error = await raises(SeqMismatchError, client.truncate_messages(sid, 3, expected_last_seq=5))
    assert [(v.type, v.subject) for v in error.precondition_violations] == [
        ("LAST_SEQ_MISMATCH", "expected_last_seq")
    ]
    assert "last seq is 6, not 5" in error.message
    assert await dumps(raw, sid) == snapshot
    ok = await client.truncate_messages(sid, pop_count=1, expected_last_seq=6)
    assert ok.removed_count == 1


async def test_removed_messages_past_a_reply_are_refused_and_nothing_is_removed(
    server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = f"{uid}-many"
    await server.store.create(
        NewSession(sid, uid, model="", title="", labels={}, ttl_seconds=600, max_messages=-1)
    )
    for _ in range(2):
        await server.store.append(sid, [NewMessage(Role.USER, "m", tokens=1) for _ in range(501)])
    snapshot = await dumps(raw, sid)
    error = await raises(RemovedTooLargeError, client.truncate_messages(sid, 0, return_removed=True))
    assert [(v.type, v.subject) for v in error.precondition_violations] == [
        ("REMOVED_TOO_LARGE", "return_removed")
    ]
    assert "1002 messages" in error.message
    assert await dumps(raw, sid) == snapshot
    thousand = await client.truncate_messages(sid, pop_count=1000, return_removed=True)
    assert seqs(thousand.removed_messages) == list(range(3, 1003))

    big = f"{uid}-big"
    await server.store.create(
        NewSession(big, uid, model="", title="", labels={}, ttl_seconds=600, max_messages=-1)
    )
    for _ in range(4):
        await server.store.append(big, [NewMessage(Role.USER, "x" * 200_000, tokens=1) for _ in range(4)])
    snapshot = await dumps(raw, big)
    error = await raises(RemovedTooLargeError, client.truncate_messages(big, 0, return_removed=True))
    assert "bytes of them" in error.message
    assert await dumps(raw, big) == snapshot
    fits = await client.truncate_messages(big, 2, return_removed=True)  # 14 of ~200 KB
    assert len(fits.removed_messages) == 14
    whole = await client.truncate_messages(big, 0)  # without them, any number
    assert (whole.removed_count, whole.session.messages_stored) == (2, 0)
    await stored_bytes_match(raw, big)


async def test_bad_requests_name_their_fields_and_change_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    snapshot = await dumps(raw, sid)
    cases: list[tuple[pb.TruncateMessagesRequest, set[str]]] = [
        (pb.TruncateMessagesRequest(session_id=sid), {"after_seq"}),
        (pb.TruncateMessagesRequest(session_id=sid, after_seq=-1), {"after_seq"}),
        (pb.TruncateMessagesRequest(session_id=sid, after_seq=2, pop_count=1), {"pop_count"}),
        (pb.TruncateMessagesRequest(session_id=sid, pop_count=-1), {"pop_count"}),
        (
            pb.TruncateMessagesRequest(session_id=sid, pop_count=1, expected_last_seq=-6),
            {"expected_last_seq"},
        ),
        (pb.TruncateMessagesRequest(session_id=sid, pop_count=1, request_id="no spaces"), {"request_id"}),
        (pb.TruncateMessagesRequest(after_seq=0), {"session_id"}),
        (pb.TruncateMessagesRequest(session_id="bad id!", after_seq=0), {"session_id"}),
    ]
    for request, fields in cases:
        error = await raises(InvalidArgumentError, client._call(client._stub.TruncateMessages, request))
        assert violated_fields(error) == fields, request
    await raises(NotFoundError, client.truncate_messages(f"{uid}-missing", 0))
    await raises(NotFoundError, client.pop_message(f"{uid}-missing"))
    assert await dumps(raw, sid) == snapshot


async def test_concurrent_appends_and_pops_lose_and_duplicate_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid, max_messages=-1)).session_id
    await client.append(sid, [user(f"seed {i}") for i in range(15)])
    _, pops = await asyncio.gather(
        asyncio.gather(*(client.append(sid, [user(f"a {i}")]) for i in range(20))),
        asyncio.gather(*(client.pop_message(sid) for _ in range(15))),
    )
    popped = [m.seq for m in pops if m is not None]
    assert len(popped) == len(set(popped)) == 15  # never fewer than 15 stored: each pop found one
    left = await all_messages(client, sid)
    assert sorted(left + popped) == list(range(1, 36))
    session = await client.get_session(sid)
    assert (session.message_count, session.messages_stored) == (35, 20)
    assert await raw.llen(f"chat:{{{sid}}}") == 20
    await stored_bytes_match(raw, sid)


async def test_a_watch_is_told_once_and_goes_on_after_the_last_seq(client: SessionClient, uid: str) -> None:
    sid = await conversation(client, uid)
    events: list[tuple[str, Any]] = []

    async def follow() -> None:
        async for event in client.watch(sid, include_heartbeats=True):
            kind = str(event.WhichOneof("event"))
            if kind == "heartbeat":
                if not events:
                    events.append((kind, event.heartbeat.last_seq))
                continue
            value = (
                (event.truncated.after_seq, event.truncated.last_seq)
                if kind == "truncated"
                else event.message.seq
            )
            events.append((kind, value))
            if kind == "message":
                return

    task = asyncio.create_task(follow())
    for _ in range(200):
        if events:
            break
        await asyncio.sleep(0.02)
    assert events == [("heartbeat", 6)]
    await client.truncate_messages(sid, 6)  # nothing to remove: nothing to tell
    await client.truncate_messages(sid, 3)
    await client.truncate_messages(sid, 3)  # nothing more
    await client.append(sid, [user("after")])
    await asyncio.wait_for(task, 30)
    assert events == [("heartbeat", 6), ("truncated", (3, 6)), ("message", 7)]


async def test_a_watch_reading_past_a_hole_reports_no_trimming(client: SessionClient, uid: str) -> None:
    sid = await conversation(client, uid)
    await client.truncate_messages(sid, 3)
    await client.append(sid, [user("after")])  # 1..3, 7
    kinds: list[tuple[str, int]] = []
    async for event in client.watch(sid, after_seq=0):
        kinds.append((str(event.WhichOneof("event")), event.message.seq))
        if event.message.seq == 7:
            break
    assert kinds == [("message", 1), ("message", 2), ("message", 3), ("message", 7)]


async def first_events(client: SessionClient, sid: str, after_seq: int) -> list[tuple[str, Any]]:
    """What a watch resumed after `after_seq` is told up to its first message."""
    kinds: list[tuple[str, Any]] = []
    async for event in client.watch(sid, after_seq=after_seq):
        kind = str(event.WhichOneof("event"))
        cut = event.truncated
        kinds.append((kind, (cut.after_seq, cut.last_seq) if kind == "truncated" else event.message.seq))
        if kind == "message":
            break
    return kinds


async def test_a_watch_resumed_within_what_a_truncation_removed_is_told_first(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)  # the watcher delivered 1..5, then lost its stream
    await client.truncate_messages(sid, 3)
    await client.append(sid, [user("after")])
    assert (await meta(raw, sid))["truncated"] == "3 6 1"
    assert await asyncio.wait_for(first_events(client, sid, 5), 30) == [("truncated", (3, 6)), ("message", 7)]
    # Resumed before the cut (it holds nothing removed) or past it (it saw what came after): not told.
    assert await asyncio.wait_for(first_events(client, sid, 3), 30) == [("message", 7)]
    await client.append(sid, [user("more")])
    assert await asyncio.wait_for(first_events(client, sid, 7), 30) == [("message", 8)]
    # A truncation reaching into the removed run joins it: 2..8 are one run of removed seqs.
    await client.truncate_messages(sid, 2)
    await client.append(sid, [user("again")])
    assert (await meta(raw, sid))["truncated"] == "2 8 2"
    assert await asyncio.wait_for(first_events(client, sid, 5), 30) == [("truncated", (2, 8)), ("message", 9)]


def test_the_truncation_publish_reads_back() -> None:
    assert parse_publish(b"T3 6 alice 2") == Truncated(3, 6, "alice", 2)


async def test_the_sync_client_truncates_and_pops(target: str, uid: str) -> None:
    async with SessionClient(target) as client:
        sid = await conversation(client, uid)

    def use() -> tuple[Any, Any, Any]:
        with SyncSessionClient(target) as sync:
            cut = sync.truncate_messages(sid, 4, return_removed=True)
            return cut, sync.pop_message(sid), sync.pop_message(sid)

    cut, first, second = await asyncio.to_thread(use)
    assert seqs(cut.removed_messages) == [5, 6]
    assert first is not None
    assert second is not None
    assert (first.seq, second.seq) == (4, 3)


async def test_fork_and_compaction_count_across_holes(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    await client.truncate_messages(sid, 3)
    await client.append(sid, [user("seven"), assistant("eight")])  # 1..3, 7, 8
    fork = await client.fork_session(sid, at_seq=7)
    assert await all_messages(client, fork.session.session_id) == [1, 2, 3, 4]  # renumbered
    in_hole = await client.fork_session(sid, at_seq=5)  # what the session held at 5: 1..3
    assert await all_messages(client, in_hole.session.session_id) == [1, 2, 3]
    await client.compact_messages(sid, 7, assistant("Summary.", tokens=1))
    assert await all_messages(client, sid) == [1, 7, 8]
    await stored_bytes_match(raw, sid)


# --- A model of the whole -----------------------------------------------------------------------


@dataclass
class Model:
    """What the service promises: the prompt's seqs (1..pinned), the summary's (seq, first), the
    window's seqs, message_count."""

    max_messages: int
    prompt: list[int] = field(default_factory=list)
    summary: tuple[int, int] | None = None
    window: list[int] = field(default_factory=list)
    message_count: int = 0
    cut: tuple[int, int] | None = None
    """(after, last): the seqs the latest truncations removed (meta's truncated)"""

    def items(self) -> list[int]:
        return self.prompt + ([self.summary[0]] if self.summary else []) + self.window

    def base(self) -> int:
        return self.window[0] - 1 if self.window else self.message_count

    def append(self, roles: list[str]) -> None:
        for role in roles:
            self.message_count += 1
            seq = self.message_count
            if role == "system" and len(self.prompt) == seq - 1 and len(self.prompt) < 16:
                self.prompt.append(seq)
            else:
                self.window.append(seq)
        keep = max(self.max_messages - len(self.prompt), 1)
        if self.max_messages > 0 and len(self.window) > keep:
            del self.window[: len(self.window) - keep]

    def truncate(self, after: int) -> tuple[str, int]:
        """The outcome ("ok", removed) or the refusal."""
        if after > self.message_count:
            return "ahead", 0
        removed = [s for s in self.items() if s > after]
        summary_seq = self.summary[0] if self.summary else -1
        was_cut = self.cut is not None and self.cut[0] < after and self.base() <= self.cut[1]
        if removed and len(self.prompt) < after <= self.base() and after != summary_seq and not was_cut:
            return "trimmed", 0
        if removed:
            earlier = self.cut[0] if self.cut and after < self.cut[1] else after
            self.cut = (min(after, earlier), self.message_count)
        self.prompt = [s for s in self.prompt if s <= after]
        if self.summary and self.summary[0] > after:
            self.summary = None
        self.window = [s for s in self.window if s <= after]
        return "ok", len(removed)

    def pop_after(self, count: int) -> int:
        items = self.items()
        kept = len(items) - count
        return items[kept - 1] if kept > 0 else 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_model_of_appends_truncations_pops_and_compactions(
    client: SessionClient, raw: GlideClient, uid: str, seed: int
) -> None:
    rng = random.Random(seed)
    model = Model(max_messages=rng.choice([-1, 5, 9]))
    ttl = -1 if seed % 2 else 3600  # a session that never expires, or one that does
    sid = (await client.create_session(uid, max_messages=model.max_messages, ttl_seconds=ttl)).session_id
    state: dict[str, Any] = {}
    usage_now = await usage(raw, uid)
    # A live watch follows the whole run: every event once, in the order of the writes.
    watched: list[tuple[Any, ...]] = []
    expected_events: list[tuple[Any, ...]] = []

    async def follow() -> None:
        async for event in client.watch(sid, include_heartbeats=True):
            kind = event.WhichOneof("event")
            if kind == "message":
                watched.append(("message", event.message.seq))
            elif kind == "truncated":
                watched.append(("truncated", event.truncated.after_seq, event.truncated.last_seq))
            elif kind == "compacted":
                cut = event.compacted.summarizes
                watched.append(("compacted", cut.first_seq, cut.last_seq))
            elif kind != "heartbeat":
                watched.append((kind,))
            elif not watched:
                watched.append(("live",))

    watcher = asyncio.create_task(follow())
    await eventually(lambda: watched == [("live",)])
    rewrites, compaction_record = 0, None  # meta's `rewrites` and `compacted`, as the service promises
    for step in range(45):
        op = rng.choice(["append", "append", "truncate", "pop", "compact"])
        if op == "append":
            roles = [rng.choice(["system", "user", "assistant"]) for _ in range(rng.randint(1, 3))]
            delta = {f"k{rng.randint(1, 3)}": step} if rng.random() < 0.5 else None
            await client.append(
                sid, [system(r) if r == "system" else user(r, tokens=2) for r in roles], state_delta=delta
            )
            state.update(delta or {})
            expected_events += [("message", model.message_count + 1 + i) for i in range(len(roles))]
            model.append(roles)
            usage_now = await usage(raw, uid)
        elif op in ("truncate", "pop"):
            count = rng.randint(1, 3)
            after = rng.randint(0, model.message_count + 1) if op == "truncate" else model.pop_after(count)
            expected, removed = model.truncate(after)
            try:
                if op == "truncate":
                    reply = await client.truncate_messages(sid, after, return_removed=True)
                else:
                    reply = await client.truncate_messages(sid, pop_count=count, return_removed=True)
                outcome = ("ok", reply.removed_count, reply.after_seq)
                assert len(reply.removed_messages) == reply.removed_count
            except AfterSeqAheadError:
                outcome = ("ahead", 0, after)
            except AfterSeqTrimmedError:
                outcome = ("trimmed", 0, after)
            assert outcome == (expected, removed, after), (step, op, after, model)
            assert await usage(raw, uid) == usage_now
            if removed:
                expected_events.append(("truncated", after, model.message_count))
                rewrites += 1
                if model.summary is None:  # removed with the summary
                    compaction_record = None
        else:
            low = max(len(model.prompt) + 1, model.summary[0] if model.summary else 0)
            if low > model.message_count:
                continue
            up_to = rng.randint(low, model.message_count)
            await client.compact_messages(sid, up_to, assistant("S", tokens=1))
            expected_events.append(("compacted", len(model.prompt) + 1, up_to))
            model.summary = (up_to, len(model.prompt) + 1)
            model.window = [s for s in model.window if s > up_to]
            rewrites += 1
            compaction_record = f"{len(model.prompt) + 1} {up_to} {rewrites}"

        expected_items = model.items()
        assert await all_messages(client, sid) == expected_items, (step, op, model)
        forward: list[int] = []
        after_seq: int | None = 0
        while after_seq is not None:
            page = await client.list_messages(sid, after_seq=after_seq, page_size=2)
            forward += seqs(page.messages)
            after_seq = page.messages[-1].seq if page.has_more else None
        assert forward == expected_items, (step, model)
        backward: list[int] = []
        before: int | None = None
        while True:
            page = await client.list_messages(sid, page_size=2, **({"before_seq": before} if before else {}))
            backward = seqs(page.messages) + backward
            if not page.has_more:
                break
            before = page.messages[0].seq
        assert backward == expected_items, (step, model)
        assert page.window_start_seq == model.base() + 1, (step, model)
        assert seqs((await client.get_context(sid)).messages) == expected_items
        session = await client.get_session(sid)
        assert (session.message_count, session.messages_stored) == (
            model.message_count,
            len(model.prompt) + len(model.window),
        )
        first_stored = await raw.lindex(f"chat:{{{sid}}}", 0)
        assert (json.loads(first_stored)["seq"] if first_stored else None) == next(
            iter(model.prompt + model.window), None
        )
        await stored_bytes_match(raw, sid)
        stored_meta = await meta(raw, sid)
        assert (stored_meta.get("compacted"), int(stored_meta.get("rewrites", "0"))) == (
            compaction_record,
            rewrites,
        ), (step, op, model)
        assert await client.get_state(sid) == state
        # Every key the session has expires with meta, or none does (ttl -1).
        for prefix in ("chat", "reqs", "summary", "state"):
            key_ttl = await raw.ttl(f"{prefix}:{{{sid}}}")
            assert key_ttl == -2 or (key_ttl == -1) == (ttl == -1), (step, op, prefix, key_ttl)
        assert (await raw.ttl(f"meta:{{{sid}}}") == -1) == (ttl == -1)

    await client.append(sid, [user("last")])
    expected_events.append(("message", model.message_count + 1))
    try:
        await eventually(lambda: watched[-1:] == expected_events[-1:])
    finally:
        watcher.cancel()
    assert watched[1:] == expected_events


async def test_a_clear_after_a_truncation_leaves_no_holes(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = await conversation(client, uid)
    await client.truncate_messages(sid, 3)
    assert (await meta(raw, sid))["holes"] == "1"
    await client.clear_messages(sid, keep_system_prompt=True)
    assert "holes" not in await meta(raw, sid)
    await client.append(sid, [user("a"), user("b")])
    assert await all_messages(client, sid) == [1, 7, 8]
    page = await client.list_messages(sid, before_seq=8, page_size=1)
    assert (seqs(page.messages), page.window_start_seq) == ([7], 7)


async def test_removed_messages_keep_their_payloads_and_count_them_in_the_reply(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid, max_messages=-1)).session_id
    kept = {"type": "function_call", "arguments": '{"city":"Oslo"}', "n": 0.1 + 0.2, "big": 2**53}
    await client.append(sid, [user("call", payload=kept), assistant("done", payload=[1, -0.0, None])])
    popped = await client.pop_message(sid)
    assert popped is not None
    assert payload_of(popped) == [1, -0.0, None]
    cut = await client.truncate_messages(sid, 0, return_removed=True)
    assert [payload_of(m) for m in cut.removed_messages] == [kept]

    # A payload of many small values takes more in a reply than stored: the bound counts that.
    for _ in range(6):
        await client.append(sid, [user("nulls", payload=[None] * 9_999)])
    stored = int((await meta(raw, sid))["stored_bytes"])
    assert stored < 1024 * 1024  # far below the 3 MiB a reply holds...
    error = await raises(RemovedTooLargeError, client.truncate_messages(sid, 0, return_removed=True))
    assert "bytes of them" in error.message  # ...but not what they take in one
    assert (await client.truncate_messages(sid, 0)).removed_count == 6


async def test_a_session_that_never_expires_stays_so_after_a_truncation(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid, ttl_seconds=-1, max_messages=-1)).session_id
    await client.append(sid, [user("a"), user("b"), user("c")])
    await client.truncate_messages(sid, 1, request_id="cut-1")
    keys = [f"{prefix}:{{{sid}}}" for prefix in ("chat", "meta", "reqs")]
    assert [await raw.ttl(key) for key in keys] == [-1, -1, -1]
    assert (await client.get_session(sid)).expires_in_seconds == -1
    await client.delete_session(sid)


async def test_a_stalled_watcher_whose_inbox_dropped_a_truncation_is_still_told_of_it(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watcher that delivered 1..5, then stopped reading while 3 was kept (4 and 5 removed) and
    appends overflowed its inbox (the truncation's event among those dropped for a Behind), reads
    the missed appends back from the LIST: it must still be told that 4..5 are gone, before the
    messages that came after them, or its client shows removed messages for good."""
    bound = 8 * 1024
    async with serving(settings, valkey_url, watch_buffer_bytes=bound) as running:
        session_id = await new_session(running, uid, messages=5)
        events = Watch(running.store, running.feed, session_id, 0, heartbeat_seconds=60, present=as_is)
        try:
            delivered: list[Any] = []
            while len(delivered) < 6:  # the heartbeat, then 1..5 read from the LIST
                delivered.append(await asyncio.wait_for(anext(events), 10))
            assert [e.seq if isinstance(e, StoredMessage) else e for e in delivered[1:]] == [1, 2, 3, 4, 5]
            channel = running.feed._channels[session_id]
            async with SessionClient(f"127.0.0.1:{running.port}") as client:
                await client.truncate_messages(session_id, 3)
                for i in range(40):  # 40 appends of ~1 KiB: past the 8 KiB inbox
                    await client.append(session_id, [user("z" * 900 + str(i))])
            await eventually(lambda: channel.last_seq == 45)
            after: list[Any] = []
            while not after or not (isinstance(after[-1], StoredMessage) and after[-1].seq == 45):
                event = await asyncio.wait_for(anext(events), 10)
                if not isinstance(event, Heartbeat):
                    after.append(event)
        finally:
            await events.aclose()
        assert after[0] == Truncated(3, 5), after[:3]
        assert [e.seq for e in after[1:]] == list(range(6, 46))


async def test_a_cut_back_to_the_prompt_is_no_trimming_for_a_page_or_a_watch(
    client: SessionClient, uid: str
) -> None:
    """Truncating every message after the prompt (after_seq = the prompt's last seq, as popping
    them all does) removes seqs; nothing was trimmed by the window (max_messages -1): a page does
    not say history_trimmed and a watch reading past them is not told HistoryTrimmed, as with a
    cut above the prompt."""
    sid = await conversation(client, uid, max_messages=-1)
    await client.truncate_messages(sid, 1)
    page = await client.list_messages(sid, after_seq=0)
    assert (seqs(page.messages), page.history_trimmed) == ([1], False)
    await client.append(sid, [user("after")])  # 1, 7
    page = await client.list_messages(sid, after_seq=0)
    assert (seqs(page.messages), page.history_trimmed, page.window_start_seq) == ([1, 7], False, 7)
    kinds: list[tuple[str, int]] = []
    async for event in client.watch(sid, after_seq=0):
        kinds.append((str(event.WhichOneof("event")), event.message.seq))
        if event.message.seq == 7:
            break
    assert kinds == [("message", 1), ("message", 7)]


async def test_a_seq_a_cut_back_to_the_prompt_removed_is_no_trimmed_seq_for_truncate_or_fork(
    client: SessionClient, uid: str
) -> None:
    """After a cut back to the prompt and an append (1, 7), seqs 2..6 were removed, not trimmed:
    truncating or forking at one of them works as in a hole above the prompt (it keeps what the
    session held at that seq) instead of AFTER_SEQ_TRIMMED."""
    sid = await conversation(client, uid, max_messages=-1)
    await client.truncate_messages(sid, 1)
    await client.append(sid, [user("after")])
    fork = await client.fork_session(sid, at_seq=4)
    assert await all_messages(client, fork.session.session_id) == [1]
    reply = await client.truncate_messages(sid, 4)
    assert reply.removed_count == 1
    assert await all_messages(client, sid) == [1]
