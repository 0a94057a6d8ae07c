"""ChannelSync against a real Valkey: batched rounds, and a join racing an unsubscribe."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import glide
import pytest
from glide import GlideClient, GlideClientConfiguration, NodeAddress

from chatsession_server.errors import StoreTimeout
from chatsession_server.settings import ValkeyAddress
from chatsession_server.store import channel_sync
from chatsession_server.store.channel_sync import ChannelSync


async def pubsub_client(valkey_url: str) -> GlideClient:
    address = ValkeyAddress.parse(valkey_url)
    config = GlideClientConfiguration([NodeAddress(address.host, address.port)], request_timeout=2000)
    config.pubsub_subscriptions = GlideClientConfiguration.PubSubSubscriptions(
        channels_and_patterns={}, callback=lambda msg, context: None, context=None
    )
    return await GlideClient.create(config)


async def subscribers(raw: GlideClient, channel: str) -> int:
    reply: Any = await raw.custom_command(["PUBSUB", "NUMSUB", channel])
    return int(reply[channel.encode()])


class GatedUnsubscribe:
    """The real client, except that UNSUBSCRIBE waits for the test to open the gate."""

    def __init__(self, client: GlideClient) -> None:
        self.client = client
        self.gate = asyncio.Event()
        self.unsubscribing = asyncio.Event()

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.subscribe(channels, timeout_ms=timeout_ms)

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        self.unsubscribing.set()
        await self.gate.wait()
        await self.client.unsubscribe(channels, timeout_ms=timeout_ms)


async def test_a_join_during_an_unsubscribe_waits_and_is_subscribed_again(
    valkey_url: str, raw: GlideClient, uid: str
) -> None:
    client = await pubsub_client(valkey_url)
    gated = GatedUnsubscribe(client)
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    sync = ChannelSync(cast(GlideClient, gated), lambda: wanted)
    try:
        await sync.subscribed(channel)
        assert await subscribers(raw, channel) == 1
        wanted.clear()
        sync.changed()
        await asyncio.wait_for(gated.unsubscribing.wait(), 5)  # the round is out, unsubscribing
        wanted.add(channel)  # a watcher comes back meanwhile
        joining = asyncio.create_task(sync.subscribed(channel))
        await asyncio.sleep(0.1)
        assert not joining.done()  # it must not trust a subscription that is going away
        gated.gate.set()
        await asyncio.wait_for(joining, 5)
        assert await subscribers(raw, channel) == 1
    finally:
        await sync.close()
        await client.close()


async def test_many_channels_come_and_go_together(valkey_url: str, raw: GlideClient, uid: str) -> None:
    client = await pubsub_client(valkey_url)
    channels = {f"watch:{{{uid}-{i}}}" for i in range(200)}
    wanted: set[str] = set()
    sync = ChannelSync(client, lambda: wanted)
    try:
        wanted |= channels
        await asyncio.gather(*(sync.subscribed(c) for c in channels))
        assert [await subscribers(raw, c) for c in sorted(channels)[:5]] == [1] * 5
        wanted.clear()
        await sync.changed()
        assert [await subscribers(raw, c) for c in sorted(channels)[:5]] == [0] * 5
    finally:
        await sync.close()
        await client.close()


class SubscribeThenTimeOut:
    """The real client, but SUBSCRIBE reports a timeout after it has in fact taken effect."""

    def __init__(self, client: GlideClient) -> None:
        self.client = client

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.subscribe(channels, timeout_ms=timeout_ms)
        raise glide.TimeoutError("reply lost")

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.unsubscribe(channels, timeout_ms=timeout_ms)


async def test_a_failed_subscribe_that_took_effect_is_undone_once_unwanted(
    valkey_url: str, raw: GlideClient, uid: str
) -> None:
    client = await pubsub_client(valkey_url)
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    sync = ChannelSync(cast(GlideClient, SubscribeThenTimeOut(client)), lambda: wanted)
    try:
        with pytest.raises(StoreTimeout):  # the join fails and leaves...
            await sync.subscribed(channel)
        assert await subscribers(raw, channel) == 1  # ...but Valkey did subscribe
        wanted.clear()
        await sync.changed()
        assert await subscribers(raw, channel) == 0
    finally:
        await sync.close()
        await client.close()


class GatedSubscribe:
    """The real client, except that SUBSCRIBE waits for the test to open the gate."""

    def __init__(self, client: GlideClient) -> None:
        self.client = client
        self.gate = asyncio.Event()
        self.subscribing = asyncio.Event()

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        self.subscribing.set()
        await self.gate.wait()
        await self.client.subscribe(channels, timeout_ms=timeout_ms)

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.unsubscribe(channels, timeout_ms=timeout_ms)


async def test_a_join_during_a_round_that_will_unsubscribe_it_waits_for_the_next(
    valkey_url: str, raw: GlideClient, uid: str
) -> None:
    client = await pubsub_client(valkey_url)
    gated = GatedSubscribe(client)
    leaving, arriving = f"watch:{{{uid}-x}}", f"watch:{{{uid}-y}}"
    wanted = {leaving}
    sync = ChannelSync(cast(GlideClient, gated), lambda: wanted)
    try:
        gated.gate.set()
        await sync.subscribed(leaving)
        gated.gate.clear()
        gated.subscribing.clear()
        wanted.discard(leaving)  # its last watcher leaves while another session's first arrives:
        wanted.add(arriving)  # one round subscribes y, then unsubscribes x
        sync.changed()
        await asyncio.wait_for(gated.subscribing.wait(), 5)
        wanted.add(leaving)  # x is watched again while that round is out
        joining = asyncio.create_task(sync.subscribed(leaving))
        await asyncio.sleep(0.1)
        assert not joining.done()
        gated.gate.set()
        await asyncio.wait_for(joining, 5)
        assert await subscribers(raw, leaving) == 1
        assert await subscribers(raw, arriving) == 1
    finally:
        await sync.close()
        await client.close()


class UnsubscribeFails:
    """The real client, but UNSUBSCRIBE reports a timeout: after taking effect, or without."""

    def __init__(self, client: GlideClient, *, takes_effect: bool) -> None:
        self.client = client
        self.takes_effect = takes_effect
        self.failures = 1

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self.client.subscribe(channels, timeout_ms=timeout_ms)

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        if self.failures and not self.takes_effect:
            self.failures -= 1
            raise glide.TimeoutError("no answer")
        await self.client.unsubscribe(channels, timeout_ms=timeout_ms)
        if self.failures:
            self.failures -= 1
            raise glide.TimeoutError("reply lost")


async def test_after_a_failed_unsubscribe_that_took_effect_a_join_subscribes_again(
    valkey_url: str, raw: GlideClient, uid: str
) -> None:
    client = await pubsub_client(valkey_url)
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    sync = ChannelSync(cast(GlideClient, UnsubscribeFails(client, takes_effect=True)), lambda: wanted)
    try:
        await sync.subscribed(channel)
        wanted.clear()
        await sync.changed()
        assert await subscribers(raw, channel) == 0
        wanted.add(channel)
        await asyncio.wait_for(sync.subscribed(channel), 5)
        assert await subscribers(raw, channel) == 1
    finally:
        await sync.close()
        await client.close()


async def test_a_failed_unsubscribe_is_retried_by_itself(
    valkey_url: str, raw: GlideClient, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_sync, "RETRY_SECONDS", 0.1)
    client = await pubsub_client(valkey_url)
    channel = f"watch:{{{uid}}}"
    wanted = {channel}
    sync = ChannelSync(cast(GlideClient, UnsubscribeFails(client, takes_effect=False)), lambda: wanted)
    try:
        await sync.subscribed(channel)
        wanted.clear()
        await sync.changed()
        assert await subscribers(raw, channel) == 1  # the first attempt failed
        for _ in range(50):
            await asyncio.sleep(0.05)
            if await subscribers(raw, channel) == 0:
                break
        assert await subscribers(raw, channel) == 0  # nobody asked again: the retry did it
    finally:
        await sync.close()
        await client.close()
