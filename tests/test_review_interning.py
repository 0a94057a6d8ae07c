"""Review of 8c9804b/2b3a23f, which interned each watch stream's peer (in the watch quota) and
its owner's user id (in the watch) with sys.intern; no longer done. On CPython 3.12, the Python
of the container image (Dockerfile: python:3.12-slim), every interned string is immortal: each
connection's peer ("ipv4:ADDRESS:PORT", new with each client port) was then kept for the life of
the process, which the quota's own comment promises not to do ("no growth with connections
seen"). Measured: 100,000 peers interned and dropped keep 9.9 MB on 3.12.1, 0.2 MB on 3.11 and
3.13. These tests check that no such string stays interned once its watch has ended (they were
xfail(strict) on 3.12 until the interning went)."""

from __future__ import annotations

import asyncio
import gc
import sys

from chatsession_client import SessionClient
from chatsession_server.settings import Settings
from tests.helpers import serving
from tests.test_quotas import connections, watch


def _still_interned(text: str) -> bool:
    """Whether an equal string is held in the interpreter's interned table."""
    fresh = "".join(list(text))  # a new object, never interned
    return sys.intern(fresh) is not fresh


async def test_review_a_closed_connection_leaves_no_peer_string(
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
        for _ in range(200):
            if running.watch_quota.watchers == 0:
                break
            await asyncio.sleep(0.025)
        assert running.watch_quota.watchers == 0
        gc.collect()
        assert [peer for peer in peers if _still_interned(peer)] == []


async def test_review_an_ended_watch_leaves_no_user_id_string(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with serving(settings, valkey_url) as running:
        target = f"127.0.0.1:{running.port}"
        owner = "".join(["review-owner-", uid])
        async with SessionClient(target) as client:
            session_id = (await client.create_session(owner)).session_id
        async with connections(target, 1) as (stub,):
            call = await watch(stub, session_id)
            call.cancel()
            del call
        for _ in range(200):
            if running.feed.watcher_count == 0:
                break
            await asyncio.sleep(0.025)
        assert running.feed.watcher_count == 0
        gc.collect()
        text = "".join(list(owner))
        del owner
        assert not _still_interned(text)
