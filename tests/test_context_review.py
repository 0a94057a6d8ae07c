"""Review of issue 15's context, compaction and clearing: a model-based test of compaction,
clearing and the window together, and the defects it found (fixed since)."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from glide import GlideClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from chatsession.v1.session_pb2 import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL, ROLE_USER
from chatsession_client import (
    NO_RETRY,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SessionClient,
    message,
    system,
    user,
)
from chatsession_server.api.validation import READABLE_FIELDS
from chatsession_server.domain import Cleared, Compacted
from chatsession_server.settings import Settings
from chatsession_server.store.codec import MAX_PINNED
from chatsession_server.store.feed import _parse as parse_publish
from tests.helpers import meta, raises, serving, violated_fields
from tests.test_context import conversation, dumps, seqs, stored_bytes_match

T = TypeVar("T")
OnLoop = Callable[[Coroutine[Any, Any, Any]], Any]

# --- a model of one session under appends, compactions, clears and window changes ---------------


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

    def clear(self, keep: bool) -> None:
        self.stored = self.stored[: self.pinned] if keep else []
        if not keep:
            self.pinned = 0
        self.summary = None

    def listed(self) -> list[Row]:
        head = self.stored[: self.pinned]
        return head + ([self.summary] if self.summary else []) + self.stored[self.pinned :]

    def context(self, max_tokens: int, max_messages: int) -> tuple[list[Row], int, bool] | None:
        """GetContext as issue 15 specifies it; None: FAILED_PRECONDITION (over budget)."""
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


# --- defects found ------------------------------------------------------------------------------


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


def test_publishes_carry_their_rewrite_number_and_older_ones_parse_without() -> None:
    assert parse_publish(b"C2 4 alice 3") == Compacted(2, 4, "alice", 3)
    assert parse_publish(b"X6 alice 4") == Cleared(6, "alice", 4)
    assert parse_publish(b"C2 4 alice") == Compacted(2, 4, "alice", None)
    assert parse_publish(b"X6 alice") == Cleared(6, "alice", None)


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
