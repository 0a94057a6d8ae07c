"""Sessions against a model: random sequences of creates, appends (some replayed, some with a stale
expected_last_seq), updates and deletes through the Python client, a real server and Valkey,
checked after every step against a small in-memory model of what the service promises.

The model keeps per session its messages (seq, role, content), counters, title, labels and window;
the window follows the append and update scripts' `trim_window` exactly (the leading system prompt
is pinned; a tool message is never left at the head). Listings are checked as sets, and in order
wherever the server's last_active values differ (the model orders sessions by their last create
or append; two touches within one microsecond may tie).

Hypothesis drives synchronous steps from a worker thread; each step runs its calls on the test's
event loop, where the session-scoped server and client live (as in test_fuzz.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chatsession.v1 import session_pb2
from chatsession.v1.session_pb2 import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_TOOL, ROLE_USER
from chatsession_client import FailedPreconditionError, NotFoundError, SessionClient, message
from chatsession_server.store.codec import MAX_PINNED

T = TypeVar("T")
OnLoop = Callable[[Coroutine[Any, Any, Any]], Any]

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
LABEL_KEYS = st.text(st.sampled_from("abcXYZ019._/-"), min_size=1, max_size=6)  # the label key alphabet
LABELS = st.dictionaries(LABEL_KEYS, TEXT, max_size=3)
# 0 asks for the server's default, which the suite's settings leave at -1 (keep everything).
WINDOWS = st.sampled_from([0, -1, 1, 2, 3, 5])
MAX_LIVE_SESSIONS = 3


@dataclass(frozen=True)
class Sent:
    role: int
    content: str
    tokens: int


SENT = st.builds(
    Sent,
    st.sampled_from([ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL]),
    TEXT.filter(bool),
    st.integers(0, 1000),
)


@dataclass
class ModelSession:
    user_id: str
    title: str
    labels: dict[str, str]
    max_messages: int
    touched: int
    """when it was last created or appended to, in steps: the order ListSessions follows"""
    stored: list[tuple[int, int, str]] = field(default_factory=list)
    """(seq, role, content) of the messages kept: the pinned prompt, then the window"""
    pinned: int = 0
    message_count: int = 0
    token_count: int = 0
    last_append: tuple[str, list[Sent], int] | None = None
    """request_id, messages and first seq of the newest append, to replay"""

    def append(self, messages: list[Sent]) -> None:
        for m in messages:
            seq = self.message_count + 1
            # System messages before any other message form the prompt the window keeps.
            if self.pinned == seq - 1 and self.pinned < MAX_PINNED and m.role == ROLE_SYSTEM:
                self.pinned = seq
            self.stored.append((seq, m.role, m.content))
            self.message_count = seq
            self.token_count += m.tokens
        self.trim()

    def trim(self) -> None:
        """lua/prelude.py `trim_window`: keep the pinned prompt and the newest max-pinned messages (at
        least one), then drop further while a tool message would head the window."""
        if self.max_messages <= 0:
            return
        unpinned = len(self.stored) - self.pinned
        drop = unpinned - max(self.max_messages - self.pinned, 1)
        if drop <= 0:
            return
        while drop < unpinned and self.stored[self.pinned + drop][1] == ROLE_TOOL:
            drop += 1
        del self.stored[self.pinned : self.pinned + drop]


class SessionMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    def __init__(self, client: SessionClient, on_loop: OnLoop, prefix: str) -> None:
        super().__init__()
        self.client = client
        self.on_loop = on_loop
        self.users = [f"{prefix}-u0", f"{prefix}-u1"]
        self.model: dict[str, ModelSession] = {}
        self.deleted: set[str] = set()
        self.steps = itertools.count(1)

    def live(self) -> dict[str, ModelSession]:
        return {sid: s for sid, s in self.model.items() if sid not in self.deleted}

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        result: T = self.on_loop(coroutine)
        return result

    def expect_missing(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        with pytest.raises(NotFoundError):
            self.call(coroutine)

    # A few sessions at a time, so that steps go to their messages and each step's checks stay small.
    @precondition(lambda self: len(self.live()) < MAX_LIVE_SESSIONS)
    @rule(target=sessions, user=st.integers(0, 1), title=TEXT, labels=LABELS, window=WINDOWS)
    def create(self, user: int, title: str, labels: dict[str, str], window: int) -> str:
        created = self.call(
            self.client.create_session(self.users[user], title=title, labels=labels, max_messages=window)
        )
        self.model[created.session_id] = ModelSession(
            self.users[user], title, labels, window or -1, touched=next(self.steps)
        )
        return str(created.session_id)

    @rule(
        sid=sessions,
        messages=st.lists(SENT, min_size=1, max_size=5),
        expect=st.sampled_from(["none", "current", "stale"]),
    )
    def append(self, sid: str, messages: list[Sent], expect: str) -> None:
        request_id = uuid.uuid4().hex
        sent = [message(m.role, m.content, tokens=m.tokens) for m in messages]
        if sid in self.deleted:
            self.expect_missing(self.client.append(sid, sent, request_id=request_id))
            return
        s = self.model[sid]
        if expect == "stale":  # someone else appended meanwhile: nothing is written
            with pytest.raises(FailedPreconditionError):
                self.call(self.client.append(sid, sent, expected_last_seq=s.message_count + 1))
            return
        expected = s.message_count if expect == "current" else None
        reply = self.call(self.client.append(sid, sent, request_id=request_id, expected_last_seq=expected))
        first = s.message_count + 1
        s.append(messages)
        s.touched = next(self.steps)
        s.last_append = (request_id, messages, first)
        assert not reply.replayed
        assert [m.seq for m in reply.messages] == list(range(first, s.message_count + 1))
        assert (reply.session.message_count, reply.session.token_count) == (s.message_count, s.token_count)

    @rule(sid=sessions)
    def replay_last_append(self, sid: str) -> None:
        s = self.model[sid]
        if sid in self.deleted or s.last_append is None:
            return
        request_id, messages, first = s.last_append
        sent = [message(m.role, m.content, tokens=m.tokens) for m in messages]
        reply = self.call(self.client.append(sid, sent, request_id=request_id))
        assert reply.replayed
        # Those of them still stored come back; nothing is stored again (the invariant checks).
        last = first + len(messages) - 1
        assert [(m.seq, m.role, m.content) for m in reply.messages] == [
            row for row in s.stored if first <= row[0] <= last
        ]

    @rule(
        sid=sessions,
        title=st.none() | TEXT,
        labels=st.none() | LABELS,
        window=st.none() | WINDOWS,
    )
    def update(self, sid: str, title: str | None, labels: dict[str, str] | None, window: int | None) -> None:
        if title is None and labels is None and window is None:
            return
        call = self.client.update_session(sid, title=title, labels=labels, max_messages=window)
        if sid in self.deleted:
            self.expect_missing(call)
            return
        self.call(call)
        s = self.model[sid]
        if title is not None:
            s.title = title
        if labels is not None:
            s.labels = labels
        if window is not None:
            s.max_messages = window or -1
            s.trim()

    @rule(sid=sessions)
    def delete(self, sid: str) -> None:
        call = self.client.delete_session(sid)
        if sid in self.deleted:
            self.expect_missing(call)
            return
        self.call(call)
        self.deleted.add(sid)

    @invariant()
    def service_agrees_with_the_model(self) -> None:
        live = self.live()
        sessions, pages, listings = self.call(self.observe(list(live)))
        for sid, got, page in zip(live, sessions, pages, strict=True):
            s = live[sid]
            assert (got.user_id, got.title, dict(got.labels), got.max_messages) == (
                s.user_id,
                s.title,
                s.labels,
                s.max_messages,
            ), sid
            assert (got.message_count, got.token_count, got.messages_stored) == (
                s.message_count,
                s.token_count,
                len(s.stored),
            ), sid
            assert [(m.seq, m.role, m.content) for m in page.messages] == s.stored, sid
            base = s.message_count - (len(s.stored) - s.pinned)
            assert (page.last_seq, page.window_start_seq, page.has_more) == (s.message_count, base + 1, False)
            assert page.history_trimmed == (base > s.pinned), sid
        for user_id, listed in zip(self.users, listings, strict=True):
            expected = {sid for sid, s in live.items() if s.user_id == user_id}
            assert {row.session_id for row in listed} == expected, user_id
            assert len(listed) == len(expected), user_id
            for newer, older in itertools.pairwise(listed):
                newer_at, older_at = newer.last_active.ToMicroseconds(), older.last_active.ToMicroseconds()
                assert newer_at >= older_at, (newer.session_id, older.session_id)
                if newer_at > older_at:
                    assert live[newer.session_id].touched > live[older.session_id].touched, (
                        newer.session_id,
                        older.session_id,
                    )

    async def observe(
        self, live: list[str]
    ) -> tuple[list[session_pb2.Session], list[Any], list[list[session_pb2.Session]]]:
        async def listing(user_id: str) -> list[session_pb2.Session]:
            return [row async for row in self.client.iter_sessions(user_id)]

        async def gone(sid: str) -> None:
            with pytest.raises(NotFoundError):
                await self.client.get_session(sid)

        sessions, pages, listings, _ = await asyncio.gather(
            asyncio.gather(*(self.client.get_session(sid) for sid in live)),
            asyncio.gather(*(self.client.list_messages(sid, page_size=1000) for sid in live)),
            asyncio.gather(*(listing(user_id) for user_id in self.users)),
            asyncio.gather(*(gone(sid) for sid in self.deleted)),
        )
        return list(sessions), list(pages), list(listings)

    def teardown(self) -> None:
        async def clean() -> None:
            await asyncio.gather(
                *(self.client.delete_session(sid, allow_missing=True) for sid in self.live())
            )

        self.call(clean())


async def test_sessions_behave_like_the_model(client: SessionClient, uid: str) -> None:
    loop = asyncio.get_running_loop()
    examples = itertools.count()

    def on_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    class Machine(SessionMachine):
        def __init__(self) -> None:  # each example with users of its own
            super().__init__(client, on_loop, f"{uid}-{next(examples)}")

    def run() -> None:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=int(os.environ.get("CHATSESSION_TEST_MODEL_EXAMPLES", "30")),
                stateful_step_count=25,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )

    await asyncio.to_thread(run)
