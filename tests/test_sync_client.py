"""The blocking client against a real server and Valkey. The server runs on the test's event
loop, so the client's calls run in a thread (asyncio.to_thread), as in a Flask or Django worker
beside an async service. Scripted failures (retries, RetryInfo, details): test_sync_client_unit.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from glide import GlideClient

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import (
    NO_RETRY,
    NotFoundError,
    SeqMismatchError,
    SessionClient,
    SyncSessionClient,
    system,
    user,
)
from tests.helpers import stored_messages


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
