"""What many watchers of one session cost Valkey and the server, and what a watcher that stops
reading may hold.

Valkey: an append reaches a process's watchers inside its publish (sent once to each process with
a watcher), so N watchers add no read of Valkey; an append too large to travel inside it is read
from the LIST once for every watcher of the process at the same cursor, not once per watcher; and
a watcher's read that fails never marks Valkey unreachable for the process's other calls.

Memory: a watcher that stops reading holds at most --watch-buffer-bytes of events (the feed's
own objects, shared with the session's other watchers), then drops its oldest and, when it reads
again, reads them back by seq: every message once, in order, none lost."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import grpc
import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import SessionClient, user
from chatsession_server.api import convert
from chatsession_server.api.watch import Watch
from chatsession_server.app import RunningServer
from chatsession_server.domain import Appended, Heartbeat, StoredMessage
from chatsession_server.settings import Settings
from chatsession_server.store import session_store
from chatsession_server.store.subscription import EVENT_OVERHEAD, Subscription
from tests.helpers import (
    as_is,
    command_counts,
    connections,
    eventually,
    new_session,
    reading_watchers,
    serving,
    watch,
)

WATCHERS = 24
APPENDS = 4
# Larger than the 64 KiB an append once had to stay under to travel inside its publish.
LARGE = "x" * 100_000
BIG_MESSAGES = {"max_content_bytes": 256 * 1024}  # the suite's settings allow 1 KiB


async def script_calls(raw: Any) -> int:
    """Scripts Valkey has run (appends and LIST reads alike), over every primary."""
    return (await command_counts(raw)).get("evalsha", 0)


async def scripts_run_by_appends(running: RunningServer, raw: Any, uid: str) -> tuple[int, int]:
    """The scripts Valkey ran for APPENDS appends of two LARGE messages to a session nobody
    watches, and for the same appends to a session WATCHERS watchers follow (each append received
    by all of them, every seq once in order, before the next)."""
    async with SessionClient(f"127.0.0.1:{running.port}") as client:
        unwatched = (await client.create_session(uid)).session_id
        # Valkey has the scripts loaded (a first call of each may take two).
        await client.append(unwatched, [user("warm-up")])
        await client.list_messages(unwatched, after_seq=0)
        before = await script_calls(raw)
        for _ in range(APPENDS):
            await client.append(unwatched, [user(LARGE), user(LARGE)])
        alone = await script_calls(raw) - before

        watched = (await client.create_session(uid)).session_id
        async with reading_watchers(running, watched, WATCHERS) as all_reached:
            before = await script_calls(raw)
            for i in range(APPENDS):
                await client.append(watched, [user(LARGE), user(LARGE)])
                await eventually(functools.partial(all_reached, 2 * (i + 1)))
            return alone, await script_calls(raw) - before


async def test_watchers_of_a_large_append_add_no_read_of_valkey(
    settings: Settings, valkey_url: str, raw: Any, uid: str
) -> None:
    """Appends of 200 KB to a session with 24 watchers cost Valkey the scripts the same appends
    cost with no watcher at all: the messages reach every watcher inside the publish."""
    async with serving(settings, valkey_url, **BIG_MESSAGES) as running:
        alone, watched = await scripts_run_by_appends(running, raw, uid)
    assert watched == alone


async def test_an_append_only_announced_is_read_once_for_all_the_watchers_at_its_cursor(
    settings: Settings, valkey_url: str, raw: Any, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append too large to travel inside its publish is only announced: the process's 24
    watchers, all at the same cursor, read it from the LIST in one read, not 24."""
    monkeypatch.setattr(session_store, "INLINE_PUBLISH_BYTES", 0)  # every append only announced
    async with serving(settings, valkey_url, **BIG_MESSAGES) as running:
        alone, watched = await scripts_run_by_appends(running, raw, uid)
    assert watched - alone == APPENDS  # one LIST read per append, whatever the number of watchers


async def test_a_message_is_serialized_once_for_all_the_watchers_that_send_it(
    settings: Settings, valkey_url: str, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 watchers of a session each receive 8 messages: each message's reply was built (and
    serialized) once for all of them, not once per watcher."""
    built: list[int] = []
    build = convert.watch_event_to_proto

    def counting(event: Any) -> Any:
        if isinstance(event, StoredMessage):
            built.append(event.seq)
        return build(event)

    monkeypatch.setattr(convert, "watch_event_to_proto", counting)
    async with serving(settings, valkey_url, **BIG_MESSAGES) as running:
        session_id = await new_session(running, uid)
        async with (
            SessionClient(f"127.0.0.1:{running.port}") as client,
            reading_watchers(running, session_id, WATCHERS) as all_reached,
        ):
            for i in range(APPENDS):
                await client.append(session_id, [user(LARGE), user(f"small {i}")])
                await eventually(functools.partial(all_reached, 2 * (i + 1)))
    assert sorted(built) == list(range(1, 2 * APPENDS + 1))


async def test_a_watcher_that_stops_reading_holds_its_byte_bound_then_gets_every_message_once(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch that reads its heartbeat and stops while 4 MB are appended holds at most
    --watch-buffer-bytes of events (one append beyond it while the last is in its buffer alone);
    reading again, it gets every seq once, in order, the ones it dropped read back from Valkey."""
    bound = 256 * 1024
    content = "y" * 40_000
    appends, per_append = 20, 5
    async with serving(settings, valkey_url, watch_buffer_bytes=bound, **BIG_MESSAGES) as running:
        session_id = await new_session(running, uid)
        # Without BDP probing the client's window stays small: it stops taking what it does not read.
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            stalled = await watch(stub, session_id)  # and nothing read from here on
            followed = running.feed._channels[session_id]
            subscription = followed.watchers[0]
            held: list[int] = []
            async with SessionClient(f"127.0.0.1:{running.port}") as client:
                for i in range(appends):
                    await client.append(session_id, [user(content) for _ in range(per_append)])
                    heard = (i + 1) * per_append

                    def dispatched(heard: int = heard) -> bool:
                        return followed.last_seq == heard  # the feed has heard the append

                    await eventually(dispatched)
                    held.append(buffered_bytes(subscription))
            total = appends * per_append
            # Past the bound: its oldest events dropped, a Behind in their place.
            assert max(held) <= bound + EVENT_OVERHEAD, held
            assert max(held) >= bound // 2, held  # the test did fill it
            seqs: list[int] = []
            while len(seqs) < total:
                event = await asyncio.wait_for(stalled.read(), 10)
                assert isinstance(event, pb.WatchMessagesResponse)
                if event.WhichOneof("event") == "message":
                    seqs.append(event.message.seq)
            assert seqs == list(range(1, total + 1))
            stalled.cancel()


def buffered_bytes(subscription: Subscription) -> int:
    """The content bytes of the messages a watcher's inbox holds, counted from its events."""
    events = subscription._events or ()
    return sum(
        sum(len(m.content) for m in event.messages)
        for event, _ in events
        if isinstance(event, Appended) and event.messages
    )


async def test_a_watch_reading_back_holds_one_page_of_its_byte_bound(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """A watch resumed behind a 1 MB backlog reads it in pages of --watch-buffer-bytes (at least
    one message), so one that stops reading holds one such page, not a page of 3 MiB."""
    content = "z" * 50_000
    page_bytes = 120_000
    async with serving(settings, valkey_url, **BIG_MESSAGES) as running:
        session_id = await new_session(running, uid)
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            for _ in range(4):
                await client.append(session_id, [user(content) for _ in range(5)])
        events = Watch(
            running.store,
            running.feed,
            session_id,
            0,
            heartbeat_seconds=60,
            present=as_is,
            page_bytes=page_bytes,
        )
        try:
            assert await asyncio.wait_for(anext(events), 10) == Heartbeat(0)
            seqs: list[int] = []
            most_held = 0
            while len(seqs) < 20:
                event = await asyncio.wait_for(anext(events), 10)
                assert isinstance(event, StoredMessage)
                seqs.append(event.seq)
                ready = [m for m in events._ready or () if isinstance(m, StoredMessage)]
                most_held = max(most_held, sum(len(m.content) for m in ready))
        finally:
            await events.aclose()
        assert seqs == list(range(1, 21))
        assert most_held <= page_bytes


@pytest.mark.standalone_only  # the outage logic (fail fast while Valkey is down) is standalone's
async def test_a_watch_whose_read_times_out_leaves_valkey_reachable_for_other_calls(
    settings: Settings, valkey_url: str, raw: Any, uid: str
) -> None:
    """Valkey paused (CLIENT PAUSE: it answers nobody, not even a probe's PING) for longer than
    the request timeout: a watch's read times out and the watch ends DEADLINE_EXCEEDED, but the
    server does not declare Valkey unreachable for its other calls because of it."""
    async with serving(settings, valkey_url, valkey_timeout_ms=200) as running:
        session_id = await new_session(running, uid, messages=1)
        async with connections(f"127.0.0.1:{running.port}", 1) as (stub,):
            first = await watch(stub, session_id)  # the process follows the session's channel
            await raw.custom_command(["CLIENT", "PAUSE", "1500", "ALL"])
            # A second watch joins at once (the channel is followed) and reads the session.
            call = stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id, after_seq=0))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 10)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Ended once its read timed out (200 ms), after which a probe would have failed
            # (300 ms more): well within the pause.
            assert running.connection.reachable
            first.cancel()
        async with SessionClient(f"127.0.0.1:{running.port}") as client:
            session = await client.get_session(session_id)  # after the pause: served as ever
            assert session.message_count == 1
