"""A live session stays listed even when its index score is older than --max-ttl-seconds (found in
review: listings used to drop such entries in bulk by score).

The score lags the session's real life in two ways: UpdateSession(ttl_seconds) extends the life
without touching last_active (both modes), and in a cluster an append whose index step failed
leaves the old score. Real time with a 3 s --max-ttl-seconds; about 4 s per test."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatsession_client import NO_RETRY, SessionClient, user
from chatsession_server.app import RunningServer, start_server
from chatsession_server.errors import StoreUnavailable
from chatsession_server.settings import Settings, ValkeyAddress

MAX_TTL = 3


@pytest.fixture
async def short_lived(
    settings: Settings, valkey_url: str
) -> AsyncIterator[tuple[RunningServer, SessionClient]]:
    short = dataclasses.replace(settings, max_ttl_seconds=MAX_TTL, default_ttl_seconds=MAX_TTL)
    running = await start_server(short, ValkeyAddress.parse(valkey_url))
    async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c:
        yield running, c
    await running.stop(1.0)


async def listed(client: SessionClient, user_id: str) -> list[str]:
    return [s.session_id async for s in client.iter_sessions(user_id)]


async def test_a_session_kept_alive_by_update_stays_listed(
    short_lived: tuple[RunningServer, SessionClient], uid: str
) -> None:
    _, client = short_lived
    s = await client.create_session(uid, session_id=f"{uid}-a", ttl_seconds=MAX_TTL)
    await asyncio.sleep(2.0)
    await client.update_session(s.session_id, ttl_seconds=MAX_TTL)  # lives until ~T0+5
    await asyncio.sleep(1.5)  # T0+3.5: idle 3.5 s since creation, live for another 1.5 s
    assert (await client.get_session(s.session_id)).session_id == s.session_id  # live
    assert await listed(client, uid) == [s.session_id]


@pytest.mark.cluster_only
async def test_a_session_whose_append_index_step_failed_stays_listed(
    monkeypatch: pytest.MonkeyPatch, short_lived: tuple[RunningServer, SessionClient], uid: str
) -> None:
    running, client = short_lived
    s = await client.create_session(uid, session_id=f"{uid}-b", ttl_seconds=MAX_TTL)
    await asyncio.sleep(2.0)

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    monkeypatch.setattr(running.store._owner_index, "touch", broken)
    await client.append(s.session_id, [user("keeps the session alive until ~T0+5")])
    monkeypatch.undo()
    await asyncio.sleep(1.5)
    assert (await client.get_session(s.session_id)).message_count == 1  # live
    assert await listed(client, uid) == [s.session_id]
