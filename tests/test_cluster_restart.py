"""Cluster: a primary restarted in place (with its data, before any failover) and a watcher that
keeps following: the sharded subscription comes back on the node, and what was appended while it
was away reaches the watcher once, in order (the poll covers the gap)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from chatsession_client import Retry, SessionClient, user
from chatsession_server.app import start_server
from chatsession_server.embedded_cluster import EmbeddedCluster
from chatsession_server.settings import Settings, ValkeyAddress

pytestmark = pytest.mark.cluster_only


@pytest.fixture
def durable_cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, persistent=True) as cluster:
        yield cluster


async def test_a_watch_rides_out_a_restart_of_its_sessions_node(
    durable_cluster: EmbeddedCluster, uid: str
) -> None:
    settings = Settings(listen="127.0.0.1:0", valkey_cluster=True, watch_poll_seconds=0.5)
    server = await start_server(settings, ValkeyAddress.parse(durable_cluster.url))
    try:
        retry = Retry(initial_backoff=0.05, max_backoff=0.5, deadline=30)
        async with SessionClient(f"127.0.0.1:{server.port}", retry=retry) as client:
            s = await client.create_session(uid)
            seen: list[int] = []
            all_seen = asyncio.Event()

            async def follow() -> None:
                async for event in client.watch(s.session_id, after_seq=0):
                    if event.HasField("message"):
                        seen.append(event.message.seq)
                        if event.message.seq == 10:
                            all_seen.set()

            watching = asyncio.create_task(follow())
            for i in range(5):
                await client.append(s.session_id, [user(f"before {i}")], request_id=f"b{i}")
            node = durable_cluster.primary_for(f"chat:{{{s.session_id}}}")
            node.kill()
            await asyncio.sleep(0.3)
            node.start()  # same port and directory: its data and its slots come back
            for i in range(5):
                await client.append(s.session_id, [user(f"after {i}")], request_id=f"a{i}")
            await asyncio.wait_for(all_seen.wait(), 30)
            assert seen == list(range(1, 11))
            # While the watch is open, its sharded subscription is back on the restarted node
            # (GLIDE subscribes again by itself), so the next append arrives through pub/sub.
            channel = f"watch:{{{s.session_id}}}"
            deadline = time.monotonic() + 10
            while node.call("PUBSUB", "SHARDNUMSUB", channel)[1] != 1:
                assert time.monotonic() < deadline, "the watch channel was not subscribed again"
                await asyncio.sleep(0.1)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    finally:
        await server.stop(0.5)
