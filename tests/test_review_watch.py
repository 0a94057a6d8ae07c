"""Review of the watch rewrite (c9b707e..267df77): the Watch iterator object and the
Subscription. Five tests here were first xfail(strict), each proving a defect on the real feed
and Valkey (fixed in the "Watch review fixes" commit); the others pin what was found sound."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import grpc
import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import SessionClient, user
from chatsession_server.api.watch import Watch
from chatsession_server.app import RunningServer
from chatsession_server.domain import Appended, FeedEvent, Heartbeat, StoredMessage, WatchEvent
from chatsession_server.errors import PreconditionFailed
from chatsession_server.settings import Settings
from chatsession_server.store.subscription import Subscription
from tests.helpers import serving
from tests.test_quotas import connections, watch


def _as_is(event: WatchEvent) -> WatchEvent:
    return event


async def _new_session(running: RunningServer, uid: str, messages: int = 0) -> str:
    async with SessionClient(f"127.0.0.1:{running.port}") as client:
        session_id = (await client.create_session(uid)).session_id
        for i in range(messages):
            await client.append(session_id, [user(f"m{i}")])
    return session_id


async def _settled(running: RunningServer) -> tuple[int, int, int]:
    """(watchers in the feed, channels in the feed, quota places held) once the server has had
    a moment to run the cleanup of the calls that ended (never asserted on timing: polled)."""
    for _ in range(200):
        counts = (running.feed.watcher_count, running.feed.subscriptions, running.watch_quota.watchers)
        if counts == (0, 0, 0):
            break
        await asyncio.sleep(0.025)
    return counts


async def _end_of(call: Any) -> grpc.StatusCode:
    """The status a stream ends with, its replies before that skipped."""
    try:
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_review_a_cancelled_next_does_not_lose_the_event_handed_to_it() -> None:
    subscription = Subscription("s", 8)
    event: FeedEvent = Appended(1, 1, None, "u")

    async def take() -> FeedEvent | None:
        return await subscription.next(60)

    waiting = asyncio.ensure_future(take())
    await asyncio.sleep(0)  # waiting on its future now
    subscription.offer(event)  # arrives...
    waiting.cancel()  # ...as the wait is cancelled (the task has not resumed yet)
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    again = asyncio.ensure_future(take())
    done, _ = await asyncio.wait([again], timeout=1)
    if not done:
        again.cancel()
    assert done  # new code: still waiting, the event is gone
    assert again.result() is event


async def test_review_aclose_while_joining_does_not_leak_the_subscription(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await _new_session(running, uid)
        events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=60, present=_as_is)
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # inside feed.join, waiting on the SUBSCRIBE round trip
        await events.aclose()
        with contextlib.suppress(StopAsyncIteration):
            await asyncio.wait_for(first, 10)
        await events.aclose()  # and again: still nothing leaves
        assert (running.feed.watcher_count, running.feed.subscriptions) == (0, 0)


async def test_review_aclose_ends_a_pending_anext(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await _new_session(running, uid)
        events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=0.5, present=_as_is)
        assert await asyncio.wait_for(anext(events), 10) == Heartbeat(0)
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # waiting on the subscription's future
        await events.aclose()
        assert (running.feed.watcher_count, running.feed.subscriptions) == (0, 0)
        # A heartbeat would come within 0.5 s plus the 1 s sweep if it were still heard; nothing
        # comes at all. Ending (StopAsyncIteration) is what a closed watch does otherwise.
        done, _ = await asyncio.wait([pending], timeout=5)
        if not done:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        assert done
        with pytest.raises(StopAsyncIteration):
            pending.result()


async def test_review_a_watch_that_raised_is_over(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await _new_session(running, uid, messages=1)
        events = Watch(running.store, running.feed, session_id, 5, heartbeat_seconds=0.2, present=_as_is)
        with pytest.raises(PreconditionFailed):
            await asyncio.wait_for(anext(events), 10)
        try:
            with pytest.raises(StopAsyncIteration):
                # New code: a Heartbeat(0) after the sweep, for a resume point it refused.
                await asyncio.wait_for(anext(events), 10)
        finally:
            await events.aclose()


async def test_review_a_dropped_watch_leaves_the_feed(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await _new_session(running, uid)
        events: Any = Watch(
            running.store, running.feed, session_id, None, heartbeat_seconds=60, present=_as_is
        )
        async for event in events:
            assert event == Heartbeat(0)
            break
        assert running.feed.watcher_count == 1
        del events
        gc.collect()
        assert await _settled(running) == (0, 0, 0)


async def test_review_live_handoff_delivers_each_message_once(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """Sound: a resumed watch reading a backlog of several pages while appends keep coming gets
    every seq once, in order, across the page-read to live handoff."""
    async with serving(settings, valkey_url) as running:
        session_id = await _new_session(running, uid)
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            await client.append(session_id, [user(f"b{i}") for i in range(450)])
            events = Watch(running.store, running.feed, session_id, 1, heartbeat_seconds=60, present=_as_is)
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


async def test_review_stream_ends_release_quota_and_feed(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """Sound: the try/finally stream wrappers release the quota place and the feed subscription
    for a refused watch, a cancelled one, one ended by an error, and one ended by shutdown."""
    async with serving(settings, valkey_url, max_watchers_per_connection=2) as running:
        session_id = await _new_session(running, uid, messages=1)
        target = f"127.0.0.1:{running.port}"
        async with connections(target, 1) as (stub,):
            # Refused by validation (the servicer raises before any watch exists).
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.WatchMessages(pb.WatchMessagesRequest(session_id="")).read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Ended by an error after the feed was joined (after_seq ahead).
            call = stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id, after_seq=9))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # Unknown session: NOT_FOUND after joining.
            call = stub.WatchMessages(pb.WatchMessagesRequest(session_id="nosuch" + uid))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert await _settled(running) == (0, 0, 0)
            # Cancelled by the client while idle; a third refused by the per-connection quota.
            first, second = await watch(stub, session_id), await watch(stub, session_id)
            refused = stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refused.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
            for _ in range(200):
                if running.watch_quota.watchers == 1:
                    break
                await asyncio.sleep(0.025)
            assert (running.feed.watcher_count, running.watch_quota.watchers) == (1, 1)
            # Deleted: NOT_FOUND, released.
            async with SessionClient(target) as client:
                await client.delete_session(session_id)
            assert await _end_of(second) == grpc.StatusCode.NOT_FOUND
            assert await _settled(running) == (0, 0, 0)
            # Shutdown: UNAVAILABLE, released.
            other = await _new_session(running, uid)
            last = await watch(stub, other)
            await running.feed.close()
            assert await _end_of(last) == grpc.StatusCode.UNAVAILABLE
            assert await _settled(running) == (0, 0, 0)


async def test_review_a_slow_watch_that_overflows_gets_each_message_once(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """Sound: a watch that reads nothing while its inbox overflows (a Behind collapse) and then
    resumes reading gets every seq once, in order, then leaves the feed."""
    async with serving(settings, valkey_url, watch_buffer_events=2) as running:
        session_id = await _new_session(running, uid, messages=1)
        events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=60, present=_as_is)
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
