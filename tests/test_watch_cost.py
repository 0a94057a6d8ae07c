"""What a watch costs the server.

Memory: an idle watch holds no task or timer of its own, one coroutine per layer of the stream (the
watch's pending __anext__ and the interceptors around it), not the last reply it sent (a protobuf
message costs its own arena, about 0.5 KiB) and not the messages it read from the LIST once they
are sent (the process keeps the serialized replies of its newest messages, shared by every watch
and bounded in bytes: the test empties it); an idle watcher may cost at most 1.1x the memory of a
bare grpc.aio stream; counted by kind, never timed. Once it has ended, no string of it stays
interned: on CPython 3.12 (the image's Python) every interned string is immortal, so each
connection's peer ("ipv4:ADDRESS:PORT") and each owner's user id would stay for the life of the
process (100,000 peers: 9.9 MB on 3.12.1).

Valkey reads: the feed's poll reads only the sessions pub/sub has not heard from since the
previous poll, so N watched sessions that were just appended to cost no HGET, and each is read
again on the next poll unless it is heard from again (so expiry and lost publishes are still
caught)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import uuid
from collections import Counter
from pathlib import Path
from types import AsyncGeneratorType, CoroutineType
from typing import Any

import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import SessionClient, user
from chatsession_server.api.observer import ACCESS_LOGGER
from chatsession_server.domain import Appended, Deleted, StoredMessage
from chatsession_server.settings import Settings
from chatsession_server.store import keys
from tests.helpers import command_counts, connections, eventually, serving, watch

WATCHES = 40
SESSIONS = 12
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
            # The process's replies of the newest messages, shared by every watch (and bounded in
            # bytes), keep their messages; no stream holds one of its own.
            assert running.watch_replies is not None
            running.watch_replies.clear()
            held = server_objects() - before
            assert server_tasks() == tasks_before
            assert (held["WatchMessagesResponse"], held["StoredMessage"]) == (0, 0), held
            # Give or take one of the feed's (a channel sync round's coroutine, still referenced).
            assert sum(held.values()) <= frames_per_watch * WATCHES + 1, held
            for call in calls:
                call.cancel()


# -- no string of an ended watch stays interned


def _still_interned(text: str) -> bool:
    """Whether an equal string is held in the interpreter's interned table."""
    fresh = "".join(list(text))  # a new object, never interned
    return sys.intern(fresh) is not fresh


async def test_a_closed_connection_leaves_no_peer_string_interned(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with serving(settings, valkey_url) as running:
        target = f"127.0.0.1:{running.port}"
        async with SessionClient(target) as client:
            session_id = (await client.create_session(uid)).session_id
        peers: list[str] = []
        async with connections(target, 3) as stubs:
            calls = [await watch(stub, session_id) for stub in stubs]
            peers = ["".join(list(peer)) for peer in running.watch_quota._open_by_peer]
            assert len(peers) == 3
            for call in calls:
                call.cancel()
            del calls
        await eventually(lambda: running.watch_quota.watchers == 0)
        assert running.watch_quota.watchers == 0
        gc.collect()
        assert [peer for peer in peers if _still_interned(peer)] == []


async def test_an_ended_watch_leaves_no_user_id_string_interned(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with serving(settings, valkey_url) as running:
        target = f"127.0.0.1:{running.port}"
        owner = "".join(["watch-owner-", uid])
        async with SessionClient(target) as client:
            session_id = (await client.create_session(owner)).session_id
        async with connections(target, 1) as (stub,):
            call = await watch(stub, session_id)
            call.cancel()
            del call
        await eventually(lambda: running.feed.watcher_count == 0)
        assert running.feed.watcher_count == 0
        gc.collect()
        text = "".join(list(owner))
        del owner
        assert not _still_interned(text)


# -- the poll's reads


async def hgets(raw: Any) -> int:
    return (await command_counts(raw)).get("hget", 0)


async def test_the_poll_skips_sessions_heard_from_since_the_last_poll(
    settings: Settings, valkey_url: str, raw: Any, uid: str
) -> None:
    async with serving(settings, valkey_url, watch_poll_seconds=3600) as running:
        feed = running.feed
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            ids = [(await client.create_session(uid)).session_id for _ in range(SESSIONS)]
            subscriptions = [await feed.join(session_id) for session_id in ids]
            before = await hgets(raw)
            await feed.poll_once()  # none heard from yet: every one is read
            assert await hgets(raw) - before == SESSIONS
            for session_id in ids:
                await client.append(session_id, [user("hi")])
            for subscription in subscriptions:
                assert isinstance(await subscription.next(10), Appended)
            before = await hgets(raw)
            await feed.poll_once()  # all heard from since the last poll
            assert await hgets(raw) - before < SESSIONS

            # Silence since: the next poll reads them all again, and finds one that is gone
            # without a word (as an expired session is).
            await raw.delete([keys.KeySpace().meta(ids[0])])
            before = await hgets(raw)
            await feed.poll_once()
            assert await hgets(raw) - before == SESSIONS
            assert isinstance(await subscriptions[0].next(10), Deleted)
            for subscription in subscriptions:
                await feed.leave(subscription)
