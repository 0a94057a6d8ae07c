"""However a watch ends, it leaves the feed and gives its quota place back, exactly once: closed
(aclose) while joining, while waiting or when idle, dropped unclosed, ended by an error, cancelled
by its client, refused, ended by a deleted session or by shutdown. The Watch iterator object and
the quota's stream are objects, not async generators, so nothing finalizes them for free."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import SessionClient, user
from chatsession_server.api.quotas import WatchQuota
from chatsession_server.api.watch import Watch
from chatsession_server.app import RunningServer
from chatsession_server.domain import Appended, Heartbeat
from chatsession_server.errors import PreconditionFailed, QuotaExceeded
from chatsession_server.settings import Settings
from chatsession_server.store.subscription import Subscription
from tests.helpers import as_is, connections, eventually, new_session, serving, watch

METHOD = "/chatsession.v1.SessionService/WatchMessages"


async def _settled(running: RunningServer) -> tuple[int, int, int]:
    """(watchers in the feed, channels in the feed, quota places held) once the server has run
    the cleanup of the calls that ended (never asserted on timing: waited for)."""

    def counts() -> tuple[int, int, int]:
        return (running.feed.watcher_count, running.feed.subscriptions, running.watch_quota.watchers)

    def nothing_held() -> bool:
        return counts() == (0, 0, 0)

    await eventually(nothing_held)
    return counts()


async def _end_of(call: Any) -> grpc.StatusCode:
    """The status a stream ends with, its replies before that skipped."""
    try:
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- the Watch iterator on the real feed and Valkey


async def test_aclose_while_joining_leaves_the_feed(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await new_session(running, uid)
        events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=60, present=as_is)
        first = asyncio.ensure_future(anext(events))

        def joining() -> bool:  # inside feed.join, waiting on the SUBSCRIBE round trip
            return running.feed.watcher_count == 1 and events._subscription is None

        await eventually(joining, interval=0)
        await events.aclose()
        with contextlib.suppress(StopAsyncIteration):
            await asyncio.wait_for(first, 10)
        await events.aclose()  # and again: still nothing leaves
        assert (running.feed.watcher_count, running.feed.subscriptions) == (0, 0)


async def test_aclose_ends_a_pending_anext(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await new_session(running, uid)
        events = Watch(running.store, running.feed, session_id, None, heartbeat_seconds=0.5, present=as_is)
        assert await asyncio.wait_for(anext(events), 10) == Heartbeat(0)
        pending = asyncio.ensure_future(anext(events))

        def waiting() -> bool:  # on the subscription's future
            subscription = events._subscription
            return isinstance(subscription, Subscription) and subscription._waiter is not None

        await eventually(waiting)
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


async def test_a_watch_that_raised_is_over(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await new_session(running, uid, messages=1)
        events = Watch(running.store, running.feed, session_id, 5, heartbeat_seconds=0.2, present=as_is)
        with pytest.raises(PreconditionFailed):
            await asyncio.wait_for(anext(events), 10)
        try:
            with pytest.raises(StopAsyncIteration):
                # Not a Heartbeat(0) after the sweep, for a resume point it refused.
                await asyncio.wait_for(anext(events), 10)
        finally:
            await events.aclose()


async def test_a_dropped_watch_leaves_the_feed(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url) as running:
        session_id = await new_session(running, uid)
        events: Any = Watch(
            running.store, running.feed, session_id, None, heartbeat_seconds=60, present=as_is
        )
        async for event in events:
            assert event == Heartbeat(0)
            break
        assert running.feed.watcher_count == 1
        del events
        gc.collect()
        assert await _settled(running) == (0, 0, 0)


async def test_watchers_leave_in_any_order_and_the_rest_still_hear_the_session(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    # The feed keeps a session's watchers in a list, each knowing its place (a set costs more).
    async with serving(settings, valkey_url) as running:
        feed = running.feed
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            session_id = (await client.create_session(uid)).session_id
            first, middle, last = [await feed.join(session_id) for _ in range(3)]
            await feed.leave(middle)
            await feed.leave(middle)  # twice: the second is a no-op, not another watcher's place
            assert feed.watcher_count == 2
            await client.append(session_id, [user("hi")])
            for subscription in (first, last):
                assert isinstance(await subscription.next(10), Appended)
            assert middle.place == -1
            await feed.leave(first)
            await client.append(session_id, [user("again")])
            assert isinstance(await last.next(10), Appended)
            await feed.leave(last)
            assert (feed.watcher_count, feed.subscriptions) == (0, 0)


async def test_a_closed_watch_has_left_the_feed_and_ends(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    # The watch is an iterator object, not a generator: aclose() is its `finally`.
    async with serving(settings, valkey_url) as running:
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            session_id = (await client.create_session(uid)).session_id
        events = Watch(
            running.store, running.feed, session_id, None, heartbeat_seconds=60, present=lambda e: e
        )
        assert await asyncio.wait_for(anext(events), 10) == Heartbeat(0)
        assert running.feed.watcher_count == 1
        await events.aclose()
        assert (running.feed.watcher_count, running.feed.subscriptions) == (0, 0)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(events), 10)


# -- WatchMessages streams through a real server and channel


async def test_every_way_a_stream_ends_releases_its_quota_place_and_feed(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """The try/finally stream wrappers release the quota place and the feed subscription for a
    refused watch, a cancelled one, one ended by an error, and one ended by shutdown."""
    async with serving(settings, valkey_url, max_watchers_per_connection=2) as running:
        session_id = await new_session(running, uid, messages=1)
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
            await eventually(lambda: running.watch_quota.watchers == 1)
            assert (running.feed.watcher_count, running.watch_quota.watchers) == (1, 1)
            # Deleted: NOT_FOUND, released.
            async with SessionClient(target) as client:
                await client.delete_session(session_id)
            assert await _end_of(second) == grpc.StatusCode.NOT_FOUND
            assert await _settled(running) == (0, 0, 0)
            # Shutdown: UNAVAILABLE, released.
            other = await new_session(running, uid)
            last = await watch(stub, other)
            await running.feed.close()
            assert await _end_of(last) == grpc.StatusCode.UNAVAILABLE
            assert await _settled(running) == (0, 0, 0)


# -- the watch quota's stream on its own: its place comes back once


class Peer:
    """The one thing the quota asks of a call's context."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


def quota_stream(produce: Any) -> tuple[WatchQuota, Any]:
    quota = WatchQuota(METHOD, max_watchers=1, max_per_connection=1)
    return quota, quota.wrap(grpc.unary_stream_rpc_method_handler(produce), METHOD).unary_stream


async def events(request: Any, context: Any) -> AsyncIterator[str]:
    yield "one"
    if request == "fail":
        raise RuntimeError("the store broke")
    await asyncio.Event().wait()  # idle


async def test_a_stream_that_ends_by_error_gives_its_place_back() -> None:
    quota, stream = quota_stream(events)
    watch = stream("fail", Peer())
    assert quota.watchers == 1
    assert await anext(watch) == "one"
    with pytest.raises(RuntimeError):
        await anext(watch)
    assert quota.watchers == 0
    await watch.aclose()  # and only once
    assert quota.watchers == 0


async def test_a_closed_stream_gives_its_place_back_and_a_second_is_refused_meanwhile() -> None:
    quota, stream = quota_stream(events)
    watch = stream("idle", Peer())
    assert await anext(watch) == "one"
    with pytest.raises(QuotaExceeded):
        stream("idle", Peer())
    await watch.aclose()
    await watch.aclose()
    assert quota.watchers == 0
    again = stream("idle", Peer())  # the place is free again
    await again.aclose()


async def test_a_dropped_stream_gives_its_place_back_on_the_loop() -> None:
    quota, stream = quota_stream(events)
    watch = stream("idle", Peer())
    assert await anext(watch) == "one"
    del watch
    gc.collect()
    await eventually(lambda: quota.watchers == 0)  # the release was scheduled on the loop
    assert quota.watchers == 0
