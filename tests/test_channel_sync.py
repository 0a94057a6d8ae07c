"""ChannelSync against a real Valkey: batched rounds, and joins racing rounds and failures.

Some tests put a thin layer over the real GLIDE client to hold a call at a gate or to report a
timeout, so the races and failures happen on cue; Valkey underneath is always the real one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import glide
import pytest
from glide import GlideClient, GlideClusterClient

from chatsession_server.errors import StoreTimeout
from chatsession_server.settings import ValkeyAddress
from chatsession_server.store import channel_sync
from chatsession_server.store.channel_sync import ChannelSync, PubSubControl, Sharded
from chatsession_server.store.valkey import create_client, glide_config
from tests.helpers import eventually, subscribers


@pytest.fixture
async def pubsub(valkey_url: str, valkey_cluster: bool) -> AsyncIterator[PubSubControl]:
    """A pub/sub client as the feed makes one: plain on standalone Valkey, sharded in a cluster."""
    config = glide_config(
        ValkeyAddress.parse(valkey_url),
        cluster=valkey_cluster,
        request_timeout_ms=2000,
        connect_timeout_ms=2000,
        inflight_limit=1000,
    )
    subscriptions = type(config).PubSubSubscriptions(
        channels_and_patterns={}, callback=lambda msg, context: None, context=None
    )
    config.pubsub_subscriptions = subscriptions
    client = await create_client(config)
    yield Sharded(client) if isinstance(client, GlideClusterClient) else client
    await client.close()


@asynccontextmanager
async def syncing(client: PubSubControl, wanted: set[str]) -> AsyncIterator[ChannelSync]:
    sync = ChannelSync(client, lambda: wanted)
    try:
        yield sync
    finally:
        await sync.close()


def waiting_for_the_next_round(sync: ChannelSync) -> Callable[[], bool]:
    """True once a round has been asked for since the one out now: what a join does when it must
    not trust the channel's current subscription (a join that trusted it would be done at once)."""

    def asked() -> bool:
        return sync._next is not None

    return asked


class Layer:
    """The real client; subclasses change one call."""

    def __init__(self, client: PubSubControl) -> None:
        self.client = client

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.subscribe(channels, timeout_ms=timeout_ms)

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.unsubscribe(channels, timeout_ms=timeout_ms)


class Gated(Layer):
    """`call` ("subscribe" or "unsubscribe") waits for the gate; `entered` says it has begun."""

    def __init__(self, client: PubSubControl, call: str) -> None:
        super().__init__(client)
        self.call = call
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def _hold(self, call: str) -> None:
        if call == self.call:
            self.entered.set()
            await self.gate.wait()

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self._hold("subscribe")
        await super().subscribe(channels, timeout_ms)

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self._hold("unsubscribe")
        await super().unsubscribe(channels, timeout_ms)


class TimesOutOnce(Layer):
    """`call` reports a timeout once: after it took effect, or without doing anything."""

    def __init__(self, client: PubSubControl, call: str, *, takes_effect: bool) -> None:
        super().__init__(client)
        self.call = call
        self.takes_effect = takes_effect
        self.pending = True

    async def _fail(self, call: str, effect: Any) -> None:
        if call != self.call or not self.pending:
            await effect
            return
        self.pending = False
        if self.takes_effect:
            await effect
        else:
            effect.close()
        raise glide.TimeoutError("reply lost")

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self._fail("subscribe", super().subscribe(channels, timeout_ms))

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self._fail("unsubscribe", super().unsubscribe(channels, timeout_ms))


async def test_many_channels_come_and_go_together(pubsub: PubSubControl, raw: GlideClient, uid: str) -> None:
    channels = {f"watch:{{{uid}-{i}}}" for i in range(200)}
    wanted: set[str] = set()
    async with syncing(pubsub, wanted) as sync:
        wanted |= channels
        await asyncio.gather(*(sync.subscribed(c) for c in channels))
        assert [await subscribers(raw, c) for c in sorted(channels)[:5]] == [1] * 5
        wanted.clear()
        await sync.changed()
        assert [await subscribers(raw, c) for c in sorted(channels)[:5]] == [0] * 5


async def test_a_join_during_an_unsubscribe_waits_and_is_subscribed_again(
    pubsub: PubSubControl, raw: GlideClient, uid: str
) -> None:
    gated = Gated(pubsub, "unsubscribe")
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    async with syncing(gated, wanted) as sync:
        await sync.subscribed(channel)
        assert await subscribers(raw, channel) == 1
        wanted.clear()
        sync.changed()
        await asyncio.wait_for(gated.entered.wait(), 5)  # the round is out, unsubscribing
        wanted.add(channel)  # a watcher comes back meanwhile
        joining = asyncio.create_task(sync.subscribed(channel))
        await eventually(waiting_for_the_next_round(sync), interval=0)
        assert not joining.done()  # it must not trust a subscription that is going away
        gated.gate.set()
        await asyncio.wait_for(joining, 5)
        assert await subscribers(raw, channel) == 1


async def test_a_join_during_a_round_that_will_unsubscribe_it_waits_for_the_next(
    pubsub: PubSubControl, raw: GlideClient, uid: str
) -> None:
    gated = Gated(pubsub, "subscribe")
    leaving, arriving = f"watch:{{{uid}-x}}", f"watch:{{{uid}-y}}"
    wanted = {leaving}
    async with syncing(gated, wanted) as sync:
        gated.gate.set()
        await sync.subscribed(leaving)
        gated.gate.clear()
        gated.entered.clear()
        wanted.discard(leaving)  # its last watcher leaves while another session's first arrives:
        wanted.add(arriving)  # one round subscribes y, then unsubscribes x
        sync.changed()
        await asyncio.wait_for(gated.entered.wait(), 5)
        wanted.add(leaving)  # x is watched again while that round is out
        joining = asyncio.create_task(sync.subscribed(leaving))
        await eventually(waiting_for_the_next_round(sync), interval=0)
        assert not joining.done()
        gated.gate.set()
        await asyncio.wait_for(joining, 5)
        assert await subscribers(raw, leaving) == 1
        assert await subscribers(raw, arriving) == 1


async def test_a_failed_subscribe_that_took_effect_is_undone_once_unwanted(
    pubsub: PubSubControl, raw: GlideClient, uid: str
) -> None:
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    async with syncing(TimesOutOnce(pubsub, "subscribe", takes_effect=True), wanted) as sync:
        with pytest.raises(StoreTimeout):  # the join fails and leaves...
            await sync.subscribed(channel)
        assert await subscribers(raw, channel) == 1  # ...but Valkey did subscribe
        wanted.clear()
        await sync.changed()
        assert await subscribers(raw, channel) == 0


async def test_after_a_failed_unsubscribe_that_took_effect_a_join_subscribes_again(
    pubsub: PubSubControl, raw: GlideClient, uid: str
) -> None:
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    async with syncing(TimesOutOnce(pubsub, "unsubscribe", takes_effect=True), wanted) as sync:
        await sync.subscribed(channel)
        wanted.clear()
        await sync.changed()
        assert await subscribers(raw, channel) == 0
        wanted.add(channel)
        await asyncio.wait_for(sync.subscribed(channel), 5)
        assert await subscribers(raw, channel) == 1


async def test_a_failed_unsubscribe_is_retried_by_itself(
    pubsub: PubSubControl, raw: GlideClient, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_sync, "RETRY_SECONDS", 0.1)
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    async with syncing(TimesOutOnce(pubsub, "unsubscribe", takes_effect=False), wanted) as sync:
        await sync.subscribed(channel)
        wanted.clear()
        await sync.changed()
        assert await subscribers(raw, channel) == 1  # the first attempt failed

        async def unsubscribed() -> bool:
            return await subscribers(raw, channel) == 0

        await eventually(unsubscribed)
        assert await subscribers(raw, channel) == 0  # nobody asked again: the retry did it
