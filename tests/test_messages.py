"""AppendMessages and ListMessages: seqs, counters, concurrency, idempotent retries and the request
records kept for them, the window and the pinned prompt it keeps (however long), paging. What these
cost Valkey is in test_round_trips.py."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from glide import GlideClient

from chatsession_client import (
    NotFoundError,
    RequestIdReusedError,
    SeqMismatchError,
    SessionClient,
    assistant,
    system,
    tool,
    user,
)
from chatsession_server.app import RunningServer
from chatsession_server.domain import NewMessage, NewSession, Role
from chatsession_server.store.session_store import SessionStore
from tests.helpers import meta, raises, stored_messages

# --- AppendMessages -------------------------------------------------------------------------------


async def test_append_stores_json_and_counts_in_one_step(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, ttl_seconds=900)
    r = await client.append(
        s.session_id,
        [
            user("What's the weather?", tokens=6, name="alice", metadata={"lang": "en"}),
            assistant("", tokens=9, tool_calls=[("call_1", "get_weather", '{"city":"Oslo"}')]),
            tool("-3C, snow", tokens=4, name="get_weather", tool_call_id="call_1"),
        ],
    )
    assert [m.seq for m in r.messages] == [1, 2, 3]
    assert (r.session.message_count, r.session.token_count, r.session.messages_stored) == (3, 19, 3)
    assert not r.replayed
    stored = await stored_messages(raw, s.session_id)
    assert stored[0]["role"] == "user"
    assert stored[0]["content"] == "What's the weather?"
    assert (stored[0]["seq"], stored[0]["tokens"], stored[0]["name"]) == (1, 6, "alice")
    assert stored[0]["metadata"] == {"lang": "en"}
    assert stored[0]["created_at"] == pytest.approx(r.messages[0].created_at.ToNanoseconds() / 1e9, abs=1e-6)
    assert stored[1]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert stored[2]["tool_call_id"] == "call_1"
    m = await meta(raw, s.session_id)
    assert (m["message_count"], m["token_count"]) == ("3", "19")
    assert float(m["last_active"]) > float(m["created_at"])
    index_score = await raw.zscore(f"user_sessions:{{{uid}}}", s.session_id)
    assert index_score == float(m["last_active"])


async def test_append_refreshes_expiry_of_both_keys(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, ttl_seconds=300)
    await raw.expire(f"meta:{{{s.session_id}}}", 10)
    r = await client.append(s.session_id, [user("x")])
    assert r.session.expires_in_seconds >= 295
    assert await raw.ttl(f"meta:{{{s.session_id}}}") >= 295
    assert await raw.ttl(f"chat:{{{s.session_id}}}") >= 295


async def test_append_to_missing_session_is_not_found_and_writes_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await raises(NotFoundError, client.append(f"{uid}-nope", [user("x")]))
    assert await raw.exists([f"chat:{{{uid}-nope}}", f"meta:{{{uid}-nope}}"]) == 0
    await client.create_session(uid, session_id=f"{uid}-yes")  # the same read sees an append's keys
    await client.append(f"{uid}-yes", [user("x")])
    assert await raw.exists([f"chat:{{{uid}-yes}}", f"meta:{{{uid}-yes}}"]) == 2


async def test_concurrent_appends_keep_counters_exact(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    n = 200
    results = await asyncio.gather(
        *(client.append(s.session_id, [user(f"m{i}", tokens=i)]) for i in range(n))
    )
    seqs = sorted(r.messages[0].seq for r in results)
    assert seqs == list(range(1, n + 1))
    m = await meta(raw, s.session_id)
    assert int(m["message_count"]) == n
    assert int(m["token_count"]) == sum(range(n))
    stored = await stored_messages(raw, s.session_id)
    assert [x["seq"] for x in stored] == list(range(1, n + 1))
    assert sorted(x["content"] for x in stored) == sorted(f"m{i}" for i in range(n))


async def test_expected_last_seq_guards_interleaving(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("a")], expected_last_seq=0)
    err = await raises(SeqMismatchError, client.append(s.session_id, [user("b")], expected_last_seq=0))
    assert err.precondition_violations[0].subject == "expected_last_seq"
    await client.append(s.session_id, [user("b")], expected_last_seq=1)
    assert [m["content"] for m in await stored_messages(raw, s.session_id)] == ["a", "b"]


# --- idempotency: request_id and its records ------------------------------------------------------


async def test_retry_with_same_request_id_appends_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    batch = [user("hi", tokens=2), assistant("hello", tokens=3)]
    first = await client.append(s.session_id, batch, request_id="req-42")
    again = await client.append(s.session_id, batch, request_id="req-42")
    assert again.replayed
    assert [m.seq for m in again.messages] == [1, 2]
    assert [m.content for m in again.messages] == ["hi", "hello"]
    assert again.messages[0].created_at == first.messages[0].created_at
    assert len(await stored_messages(raw, s.session_id)) == 2
    assert (await meta(raw, s.session_id))["token_count"] == "5"
    # Concurrent duplicates of one request: exactly one is applied.
    dup = [user("once")]
    rs = await asyncio.gather(*(client.append(s.session_id, dup, request_id="req-43") for _ in range(20)))
    assert sum(not r.replayed for r in rs) == 1
    assert len({r.messages[0].seq for r in rs}) == 1
    assert len(await stored_messages(raw, s.session_id)) == 3


async def test_reused_request_id_with_other_messages_fails(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("a")], request_id="r")
    err = await raises(RequestIdReusedError, client.append(s.session_id, [user("b")], request_id="r"))
    assert err.precondition_violations[0].subject == "request_id"
    assert [m["content"] for m in await stored_messages(raw, s.session_id)] == ["a"]


async def test_forgetting_old_request_ids_works_with_a_large_idempotency_limit(
    server: RunningServer, client: SessionClient, raw: Any, uid: str
) -> None:
    """APPEND forgets old request records in slices: one `HDEL reqs unpack(old)` of about limit/2
    names stops at Lua's 8000, so with --idempotency-keys-per-session above ~16000 (accepted by
    Settings) every append with a request_id on a busy session would fail (INTERNAL) after
    RPUSH/HINCRBY/HSET already ran: the message stored, the session's expiry not refreshed, a new
    chat LIST without any expiry, and no watcher told."""
    s = await client.create_session(uid, session_id=f"{uid}-i")
    store = SessionStore(server.connection, idempotency_limit=20_000)
    await raw.hset(f"reqs:{{{s.session_id}}}", {f"r{i}": f"fp {i + 1} 1" for i in range(30_000)})
    message = NewMessage(
        role=Role.USER, content="x", tokens=0, name="", metadata={}, tool_calls=(), tool_call_id=""
    )
    await store.append(s.session_id, [message], request_id="new")
    assert await raw.hlen(f"reqs:{{{s.session_id}}}") == 20_000


# --- the window and the pinned prompt -------------------------------------------------------------


async def test_window_trims_oldest_and_keeps_counting(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=5)
    for i in range(12):
        r = await client.append(s.session_id, [user(f"m{i + 1}", tokens=1)])
    assert r.messages[0].seq == 12
    assert (r.session.message_count, r.session.token_count, r.session.messages_stored) == (12, 12, 5)
    assert [m["seq"] for m in await stored_messages(raw, s.session_id)] == [8, 9, 10, 11, 12]


async def test_window_keeps_the_system_prompt(client: SessionClient, raw: GlideClient, uid: str) -> None:
    s = await client.create_session(uid, max_messages=4)
    await client.append(s.session_id, [system("You are terse."), system("Answer in French.")])
    for i in range(6):
        await client.append(s.session_id, [user(f"q{i}")])
    stored = await stored_messages(raw, s.session_id)
    assert [m["seq"] for m in stored] == [1, 2, 7, 8]
    assert [m["role"] for m in stored[:2]] == ["system", "system"]
    # A later system message is an ordinary message: it is trimmed like any other.
    await client.append(s.session_id, [system("late"), user("a"), user("b")])
    assert [m["seq"] for m in await stored_messages(raw, s.session_id)] == [1, 2, 10, 11]


async def test_window_never_leaves_a_tool_result_without_its_call(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=3)
    await client.append(
        s.session_id,
        [
            user("weather in Oslo and Rome?"),
            assistant("", tool_calls=[("c1", "weather", "{}"), ("c2", "weather", "{}")]),
            tool("-3C", tool_call_id="c1"),
            tool("18C", tool_call_id="c2"),
            assistant("Cold in Oslo, mild in Rome."),
        ],
    )
    # Keeping the newest 3 would start at a tool result whose call is gone: those go too.
    stored = await stored_messages(raw, s.session_id)
    assert [m["seq"] for m in stored] == [5]
    await client.append(s.session_id, [user("thanks")])
    assert [m["seq"] for m in await stored_messages(raw, s.session_id)] == [5, 6]


PINNED = 8_100


async def test_a_trim_keeps_a_legacy_prompt_of_any_length(server: RunningServer, raw: Any, uid: str) -> None:
    """A trim keeps a pinned prompt stored before the MAX_PINNED cap, however long.

    New prompts are capped at 16 messages, but a session stored before the cap may have pinned
    thousands. Lua's unpack takes at most ~8000 values: a single LPUSH of the prompt after the
    LTRIM would fail and lose the prompt; it is put back in slices."""
    store = server.store
    session_id = f"{uid}-legacy"
    await store.create(
        NewSession(session_id, uid, model="", title="", labels={}, ttl_seconds=600, max_messages=PINNED + 2)
    )
    for _ in range(PINNED // 900 + 1):
        await store.append(session_id, [NewMessage(Role.SYSTEM, "s") for _ in range(900)])
    await raw.hset(f"meta:{{{session_id}}}", {"pinned": str(PINNED)})  # as the code before the cap stored it
    # Today this append fails (a Lua error: INTERNAL through gRPC); what matters is what it left.
    with contextlib.suppress(Exception):
        await store.append(session_id, [NewMessage(Role.USER, "u") for _ in range(5)])
    assert (await meta(raw, session_id))["pinned"] == str(PINNED)
    assert await raw.llen(f"chat:{{{session_id}}}") == PINNED + 2, "the pinned prompt was trimmed away"


# --- ListMessages ---------------------------------------------------------------------------------


async def test_list_messages_newest_and_paging_backward(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user(f"m{i}") for i in range(1, 26)])
    page = await client.list_messages(s.session_id, page_size=10)
    assert [m.seq for m in page.messages] == list(range(16, 26))
    assert page.has_more
    assert page.last_seq == 25
    page = await client.list_messages(s.session_id, page_size=10, before_seq=page.messages[0].seq)
    assert [m.seq for m in page.messages] == list(range(6, 16))
    page = await client.list_messages(s.session_id, page_size=10, before_seq=6)
    assert [m.seq for m in page.messages] == [1, 2, 3, 4, 5]
    assert not page.has_more
    default = await client.list_messages(s.session_id)
    assert len(default.messages) == 25


async def test_list_messages_forward_after_seq(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user(f"m{i}") for i in range(1, 8)])
    page = await client.list_messages(s.session_id, after_seq=0, page_size=3)
    assert [m.seq for m in page.messages] == [1, 2, 3]
    assert page.has_more
    page = await client.list_messages(s.session_id, after_seq=5, page_size=3)
    assert [m.seq for m in page.messages] == [6, 7]
    assert not page.has_more
    page = await client.list_messages(s.session_id, after_seq=7)
    assert list(page.messages) == []
    bounded = await client.list_messages(s.session_id, after_seq=2, before_seq=5)
    assert [m.seq for m in bounded.messages] == [3, 4]
    everything = [m.seq async for m in client.iter_messages(s.session_id, page_size=2)]
    assert everything == list(range(1, 8))


async def test_list_messages_reports_trimmed_history(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid, max_messages=4)
    await client.append(s.session_id, [system("prompt")] + [user(f"m{i}") for i in range(2, 11)])
    page = await client.list_messages(s.session_id, after_seq=1, page_size=10)
    assert [m.seq for m in page.messages] == [8, 9, 10]
    assert page.history_trimmed
    assert page.window_start_seq == 8
    page = await client.list_messages(s.session_id, after_seq=0, page_size=2)
    assert [m.seq for m in page.messages] == [1, 8]
    assert page.history_trimmed
    page = await client.list_messages(s.session_id, after_seq=8)
    assert [m.seq for m in page.messages] == [9, 10]
    assert not page.history_trimmed
    newest = await client.list_messages(s.session_id, page_size=3)
    assert [m.seq for m in newest.messages] == [8, 9, 10]
    assert not newest.history_trimmed
    assert newest.has_more  # the prompt is older
    older = await client.list_messages(s.session_id, before_seq=8)
    assert [m.seq for m in older.messages] == [1]
    assert older.history_trimmed


async def test_list_messages_of_missing_session(client: SessionClient, uid: str) -> None:
    await raises(NotFoundError, client.list_messages(f"{uid}-none"))


async def test_a_page_that_reaches_the_oldest_stored_message_reports_what_was_trimmed(
    client: SessionClient, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=1)
    await client.append(s.session_id, [user("a"), user("b")])
    newest = await client.list_messages(s.session_id, page_size=10)
    assert ([m.seq for m in newest.messages], newest.has_more) == ([2], False)
    assert newest.history_trimmed  # seq 1 is gone, and this page covers where it was
    oldest_first = await client.list_messages(s.session_id, after_seq=0, page_size=10)
    assert oldest_first.history_trimmed
