"""What an idle watch holds on the server (issue 16: an idle watcher may cost at most 1.1x the
memory of a bare grpc.aio stream). Counted by kind, never timed: no task or timer of its own, one
coroutine per layer of the stream (the watch's pending __anext__ and the interceptors around it),
not the last reply it sent (a protobuf message costs its own arena, about 0.5 KiB), and not the
messages it read from the LIST once they are sent."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections import Counter
from pathlib import Path
from types import AsyncGeneratorType, CoroutineType

import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import SessionClient, user
from chatsession_server.api.observer import ACCESS_LOGGER
from chatsession_server.api.watch import Watch
from chatsession_server.domain import Appended, Heartbeat, StoredMessage
from chatsession_server.settings import Settings
from tests.helpers import serving
from tests.test_quotas import connections, watch

WATCHES = 40
# The watch's __anext__, the quota's generator, the error mapping's writer and the call observer's.
FRAMES_PER_WATCH = 4


def server_objects() -> Counter[str]:
    """Live coroutines and async generators of the server's code, by name; WatchMessages replies
    and the messages read from Valkey."""
    gc.collect()
    held: Counter[str] = Counter()
    for obj in gc.get_objects():
        if isinstance(obj, CoroutineType | AsyncGeneratorType):
            code = obj.cr_code if isinstance(obj, CoroutineType) else obj.ag_code
            if "chatsession_server" in code.co_filename:
                held[code.co_qualname] += 1
        elif isinstance(obj, pb.WatchMessagesResponse | StoredMessage):
            held[type(obj).__name__] += 1
    return held


def server_tasks() -> int:
    """Tasks running the server's code (gRPC's own task per call runs gRPC's)."""
    coroutines = [t.get_coro() for t in asyncio.all_tasks()]
    ours = [c for c in coroutines if isinstance(c, CoroutineType)]
    return sum("chatsession_server" in c.cr_code.co_filename for c in ours)


@pytest.mark.parametrize("with_auth", [False, True], ids=["open", "auth"])
async def test_an_idle_watch_holds_its_stream_frames_and_nothing_more(
    settings: Settings,
    valkey_url: str,
    uid: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    with_auth: bool,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)  # the call observer is installed, as in production
    options: dict[str, str] = {}
    token = None
    if with_auth:  # the auth interceptor's stream wrapper is one more layer that must not hold a reply
        token = "memory-" + uuid.uuid4().hex
        (tmp_path / "tokens").write_text(f"{token} *\n")
        options["auth_tokens_file"] = str(tmp_path / "tokens")
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    frames_per_watch = FRAMES_PER_WATCH + with_auth
    async with serving(settings, valkey_url, **options) as running:
        target = f"127.0.0.1:{running.port}"
        async with SessionClient(target, token=token) as client, connections(target, 2) as stubs:
            ids = [(await client.create_session(uid)).session_id for _ in range(4)]
            for session_id in ids:
                await client.append(session_id, [user("one"), user("two")])
            before, tasks_before = server_objects(), server_tasks()
            calls = [await watch(stubs[i % 2], ids[i % 4], token) for i in range(WATCHES // 2)]
            # Resumed: these read the message after seq 1 from the LIST (a page they must not keep).
            for i in range(WATCHES // 2):
                request = pb.WatchMessagesRequest(session_id=ids[i % 4], after_seq=1)
                call = stubs[i % 2].WatchMessages(request, metadata=metadata)
                kinds = []
                for _ in range(2):
                    reply = await asyncio.wait_for(call.read(), 10)
                    assert isinstance(reply, pb.WatchMessagesResponse)
                    kinds.append(reply.WhichOneof("event"))
                assert kinds == ["heartbeat", "message"]
                calls.append(call)
            del reply  # the test's own, not the server's
            held = server_objects() - before
            assert server_tasks() == tasks_before
            assert (held["WatchMessagesResponse"], held["StoredMessage"]) == (0, 0), held
            # Give or take one of the feed's (a channel sync round's coroutine, still referenced).
            assert sum(held.values()) <= frames_per_watch * WATCHES + 1, held
            for call in calls:
                call.cancel()


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
