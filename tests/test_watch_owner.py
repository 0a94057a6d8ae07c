"""A watch never delivers another user's messages (found in review): expiry publishes nothing, so
until the feed's next poll a watch on an expired session still follows its channel, and a session
another user created under the same id meanwhile streamed its messages to it. Appends now say
whose session they went to. Poll set to 30 s here to make the window deterministic."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from chatsession_client import NotFoundError, user
from chatsession_server.settings import Settings
from tests.helpers import serving
from tests.test_auth import ALICE, ALICE_TOKEN, BOB, BOB_TOKEN, client_for, tokens_file  # noqa: F401


async def test_a_watch_never_delivers_another_users_messages(
    settings: Settings,
    valkey_url: str,
    tokens_file: Path,  # noqa: F811
    uid: str,
) -> None:
    poll = {"watch_poll_seconds": 30.0}
    async with serving(settings, valkey_url, auth_tokens_file=str(tokens_file), **poll) as running:
        target = f"127.0.0.1:{running.port}"
        async with client_for(target, ALICE_TOKEN) as alice, client_for(target, BOB_TOKEN) as bob:
            mine = await alice.create_session(ALICE, session_id=f"{uid}-x", ttl_seconds=1)
            seen: list[str] = []

            async def follow() -> None:
                with contextlib.suppress(NotFoundError):
                    async for event in alice.watch(mine.session_id, after_seq=0):
                        seen.append(event.message.content)

            watcher = asyncio.create_task(follow())
            await asyncio.sleep(1.5)  # alice's idle session expires under her open watch
            theirs = await bob.create_session(BOB, session_id=mine.session_id)
            await bob.append(theirs.session_id, [user("bob's private text")])
            await asyncio.sleep(0.5)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    assert seen == []
