"""Nothing assumes one process owns a session: two replicas (and two workers) on one Valkey, in
both passes (standalone and cluster), serve one consistent session to a client that alternates
between them, deliver appends made through one to a watcher on the other, and accept each
other's page tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatsession_client import NO_RETRY, SessionClient, user
from chatsession_server.app import start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import eventually
from tests.processes import ServerProcess


@pytest.fixture
async def replicas(settings: Settings, valkey_url: str) -> AsyncIterator[tuple[SessionClient, SessionClient]]:
    """A client of each of two replicas on the suite's Valkey."""
    servers = [await start_server(settings, ValkeyAddress.parse(valkey_url)) for _ in range(2)]
    async with (
        SessionClient(f"127.0.0.1:{servers[0].port}", retry=NO_RETRY) as a,
        SessionClient(f"127.0.0.1:{servers[1].port}", retry=NO_RETRY) as b,
    ):
        yield a, b
    for server in servers:
        await server.stop(0.5)


async def test_a_client_alternating_between_replicas_sees_one_session(
    replicas: tuple[SessionClient, SessionClient], uid: str
) -> None:
    a, b = replicas
    s = await a.create_session(uid, title="shared")
    assert (await b.get_session(s.session_id)).title == "shared"
    for i in range(10):
        via = (a, b)[i % 2]
        appended = await via.append(s.session_id, [user(f"m{i}")], request_id=f"r{i}")
        assert [m.seq for m in appended.messages] == [i + 1]
    # A retry through the other replica is recognised as the same request.
    again = await a.append(s.session_id, [user("m9")], request_id="r9")
    assert again.replayed
    assert [m.seq for m in again.messages] == [10]
    for via in (a, b):
        got = await via.get_session(s.session_id)
        assert (got.message_count, got.messages_stored) == (10, 10)
        page = await via.list_messages(s.session_id, page_size=100)
        assert [m.content for m in page.messages] == [f"m{i}" for i in range(10)]


async def test_a_watcher_on_one_replica_sees_appends_through_the_other(
    replicas: tuple[SessionClient, SessionClient], uid: str
) -> None:
    a, b = replicas
    s = await a.create_session(uid)
    seen: list[int] = []
    live = asyncio.Event()

    async def watch() -> None:
        async for event in a.watch(s.session_id, after_seq=0, include_heartbeats=True):
            live.set()  # the first event, a heartbeat: joined the feed, subscribed
            if event.HasField("message"):
                seen.append(event.message.seq)
                if event.message.seq == 5:
                    return

    watching = asyncio.create_task(watch())
    await eventually(live.is_set)
    for i in range(5):
        await b.append(s.session_id, [user(f"via b {i}")])
    await asyncio.wait_for(watching, 10)
    assert seen == [1, 2, 3, 4, 5]


async def test_page_tokens_of_one_replica_are_accepted_by_the_other(
    replicas: tuple[SessionClient, SessionClient], uid: str
) -> None:
    a, b = replicas
    ids = {(await a.create_session(uid)).session_id for _ in range(5)}
    first = await a.list_sessions(uid, page_size=2)
    second = await b.list_sessions(uid, page_size=2, page_token=first.next_page_token)
    third = await a.list_sessions(uid, page_size=2, page_token=second.next_page_token)
    listed = [s.session_id for page in (first, second, third) for s in page.sessions]
    assert sorted(listed) == sorted(ids)
    assert third.next_page_token == ""


async def test_workers_on_the_suite_valkey_serve_one_session(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    workers = 2
    """`--workers 2` pointed at the suite's Valkey (the cluster, in the cluster pass)."""
    env = {
        "CHATSESSION_VALKEY_URL": valkey_url,
        "CHATSESSION_VALKEY_CLUSTER": str(int(settings.valkey_cluster)),
    }
    supervisor = await ServerProcess.start("--listen", "127.0.0.1:0", "--workers", str(workers), env=env)
    try:
        serving = await supervisor.wait_for(r"serving on 127\.0\.0\.1:(\d+)", count=workers)
        port = int(serving[0].group(1))
        async with SessionClient(f"127.0.0.1:{port}") as first:
            s = await first.create_session(uid)
        # Fresh connections land on either worker; every one sees every append.
        for i in range(6):
            async with SessionClient(f"127.0.0.1:{port}") as client:
                await client.append(s.session_id, [user(f"m{i}")])
                assert (await client.get_session(s.session_id)).message_count == i + 1
        supervisor.proc.terminate()
        assert await supervisor.exit_code(30) == 0
    finally:
        await supervisor.kill()
