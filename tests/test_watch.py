"""WatchMessages as a watcher sees it: backlog then live, resume, across processes, fan-out, slow
consumers, each message once through every handoff, how a watch ends, and never another user's
messages."""

from __future__ import annotations

import asyncio
import contextlib
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
    assistant,
    user,
)
from chatsession_server.api.watch import Watch
from chatsession_server.app import RunningServer, start_server
from chatsession_server.domain import (
    Appended,
    Behind,
    Cleared,
    Compacted,
    FeedEvent,
    Heartbeat,
    StoredMessage,
    Truncated,
)
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.settings import Settings, ValkeyAddress
from chatsession_server.store.subscription import Subscription
from tests.helpers import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    as_is,
    channels_matching,
    client_for,
    eventually,
    new_session,
    raises,
    serving,
    session_keys_exist,
    subscribe_calls,
    subscribers,
)

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def polling_server(
    base: Settings, valkey_url: str, port: int = 0, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A server of its own on the suite's Valkey (standalone or cluster, as `base` says), polling
    every 0.2 s unless told otherwise."""
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


async def live(
    events: AsyncIterator[pb.WatchMessagesResponse], until: Callable[[list[pb.WatchMessagesResponse]], bool]
) -> asyncio.Task[list[pb.WatchMessagesResponse]]:
    """`collect(events, until)` in a task, handed back once the watch is live: `events` is a watch
    asked for with include_heartbeats=True, whose first event is the heartbeat the server sends
    once the watch has joined the feed (its process subscribed to the session's channel)."""
    first = asyncio.Event()

    def after_the_first(seen: list[pb.WatchMessagesResponse]) -> bool:
        first.set()
        return until(seen)

    task = asyncio.create_task(collect(events, after_the_first))

    def live_or_over() -> bool:
        return first.is_set() or task.done()

    await eventually(live_or_over)
    return task


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
            watching = await live(
                client.watch(s.session_id, after_seq=0, include_heartbeats=True), reached(6)
            )
            for i in range(6):
                await other.append(s.session_id, [user(f"via-other-{i}")])
            assert seqs(await asyncio.wait_for(watching, 10)) == list(range(1, 7))
            # ...and the other way round.
            watching = await live(other.watch(s.session_id, after_seq=6, include_heartbeats=True), reached(9))
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
    watchers = await asyncio.gather(
        *(
            live(client.watch(s.session_id, after_seq=0, include_heartbeats=True), reached(n))
            for _ in range(100)
        )
    )
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

    async def unsubscribed() -> bool:  # the last watcher has left: the process unsubscribes
        return await subscribers(raw, channel) == 0

    await eventually(unsubscribed)


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
    async with polling_server(settings, valkey_url, watch_poll_seconds=60) as running:
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
                # One per channel would be 500. Watches that arrive while a batch is on its way
                # wait for the next round, so how many rounds 500 arrivals take depends on the
                # machine's load (up to 174 seen on 2 busy cores); a half proves the batching.
                assert 1 <= calls_made <= len(ids) // 2, calls_made
            assert [await subscribers(raw, f"watch:{{{i}}}") for i in ids[::50]] == [1] * 10
            await c.append(ids[123], [user("live")])
            event = await asyncio.wait_for(next_event(calls[123]), 5)
            assert event.message.content == "live"
            for call in calls:
                call.cancel()

            async def none_left() -> bool:
                return await channels_matching(raw, f"watch:{{{uid}-*") == []

            await eventually(none_left)


async def test_a_session_watched_again_while_being_unsubscribed_stays_live(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        polling_server(settings, valkey_url, watch_poll_seconds=60) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c,
    ):
        s = await c.create_session(uid)
        for round_no in range(100):
            leaving = c._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id))
            await next_event(leaving)
            leaving.cancel()  # the last watcher leaves: an unsubscribe is on its way...
            # Not a wait for a state: a delay of 0 to 2.7 ms, different each round, so the new
            # watcher arrives at each point of the unsubscribe's way out.
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
    async with polling_server(settings, valkey_url) as running:
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
                # Not a wait for a state the test can see: time for the server to fill the HTTP/2
                # window and block in a write (invisible from here), so the client leaves mid-write.
                await asyncio.sleep(0.3)
                assert running.feed.watcher_count == 1
                if leave == "cancel":
                    call.cancel()
                await channel.close()
                await eventually(lambda: running.feed.watcher_count == 0)
                assert running.feed.watcher_count == 0
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_slow_watcher_does_not_delay_a_fast_one(settings: Settings, valkey_url: str, uid: str) -> None:
    async with polling_server(settings, valkey_url, watch_buffer_bytes=4096) as running:
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
            fast_task = await live(fast.watch(s.session_id, after_seq=0, include_heartbeats=True), reached(n))
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
    watching = await live(client.watch(s.session_id, after_seq=0, include_heartbeats=True), lambda _: False)
    await client.delete_session(s.session_id)
    await raises(NotFoundError, asyncio.wait_for(watching, 5))


async def test_expired_session_ends_the_watch_with_not_found(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        polling_server(settings, valkey_url) as running,
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
        polling_server(settings, valkey_url, watch_heartbeat_seconds=0.2) as running,
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
        polling_server(settings, valkey_url, port=port) as first,
        SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as c,
    ):
        s = await c.create_session(uid)
        await c.append(s.session_id, [user("one")])
        raw_stream = c._stub.WatchMessages(pb.WatchMessagesRequest(session_id=s.session_id, after_seq=0))
        resuming = SessionClient(f"127.0.0.1:{port}", retry=Retry(initial_backoff=0.05, deadline=20))
        watching = await live(resuming.watch(s.session_id, after_seq=0, include_heartbeats=True), reached(3))
        await next_event(raw_stream)
        await next_event(raw_stream)
        await first.stop(0.5)
        err = await raises(UnavailableError, _drain(raw_stream))
        assert "shutting down" in err.message
    async with (
        polling_server(settings, valkey_url, port=port),
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
    async with polling_server(
        settings,
        durable_valkey.url,
        valkey_cluster=False,
        valkey_timeout_ms=500,
        valkey_connect_timeout_ms=500,
    ) as running:
        retry = Retry(initial_backoff=0.1, max_backoff=0.5, deadline=30)
        async with SessionClient(f"127.0.0.1:{running.port}", retry=retry) as c:
            s = await c.create_session(uid)
            watching = await live(c.watch(s.session_id, after_seq=0, include_heartbeats=True), reached(10))
            for i in range(5):
                await c.append(s.session_id, [user(f"before-{i}")])
            durable_valkey.kill()
            await asyncio.sleep(0.3)  # not a wait for a state: an outage that lasts a while
            durable_valkey.start()  # same port, same data (append-only file)
            for i in range(5):
                await c.append(s.session_id, [user(f"after-{i}")])  # retries until Valkey is back
            events = await asyncio.wait_for(watching, 30)
            assert seqs(events) == list(range(1, 11))


# -- each message once, through every handoff


async def test_a_cancelled_wait_keeps_the_event_handed_to_it() -> None:
    subscription = Subscription("s", 8)
    event: FeedEvent = Appended(1, 1, None, "u")

    async def take() -> FeedEvent | None:
        return await subscription.next(60)

    waiting = asyncio.ensure_future(take())
    await eventually(lambda: subscription._waiter is not None)  # waiting on its future now
    subscription.offer(event)  # arrives...
    waiting.cancel()  # ...as the wait is cancelled (the task has not resumed yet)
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    again = asyncio.ensure_future(take())
    done, _ = await asyncio.wait([again], timeout=1)
    if not done:
        again.cancel()
    assert done  # else: still waiting, the event is gone
    assert again.result() is event


async def test_a_resumed_watch_gets_each_message_once_across_the_handoff_from_pages_to_live(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A resumed watch reading a backlog of several pages while appends keep coming gets every
    seq once, in order, across the page-read to live handoff."""
    async with serving(settings, valkey_url) as running:
        session_id = await new_session(running, uid)
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            await client.append(session_id, [user(f"b{i}") for i in range(450)])
            events = Watch(running.store, running.feed, session_id, 1, heartbeat_seconds=60, present=as_is)
            seen: list[int] = []
            try:

                async def consume() -> None:
                    async for event in events:
                        if isinstance(event, StoredMessage):
                            seen.append(event.seq)
                            if event.seq == 450 + 60:
                                return

                reader = asyncio.ensure_future(consume())
                for i in range(60):
                    await client.append(session_id, [user(f"live{i}")])
                await asyncio.wait_for(reader, 30)
            finally:
                await events.aclose()
        assert seen == list(range(2, 511))
        assert (running.feed.watcher_count, running.feed.subscriptions) == (0, 0)


async def test_a_slow_watch_whose_inbox_overflows_gets_each_message_once(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch that reads nothing while its inbox overflows (a Behind collapse) and then resumes
    reading gets every seq once, in order, then leaves the feed."""
    async with serving(settings, valkey_url, watch_buffer_bytes=600) as running:
        session_id = await new_session(running, uid, messages=1)
        events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=60, present=as_is)
        try:
            assert await asyncio.wait_for(anext(events), 10) == Heartbeat(1)
            async with SessionClient(f"127.0.0.1:{running.port}") as client:
                for i in range(20):  # one at a time: twenty publishes into an inbox of two
                    await client.append(session_id, [user(f"s{i}")])
                seen: list[int] = []
                while len(seen) < 20:
                    event = await asyncio.wait_for(anext(events), 10)
                    if isinstance(event, StoredMessage):
                        seen.append(event.seq)
                assert seen == list(range(2, 22))
                await client.append(session_id, [user("after")])
                event = await asyncio.wait_for(anext(events), 10)
                assert isinstance(event, StoredMessage)
                assert event.seq == 22
        finally:
            await events.aclose()
        assert (running.feed.watcher_count, running.feed.subscriptions) == (0, 0)


async def test_a_slow_watch_whose_inbox_dropped_a_clear_is_still_told_of_it(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch that delivered 1..3, then read nothing while the session was cleared and appends
    overflowed its inbox (the clear's event among those dropped), reads the appends back from the
    LIST: it must still be told of the clear, before the messages after it, and only once."""
    async with serving(settings, valkey_url, watch_buffer_bytes=600) as running:
        session_id = await new_session(running, uid, messages=3)
        events = Watch(running.store, running.feed, session_id, 0, heartbeat_seconds=60, present=as_is)
        try:
            delivered = [await asyncio.wait_for(anext(events), 10) for _ in range(4)]
            assert delivered[0] == Heartbeat(0)
            assert [e.seq if isinstance(e, StoredMessage) else e for e in delivered[1:]] == [1, 2, 3]
            async with SessionClient(f"127.0.0.1:{running.port}") as client:
                await client.clear_messages(session_id)
                for i in range(20):  # twenty publishes into an inbox of two
                    await client.append(session_id, [user(f"s{i}")])
                after: list[Any] = []
                while not after or after[-1] != ("message", 23):
                    event = await asyncio.wait_for(anext(events), 10)
                    if isinstance(event, Cleared):
                        after.append(("cleared", event.last_seq))
                    elif isinstance(event, StoredMessage):
                        after.append(("message", event.seq))
                await client.append(session_id, [user("after")])
                event = await asyncio.wait_for(anext(events), 10)
        finally:
            await events.aclose()
        assert after == [("cleared", 3)] + [("message", seq) for seq in range(4, 24)]
        assert isinstance(event, StoredMessage)
        assert event.seq == 24


async def test_a_slow_watch_whose_inbox_dropped_a_compaction_is_still_told_of_it(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """As a dropped clear: a watch that delivered 1..3, then read nothing while 1..3 were
    compacted and appends overflowed its inbox, is told of the compaction before the messages
    after it."""
    async with serving(settings, valkey_url, watch_buffer_bytes=600) as running:
        session_id = await new_session(running, uid, messages=3)
        events = Watch(running.store, running.feed, session_id, 0, heartbeat_seconds=60, present=as_is)
        try:
            delivered = [await asyncio.wait_for(anext(events), 10) for _ in range(4)]
            assert delivered[0] == Heartbeat(0)
            async with SessionClient(f"127.0.0.1:{running.port}") as client:
                await client.compact_messages(session_id, 3, assistant("Summary."))
                for i in range(20):  # twenty publishes into an inbox of two
                    await client.append(session_id, [user(f"s{i}")])
                after: list[Any] = []
                while not after or after[-1] != ("message", 23):
                    event = await asyncio.wait_for(anext(events), 10)
                    if isinstance(event, Compacted):
                        after.append(("compacted", event.first_seq, event.last_seq))
                    elif isinstance(event, StoredMessage):
                        after.append(("message", event.seq))
        finally:
            await events.aclose()
        assert after == [("compacted", 1, 3)] + [("message", seq) for seq in range(4, 24)]


def told(event: Any) -> tuple[Any, ...] | None:
    """What a watch told, in short (None for a heartbeat)."""
    if isinstance(event, Compacted):
        return ("compacted", event.first_seq, event.last_seq)
    if isinstance(event, Cleared):
        return ("cleared", event.last_seq)
    if isinstance(event, Truncated):
        return ("truncated", event.after_seq, event.last_seq)
    if isinstance(event, StoredMessage):
        return ("message", event.seq)
    return None


async def told_until(events: Watch[Any], last: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """What `events` tells (heartbeats left out) up to and with `last`."""
    seen: list[tuple[Any, ...]] = []
    while not seen or seen[-1] != last:
        event = told(await asyncio.wait_for(anext(events), 10))
        if event is not None:
            seen.append(event)
    return seen


def inbox(events: Watch[Any]) -> list[FeedEvent]:
    """The events waiting in a watch's inbox, oldest first."""
    subscription = events._subscription
    assert isinstance(subscription, Subscription)
    return [event for event, _ in subscription._events or ()]


@asynccontextmanager
async def stalled_watch(
    settings: Settings, valkey_url: str, uid: str, *, messages: int, buffer_bytes: int = 600
) -> AsyncIterator[tuple[Watch[Any], SessionClient, str]]:
    """A watch from seq 0 of a new session of `messages` messages, on a server of its own whose
    watch inboxes hold `buffer_bytes`: handed over once it has delivered them, to read nothing
    more until the test asks; with a client of that server and the session's id."""
    async with serving(settings, valkey_url, watch_buffer_bytes=buffer_bytes) as running:
        session_id = await new_session(running, uid, messages=messages)
        events = Watch(running.store, running.feed, session_id, 0, heartbeat_seconds=60, present=as_is)
        try:
            delivered = await told_until(events, ("message", messages))
            assert delivered == [("message", seq) for seq in range(1, messages + 1)]
            async with SessionClient(f"127.0.0.1:{running.port}") as client:
                yield events, client, session_id
        finally:
            await events.aclose()


async def test_a_dropped_compaction_whose_publish_is_still_queued_behind_the_read_is_told_once(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch that delivered 1..3, then read nothing while appends overflowed its inbox and 1..3
    were compacted: its inbox holds the compaction's publish behind the `Behind` that sends it to
    the LIST. The read tells of the compaction (before 4..23); the publish, taken after it, does
    not tell of it again."""
    async with stalled_watch(settings, valkey_url, uid, messages=3) as (events, client, session_id):
        for i in range(20):
            await client.append(session_id, [user(f"s{i}")])
        await client.compact_messages(session_id, 3, assistant("Summary."))
        await eventually(lambda: [type(e) for e in inbox(events)] == [Behind, Compacted])
        after = await told_until(events, ("message", 23))
        await client.append(session_id, [user("after")])
        after += await told_until(events, ("message", 24))
    assert after == [("compacted", 1, 3)] + [("message", seq) for seq in range(4, 25)]


async def test_a_compaction_then_a_clear_both_dropped_tell_only_the_clear(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch that delivered 1..3 and read nothing while 1..3 were compacted, then cleared, then
    appended to past its inbox: the summary went with the clear, so the read tells of the clear
    alone, before the messages after it."""
    async with stalled_watch(settings, valkey_url, uid, messages=3) as (events, client, session_id):
        await client.compact_messages(session_id, 3, assistant("Summary."))
        await client.clear_messages(session_id)
        for i in range(20):
            await client.append(session_id, [user(f"s{i}")])
        after = await told_until(events, ("message", 23))
    assert after == [("cleared", 3)] + [("message", seq) for seq in range(4, 24)]


async def test_a_compaction_and_a_clear_queued_behind_a_read_tell_only_the_clear(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """As above, with both publishes still in the inbox behind a `Behind` (appends overflowed it
    first): the read tells of the clear; the compaction's publish, taken after it, is of a summary
    the clear removed and tells nothing (not a compaction after the clear)."""
    async with stalled_watch(settings, valkey_url, uid, messages=3, buffer_bytes=1000) as (
        events,
        client,
        session_id,
    ):
        for i in range(20):
            await client.append(session_id, [user(f"s{i}")])
        await client.compact_messages(session_id, 3, assistant("Summary."))
        await client.clear_messages(session_id)
        await eventually(lambda: [type(e) for e in inbox(events)] == [Behind, Compacted, Cleared])
        after = await told_until(events, ("cleared", 23))
        await client.append(session_id, [user("after")])
        after += await told_until(events, ("message", 24))
    assert after == [("cleared", 23), ("message", 24)]


async def test_two_dropped_compactions_are_told_once_as_the_newest_range(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch that delivered 1..5 and read nothing while 1..2, then 1..4 were compacted (the
    second summary takes the first in) and appends overflowed its inbox: told of 1..4 once."""
    async with stalled_watch(settings, valkey_url, uid, messages=5) as (events, client, session_id):
        await client.compact_messages(session_id, 2, assistant("Summary of two."))
        await client.compact_messages(session_id, 4, assistant("Summary of four."))
        for i in range(20):
            await client.append(session_id, [user(f"s{i}")])
        after = await told_until(events, ("message", 25))
        await client.append(session_id, [user("after")])
        after += await told_until(events, ("message", 26))
    assert after == [("compacted", 1, 4)] + [("message", seq) for seq in range(6, 27)]


async def test_a_watch_resumed_past_a_summary_is_not_told_of_it_even_when_its_inbox_overflows(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """Resumed after 4, past the summary of 1..3 compacted before it began: not told of that
    compaction (nothing tells it from one the client saw), neither by its first read nor by the
    read its overflowing inbox sends it to later."""
    async with serving(settings, valkey_url, watch_buffer_bytes=600) as running:
        session_id = await new_session(running, uid, messages=5)
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            await client.compact_messages(session_id, 3, assistant("Summary."))
            events = Watch(running.store, running.feed, session_id, 4, heartbeat_seconds=60, present=as_is)
            try:
                assert await told_until(events, ("message", 5)) == [("message", 5)]
                for i in range(20):
                    await client.append(session_id, [user(f"s{i}")])
                await eventually(lambda: Behind in map(type, inbox(events)))
                after = await told_until(events, ("message", 25))
            finally:
                await events.aclose()
        assert after == [("message", seq) for seq in range(6, 26)]


@pytest.mark.parametrize("change", ["compaction", "clear", "truncation"])
async def test_a_watch_from_the_tail_whose_inbox_dropped_a_change_is_told_of_it(
    settings: Settings, valkey_url: str, uid: str, change: str
) -> None:
    """The common watch, from the tail (no after_seq): it reads the LIST first when its inbox
    overflows, not at its start. A compaction, clear or truncation made before it began is not
    told (the session as it joined is its baseline); one whose event that overflow dropped is,
    before the messages after it."""
    async with serving(settings, valkey_url, watch_buffer_bytes=600) as running:
        session_id = await new_session(running, uid, messages=5)
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            # Before the watch: each kind once, which it must not be told of.
            await client.compact_messages(session_id, 2, assistant("Old summary."))
            await client.truncate_messages(session_id, 4)
            await client.clear_messages(session_id)
            for i in range(3):
                await client.append(session_id, [user(f"m{i}")])  # 6..8
            events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=60, present=as_is)
            try:
                assert await asyncio.wait_for(anext(events), 10) == Heartbeat(8)
                if change == "compaction":
                    await client.compact_messages(session_id, 7, assistant("Summary."))
                    expected: list[tuple[Any, ...]] = [("compacted", 1, 7)]
                elif change == "clear":
                    await client.clear_messages(session_id)
                    expected = [("cleared", 8)]
                else:
                    await client.truncate_messages(session_id, 7)
                    expected = [("truncated", 7, 8)]
                for i in range(20):
                    await client.append(session_id, [user(f"s{i}")])  # 9..28
                after = await told_until(events, ("message", 28))
            finally:
                await events.aclose()
        assert after == expected + [("message", seq) for seq in range(9, 29)]


async def test_a_compaction_made_after_a_resumed_watch_joined_is_told_from_its_publish(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """Resumed after 4; 1..3 are compacted once it has joined the feed but before its first read.
    That read finds the compaction (at or below the cursor, so not told there), and the publish
    waiting in the inbox tells of it: a compaction while the watch was live is told."""
    async with serving(settings, valkey_url) as running:
        session_id = await new_session(running, uid, messages=5)
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            events = Watch(running.store, running.feed, session_id, 4, heartbeat_seconds=60, present=as_is)
            try:
                assert await asyncio.wait_for(anext(events), 10) == Heartbeat(4)  # joined; read next
                await client.compact_messages(session_id, 3, assistant("Summary."))
                await eventually(lambda: Compacted in map(type, inbox(events)))
                after = await told_until(events, ("compacted", 1, 3))
                await client.append(session_id, [user("after")])
                after += await told_until(events, ("message", 6))
            finally:
                await events.aclose()
        assert after == [("message", 5), ("compacted", 1, 3), ("message", 6)]


# -- never another user's messages


async def test_a_watch_never_delivers_another_users_messages(
    settings: Settings,
    valkey_url: str,
    raw: GlideClient,
    tokens_file: Path,
    uid: str,
) -> None:
    """Expiry publishes nothing, so until the feed's next poll a watch on an expired session still
    follows its channel, where a session another user created under the same id meanwhile
    publishes. Appends say whose session they went to: the watch ends (NOT_FOUND) instead of
    delivering another user's message. Poll set to 30 s here to make the window deterministic.
    Limited callers reach one id only with --global-session-ids (else each keeps to its users'
    '<user_id>/' ids); callers for every user always can."""
    options = {"watch_poll_seconds": 30.0, "global_session_ids": True}
    async with serving(settings, valkey_url, auth_tokens_file=str(tokens_file), **options) as running:
        target = f"127.0.0.1:{running.port}"
        async with client_for(target, ALICE_TOKEN) as alice, client_for(target, BOB_TOKEN) as bob:
            mine = await alice.create_session(ALICE, session_id=f"{uid}-x", ttl_seconds=1)
            seen: list[str] = []
            following = asyncio.Event()

            async def follow() -> None:
                with contextlib.suppress(NotFoundError):
                    async for event in alice.watch(mine.session_id, after_seq=0, include_heartbeats=True):
                        if event.WhichOneof("event") == "heartbeat":
                            following.set()  # joined the feed: following the session's channel
                        else:
                            seen.append(event.message.content)

            watcher = asyncio.create_task(follow())
            await eventually(following.is_set)

            async def expired() -> bool:  # alice's idle session expires under her open watch
                return await session_keys_exist(raw, mine.session_id) == 0

            await eventually(expired)
            theirs = await bob.create_session(BOB, session_id=mine.session_id)
            await bob.append(theirs.session_id, [user("bob's private text")])
            # The watch hears bob's append on the channel (it could have delivered it) and ends.
            await eventually(watcher.done)
            await watcher
    assert seen == []
