"""The watch feed's poll reads only the sessions pub/sub has not heard from since the previous
poll: N watched sessions that were just appended to cost no HGET, and each is read again on the
next poll unless it is heard from again (so expiry and lost publishes are still caught)."""

from __future__ import annotations

from typing import Any

from chatsession_client import SessionClient, user
from chatsession_server.domain import Appended, Deleted
from chatsession_server.settings import Settings
from chatsession_server.store import keys
from tests.helpers import serving
from tests.test_round_trips import command_counts

SESSIONS = 12


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
