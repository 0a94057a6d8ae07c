"""A cluster losing the node of a session.

Failover under load: 3 primaries + 3 replicas, the primary of a session is killed while appends
run; after the replica's promotion appends succeed again, no append is stored twice, and with
--valkey-wait-replicas 1 every acknowledged append is stored. Without it the test prints how many
acknowledged appends were lost (the README quotes these runs).

A primary restarted in place (with its data, before any failover) and a watcher that keeps
following: the sharded subscription comes back on the node, and what was appended while it was
away reaches the watcher once, in order (the poll covers the gap)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from glide import GlideClusterClient, GlideClusterClientConfiguration, NodeAddress

from chatsession_client import ChatSessionError, Retry, SessionClient, user
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded_cluster import EmbeddedCluster
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import eventually

pytestmark = pytest.mark.cluster_only


@pytest.fixture
def replicated() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        yield cluster


@dataclass
class Run:
    acknowledged: list[str] = field(default_factory=list)
    failed: int = 0
    acknowledged_after_kill: int = 0
    ack_times: list[float] = field(default_factory=list)
    killed_at: float = 0.0
    watched: list[int] = field(default_factory=list)
    """seqs a watcher on the server received, through the failover"""

    @property
    def unavailable_seconds(self) -> float:
        """The longest time without any acknowledged append, from the kill on."""
        times = [self.killed_at] + [t for t in self.ack_times if t >= self.killed_at]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def append_through_a_failover(
    cluster: EmbeddedCluster, server: RunningServer, session_id: str, *, writers: int = 8
) -> Run:
    """Writers append (each with its request_id, the client retrying) while the session's primary
    is killed; the killed node comes back (empty) as a replica, as a restarted pod would."""
    run = Run()
    stop = asyncio.Event()
    retry = Retry(initial_backoff=0.05, max_backoff=0.5, deadline=15)
    async with SessionClient(f"127.0.0.1:{server.port}", retry=retry) as client:

        async def writer(w: int) -> None:
            i = 0
            while not stop.is_set():
                content = f"w{w}-{i}"
                try:
                    await client.append(session_id, [user(content)], request_id=f"{session_id}-{content}")
                except ChatSessionError:
                    run.failed += 1
                else:
                    run.acknowledged.append(content)
                    run.ack_times.append(time.monotonic())
                    if run.killed_at:
                        run.acknowledged_after_kill += 1
                i += 1

        async def watcher() -> None:
            async for event in client.watch(session_id, after_seq=0):  # resumes by itself
                if event.HasField("message"):
                    run.watched.append(event.message.seq)

        watching = asyncio.create_task(watcher())
        tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
        await asyncio.sleep(1.0)  # not a wait for a state: a second of appends before the kill
        victim = cluster.primary_for(f"chat:{{{session_id}}}")
        victim.kill()
        run.killed_at = time.monotonic()
        # Only once its replica has taken over: a primary without persistence that came back
        # before that would serve its slots again, empty (Valkey's own rule, not ours).
        promoted = await asyncio.to_thread(cluster.wait_for_new_primary, f"chat:{{{session_id}}}", victim)
        assert promoted is not victim
        victim.start()  # rejoins as a replica of the promoted node

        def appending_again() -> bool:
            return run.acknowledged_after_kill >= 50 * writers

        await eventually(appending_again, 30)
        stop.set()
        await asyncio.gather(*tasks)
        # The watcher catches up (sharded subscriptions move to the new primary; the poll covers
        # the gap), then stops.
        final = (await client.get_session(session_id)).message_count

        def caught_up() -> bool:
            return bool(run.watched) and run.watched[-1] >= final

        await eventually(caught_up, 20)
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert run.acknowledged_after_kill > 0, "appends never succeeded again after the failover"
    return run


async def stored_contents(cluster: EmbeddedCluster, session_id: str) -> list[str]:
    nodes = [NodeAddress(n.host, n.port) for n in cluster.primaries]
    raw = await GlideClusterClient.create(GlideClusterClientConfiguration(nodes, request_timeout=2000))
    try:
        items = await raw.lrange(f"chat:{{{session_id}}}", 0, -1)
    finally:
        await raw.close()
    return [json.loads(item)["content"] for item in items]


@pytest.mark.parametrize("wait_replicas", [1, 0])
async def test_failover_under_concurrent_appends(
    replicated: EmbeddedCluster, wait_replicas: int, uid: str
) -> None:
    settings = Settings(listen="127.0.0.1:0", valkey_cluster=True, valkey_wait_replicas=wait_replicas)
    server = await start_server(settings, ValkeyAddress.parse(replicated.url))
    try:
        async with SessionClient(f"127.0.0.1:{server.port}") as client:
            s = await client.create_session(uid, session_id=f"{uid}-fo")
        run = await append_through_a_failover(replicated, server, s.session_id)
    finally:
        await server.stop(1.0)
    stored = await stored_contents(replicated, s.session_id)
    assert len(stored) == len(set(stored)), "an append was stored twice"
    lost = set(run.acknowledged) - set(stored)
    print(
        f"\nfailover, --valkey-wait-replicas {wait_replicas}: {len(run.acknowledged)} appends acknowledged, "
        f"{len(lost)} of them lost, {run.failed} failed after the client's retries, "
        f"{run.unavailable_seconds:.2f}s without an acknowledged append"
    )
    if wait_replicas:
        assert not lost, f"{len(lost)} acknowledged appends lost"
    # The watcher saw every stored message once, in order, through the failover.
    assert run.watched == list(range(1, len(stored) + 1))


# -- a primary restarted in place


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
            await asyncio.sleep(0.3)  # not a wait for a state: the node stays away a while
            node.start()  # same port and directory: its data and its slots come back
            for i in range(5):
                await client.append(s.session_id, [user(f"after {i}")], request_id=f"a{i}")
            await asyncio.wait_for(all_seen.wait(), 30)
            assert seen == list(range(1, 11))
            # While the watch is open, its sharded subscription is back on the restarted node
            # (GLIDE subscribes again by itself), so the next append arrives through pub/sub.
            channel = f"watch:{{{s.session_id}}}"

            def subscribed_again() -> bool:
                return bool(node.call("PUBSUB", "SHARDNUMSUB", channel)[1] == 1)

            await eventually(subscribed_again, 10, interval=0.1)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    finally:
        await server.stop(0.5)
