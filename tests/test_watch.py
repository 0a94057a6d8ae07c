"""WatchMessages: backlog then live, resume, replicas, fan-out, slow consumers, endings."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from glide import GlideClient

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import (
    NO_RETRY,
    AfterSeqAheadError,
    NotFoundError,
    Retry,
    SessionClient,
    UnavailableError,
    user,
)
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import channels_matching, raises, subscribe_calls, subscribers

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def serving(
    base: Settings, valkey_url: str, port: int = 0, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A server of its own on the suite's Valkey (standalone or cluster, as `base` says)."""
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        **{"valkey_cluster": base.valkey_cluster, "watch_poll_seconds": 0.2, **overrides},
    )
    running = await start_server(settings, ValkeyAddress.parse(valkey_url))
    try:
        yield running
    finally:
        await running.stop(0.5)


async def collect(
    events: AsyncIterator[pb.WatchMessagesResponse], until: Callable[[list[pb.WatchMessagesResponse]], bool]
) -> list[pb.WatchMessagesResponse]:
    seen: list[pb.WatchMessagesResponse] = []
    async for event in events:
        seen.append(event)
        if until(seen):
            break
    return seen


def seqs(events: list[pb.WatchMessagesResponse]) -> list[int]:
    return [e.message.seq for e in events if e.WhichOneof("event") == "message"]


async def next_event(stream: Any) -> pb.WatchMessagesResponse:
    event = await stream.read()
    assert isinstance(event, pb.WatchMessagesResponse), event
    return event


def reached(n: int) -> Callable[[list[pb.WatchMessagesResponse]], bool]:
    return lambda seen: bool(seqs(seen)) and seqs(seen)[-1] >= n


async def test_backlog_then_live_in_order(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user(f"m{i}") for i in range(1, 4)])
    stream = client._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id, after_seq=0))
    first = await next_event(stream)
    assert first.WhichOneof("event") == "heartbeat"  # live from here
    assert first.heartbeat.last_seq == 0
    got = [await next_event(stream) for _ in range(3)]
    assert [e.message.seq for e in got] == [1, 2, 3]
    await client.append(s.session_id, [user("m4"), user("m5")])
    got = [await next_event(stream) for _ in range(2)]
    assert [(e.message.seq, e.message.content) for e in got] == [(4, "m4"), (5, "m5")]
    stream.cancel()


async def test_without_after_seq_only_new_messages_come(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("old")])
    stream = client._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id))
    first = await next_event(stream)
    assert first.heartbeat.last_seq == 1
    await client.append(s.session_id, [user("new")])
    event = await next_event(stream)
    assert (event.message.seq, event.message.content) == (2, "new")
    stream.cancel()


async def test_resume_after_a_dropped_stream_loses_and_repeats_nothing(
    client: SessionClient, uid: str
) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user(f"a{i}") for i in range(5)])
    first = await collect(client.watch(s.session_id, after_seq=0), reached(3))  # then drop it
    await client.append(s.session_id, [user(f"b{i}") for i in range(5)])
    rest = await collect(client.watch(s.session_id, after_seq=seqs(first)[-1]), reached(10))
    assert seqs(first) + seqs(rest) == list(range(1, 11))


async def test_append_on_one_process_reaches_a_watcher_on_another(
    client: SessionClient, valkey_url: str, valkey_cluster: bool, uid: str
) -> None:
    env = {
        **os.environ,
        "CHATSESSION_VALKEY_URL": valkey_url,
        "CHATSESSION_VALKEY_CLUSTER": "1" if valkey_cluster else "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", "--listen", "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = 0
        while not port:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "second server exited"
            if m := re.search(r"serving on [\d.]+:(\d+)", line):
                port = int(m.group(1))
        async with SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as other:
            s = await client.create_session(uid)
            # Watch here, append there...
            watching = asyncio.create_task(collect(client.watch(s.session_id, after_seq=0), reached(6)))
            await asyncio.sleep(0.2)
            for i in range(6):
                await other.append(s.session_id, [user(f"via-other-{i}")])
            assert seqs(await asyncio.wait_for(watching, 10)) == list(range(1, 7))
            # ...and the other way round.
            watching = asyncio.create_task(collect(other.watch(s.session_id, after_seq=6), reached(9)))
            await asyncio.sleep(0.2)
            for i in range(3):
                await client.append(s.session_id, [user(f"via-here-{i}")])
            assert seqs(await asyncio.wait_for(watching, 10)) == [7, 8, 9]
    finally:
        proc.terminate()
        await proc.wait()


async def test_hundred_watchers_see_the_same_complete_sequence(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    n = 60
    watchers = [
        asyncio.create_task(collect(client.watch(s.session_id, after_seq=0), reached(n))) for _ in range(100)
    ]
    await asyncio.sleep(0.5)
    # One subscription for the whole process, however many watchers.
    channel = f"watch:{{{s.session_id}}}"
    assert await subscribers(raw, channel) == 1
    writers = [client.append(s.session_id, [user(f"w{w}-{i}")]) for w in range(6) for i in range(n // 6)]
    await asyncio.gather(*writers)
    results = await asyncio.wait_for(asyncio.gather(*watchers), 30)
    expected = list(range(1, n + 1))
    assert all(seqs(r) == expected for r in results)
    contents = [[e.message.content for e in r if e.WhichOneof("event") == "message"] for r in results]
    assert all(c == contents[0] for c in contents)
    await asyncio.sleep(0.3)  # the last watcher has left: the process unsubscribes
    assert await subscribers(raw, channel) == 0


async def test_a_reconnect_storm_of_thousands_of_watchers_is_all_served(
    client: SessionClient, target: str, uid: str
) -> None:
    """After a restart every watcher reconnects at once. gRPC core's default would cancel
    calls beyond 1000 waiting to be picked up; each of these must get its stream."""

    sessions = [(await client.create_session(uid)).session_id for _ in range(30)]
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(2)
    ]
    try:
        stubs = [session_service_pb2_grpc.SessionServiceStub(c) for c in channels]
        calls = [
            stubs[i % 2].WatchMessages(pb.WatchMessagesRequest(session_id=sessions[i % 30]))
            for i in range(3000)
        ]
        firsts = await asyncio.wait_for(asyncio.gather(*(next_event(c) for c in calls)), 60)
        assert {e.WhichOneof("event") for e in firsts} == {"heartbeat"}
        await client.append(sessions[7], [user("to the crowd")])
        crowd = [c for i, c in enumerate(calls) if i % 30 == 7]
        delivered = await asyncio.wait_for(asyncio.gather(*(next_event(c) for c in crowd)), 30)
        assert [e.message.content for e in delivered] == ["to the crowd"] * 100
        for call in calls:
            call.cancel()
    finally:
        for c in channels:
            await c.close()


async def test_many_sessions_subscribe_in_batches_and_leave_nothing_behind(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    # Polling is slowed to a minute, so a live delivery here can only come through pub/sub.
    async with serving(settings, valkey_url, watch_poll_seconds=60) as running:
        target = f"127.0.0.1:{running.port}"
        async with SessionClient(target, retry=NO_RETRY) as c:
            ids = [(await c.create_session(uid, session_id=f"{uid}-{i}")).session_id for i in range(500)]
            before = await subscribe_calls(raw)
            calls = [c._stub.WatchMessages(pb.WatchMessagesRequest(session_id=i)) for i in ids]
            await asyncio.wait_for(asyncio.gather(*(next_event(call) for call in calls)), 30)
            calls_made = await subscribe_calls(raw) - before
            if settings.valkey_cluster:
                # SSUBSCRIBE takes channels of one slot only, so Valkey sees one per slot; the
                # feed still hands GLIDE the whole batch in one call per round.
                assert calls_made <= len(ids), calls_made
            else:
                assert 1 <= calls_made <= 150, calls_made  # one per channel would be 500
            assert [await subscribers(raw, f"watch:{{{i}}}") for i in ids[::50]] == [1] * 10
            await c.append(ids[123], [user("live")])
            event = await asyncio.wait_for(next_event(calls[123]), 5)
            assert event.message.content == "live"
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.5)
            assert await channels_matching(raw, f"watch:{{{uid}-*") == []


async def test_a_session_watched_again_while_being_unsubscribed_stays_live(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, watch_poll_seconds=60) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        s = await c.create_session(uid)
        for round_no in range(100):
            leaving = c._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id))
            await next_event(leaving)
            leaving.cancel()  # the last watcher leaves: an unsubscribe is on its way...
            await asyncio.sleep(0.0003 * (round_no % 10))
            staying = c._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id))
            await next_event(staying)  # ...and a new one arrives around it
            reply = await c.append(s.session_id, [user(f"r{round_no}")])
            event = await asyncio.wait_for(next_event(staying), 5)
            assert event.message.seq == reply.messages[0].seq
            staying.cancel()


async def test_a_client_leaving_mid_write_is_no_error_and_leaves_the_feed(
    settings: Settings, valkey_url: str, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(settings, valkey_url) as running:
        target = f"127.0.0.1:{running.port}"
        async with SessionClient(target, retry=NO_RETRY) as c:
            s = await c.create_session(uid)
            for _ in range(20):  # 40 MB of backlog: far more than HTTP/2 flow control lets through
                await c.append(s.session_id, [user("x" * 200_000) for _ in range(10)])
        with caplog.at_level(logging.DEBUG, logger="chatsession_server"):
            for leave in ("cancel", "close"):
                channel = grpc.aio.insecure_channel(target)
                stub = session_service_pb2_grpc.SessionServiceStub(channel)
                call = stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id, after_seq=0))
                await next_event(call)
                await next_event(call)
                await asyncio.sleep(0.3)  # the server is now blocked writing
                assert running.feed.watcher_count == 1
                if leave == "cancel":
                    call.cancel()
                await channel.close()
                for _ in range(50):
                    await asyncio.sleep(0.05)
                    if running.feed.watcher_count == 0:
                        break
                assert running.feed.watcher_count == 0
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_slow_watcher_does_not_delay_a_fast_one(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url, watch_buffer_events=4) as running:
        target = f"127.0.0.1:{running.port}"
        async with (
            SessionClient(target, retry=NO_RETRY) as fast,
            SessionClient(target, retry=NO_RETRY) as slow,
        ):
            s = await fast.create_session(uid)
            n = 400
            slow_events = slow._stub.WatchMessages(
                pb.WatchMessagesRequest(session_id=s.session_id, after_seq=0)
            )
            assert (await next_event(slow_events)).WhichOneof("event") == "heartbeat"  # then it stops reading
            fast_task = asyncio.create_task(collect(fast.watch(s.session_id, after_seq=0), reached(n)))
            await asyncio.sleep(0.2)
            payload = "x" * 500
            for i in range(0, n, 20):
                await fast.append(s.session_id, [user(f"{payload}{j}") for j in range(i, i + 20)])
            fast_seen = await asyncio.wait_for(fast_task, 20)
            assert seqs(fast_seen) == list(range(1, n + 1))
            # The slow one, reading at last, still gets everything in order, exactly once.
            slow_seen: list[int] = []
            while not slow_seen or slow_seen[-1] < n:
                event = await asyncio.wait_for(next_event(slow_events), 10)
                if event.WhichOneof("event") == "message":
                    slow_seen.append(event.message.seq)
            assert slow_seen == list(range(1, n + 1))
            slow_events.cancel()


async def test_deleted_session_ends_the_watch_with_not_found(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    watching = asyncio.create_task(collect(client.watch(s.session_id, after_seq=0), lambda _: False))
    await asyncio.sleep(0.2)
    await client.delete_session(s.session_id)
    await raises(NotFoundError, asyncio.wait_for(watching, 5))


async def test_expired_session_ends_the_watch_with_not_found(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        serving(settings, valkey_url) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        s = await c.create_session(uid, ttl_seconds=1)
        watching = asyncio.create_task(collect(c.watch(s.session_id, after_seq=0), lambda _: False))
        await raises(NotFoundError, asyncio.wait_for(watching, 5))


async def test_watch_of_missing_session_and_bad_cursor(client: SessionClient, uid: str) -> None:
    await raises(NotFoundError, collect(client.watch(f"{uid}-missing", after_seq=0), lambda _: True))
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("one")])
    err = await raises(AfterSeqAheadError, collect(client.watch(s.session_id, after_seq=5), lambda _: True))
    assert err.precondition_violations[0].subject == "after_seq"


async def test_trimmed_history_is_reported_explicitly(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid, max_messages=3)
    await client.append(s.session_id, [user(f"m{i}") for i in range(1, 11)])
    events = await collect(client.watch(s.session_id, after_seq=2), reached(10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["history_trimmed", "message", "message", "message"]
    assert (events[0].history_trimmed.first_missing_seq, events[0].history_trimmed.last_missing_seq) == (3, 7)
    assert seqs(events) == [8, 9, 10]


async def test_heartbeats_keep_an_idle_stream_open(settings: Settings, valkey_url: str, uid: str) -> None:
    async with (
        serving(settings, valkey_url, watch_heartbeat_seconds=0.2) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        s = await c.create_session(uid)
        events = await collect(c.watch(s.session_id, include_heartbeats=True), lambda seen: len(seen) >= 4)
        assert {e.WhichOneof("event") for e in events} == {"heartbeat"}


async def test_server_shutdown_ends_streams_with_unavailable_and_the_client_resumes(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    from chatsession_server.embedded import free_port

    port = free_port()
    async with (
        serving(settings, valkey_url, port=port) as first,
        SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as c,
    ):
        s = await c.create_session(uid)
        await c.append(s.session_id, [user("one")])
        raw_stream = c._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id, after_seq=0))
        resuming = SessionClient(f"127.0.0.1:{port}", retry=Retry(initial_backoff=0.05, deadline=20))
        watching = asyncio.create_task(collect(resuming.watch(s.session_id, after_seq=0), reached(3)))
        await next_event(raw_stream)
        await next_event(raw_stream)
        await asyncio.sleep(0.2)
        await first.stop(0.5)
        err = await raises(UnavailableError, _drain(raw_stream))
        assert "shutting down" in err.message
    async with (
        serving(settings, valkey_url, port=port),
        SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as c,
    ):
        await c.append(s.session_id, [user("two"), user("three")])
        assert seqs(await asyncio.wait_for(watching, 20)) == [1, 2, 3]
        await resuming.close()


async def _drain(stream: Any) -> None:
    from chatsession_client.errors import from_rpc_error

    try:
        while await stream.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


@pytest.fixture
def durable_valkey() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as valkey:
        yield valkey


@pytest.mark.standalone_only
async def test_valkey_restart_mid_watch_still_delivers_everything(
    settings: Settings, durable_valkey: EmbeddedValkey, uid: str
) -> None:
    async with serving(
        settings,
        durable_valkey.url,
        valkey_cluster=False,
        valkey_timeout_ms=500,
        valkey_connect_timeout_ms=500,
    ) as running:
        retry = Retry(initial_backoff=0.1, max_backoff=0.5, deadline=30)
        async with SessionClient(f"127.0.0.1:{running.port}", retry=retry) as c:
            s = await c.create_session(uid)
            watching = asyncio.create_task(collect(c.watch(s.session_id, after_seq=0), reached(10)))
            for i in range(5):
                await c.append(s.session_id, [user(f"before-{i}")])
            durable_valkey.kill()
            await asyncio.sleep(0.3)
            durable_valkey.start()  # same port, same data (append-only file)
            for i in range(5):
                await c.append(s.session_id, [user(f"after-{i}")])  # retries until Valkey is back
            events = await asyncio.wait_for(watching, 30)
            assert seqs(events) == list(range(1, 11))
