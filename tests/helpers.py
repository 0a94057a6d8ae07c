"""Small assertions shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from glide import AllPrimaries, GlideClient, GlideClusterClient, SlotKeyRoute, SlotType

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import ChatSessionError, SessionClient, user
from chatsession_server.app import RunningServer, start_server
from chatsession_server.settings import Settings, ValkeyAddress

E = TypeVar("E", bound=ChatSessionError)
T = TypeVar("T")


@contextlib.asynccontextmanager
async def serving(base: Settings, valkey_url: str, **overrides: Any) -> AsyncIterator[RunningServer]:
    """A server of its own on the suite's Valkey (standalone or cluster, as `base` says), with
    `overrides` of the suite's settings, on a free port."""
    running = await start_server(
        dataclasses.replace(base, listen="127.0.0.1:0", **overrides), ValkeyAddress.parse(valkey_url)
    )
    try:
        yield running
    finally:
        await running.stop(1.0)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, *, interval: float = 0.02
) -> None:
    """Waits until `condition()` (a plain or an async callable) is true, polling every `interval`
    seconds; fails the test, naming the condition, once `timeout` seconds have passed without it.
    The one way a test waits for a state another task, process or Valkey reaches on its own."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            name = getattr(condition, "__qualname__", repr(condition))
            pytest.fail(f"{name} still false after {timeout} s")
        await asyncio.sleep(interval)


async def new_session(running: RunningServer, uid: str, messages: int = 0) -> str:
    """A session of `uid` on `running`, with `messages` messages appended."""
    async with SessionClient(f"127.0.0.1:{running.port}") as client:
        session_id = (await client.create_session(uid)).session_id
        for i in range(messages):
            await client.append(session_id, [user(f"m{i}")])
    return session_id


def as_is(event: T) -> T:
    """A Watch's `present` that hands each event over as it is."""
    return event


# Watches over gRPC as the tests open them.


@contextlib.asynccontextmanager
async def connections(
    target: str, n: int
) -> AsyncIterator[list[session_service_pb2_grpc.SessionServiceStub]]:
    """Stubs over `n` HTTP/2 connections of their own (gRPC channels to one target would share one)."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)
    ]
    try:
        yield [session_service_pb2_grpc.SessionServiceStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close()


async def watch(
    stub: session_service_pb2_grpc.SessionServiceStub, session_id: str, token: str | None = None
) -> Any:
    """A watch that the server has admitted: its first event (the heartbeat) has come."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    call = stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id), metadata=metadata)
    first = await asyncio.wait_for(call.read(), 10)
    assert isinstance(first, pb.WatchMessagesResponse)
    assert first.WhichOneof("event") == "heartbeat"
    return call


async def raises(cls: type[E], call: Awaitable[Any]) -> E:
    with pytest.raises(cls) as info:
        await call
    return info.value


def violated_fields(error: ChatSessionError) -> set[str]:
    return {v.field for v in error.field_violations}


async def stored_messages(raw: GlideClient, session_id: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in await raw.lrange(f"chat:{{{session_id}}}", 0, -1)]


async def meta(raw: GlideClient, session_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await raw.hgetall(f"meta:{{{session_id}}}")).items()}


async def session_keys_exist(raw: GlideClient, session_id: str) -> int:
    return await raw.exists([f"chat:{{{session_id}}}", f"meta:{{{session_id}}}", f"reqs:{{{session_id}}}"])


# Pub/sub as the server uses it: plain channels on standalone Valkey, sharded ones in a cluster
# (asked of the node that serves the channel's slot, or of every primary).


async def subscribers(raw: GlideClient, channel: str) -> int:
    if isinstance(raw, GlideClusterClient):
        route = SlotKeyRoute(SlotType.PRIMARY, channel)
        reply: Any = await raw.custom_command(["PUBSUB", "SHARDNUMSUB", channel], route=route)
    else:
        reply = await raw.custom_command(["PUBSUB", "NUMSUB", channel])
    return int(reply[channel.encode()])


async def channels_matching(raw: GlideClient, pattern: str) -> list[bytes]:
    if isinstance(raw, GlideClusterClient):
        # GLIDE combines the nodes' answers into one list.
        combined: Any = await raw.custom_command(["PUBSUB", "SHARDCHANNELS", pattern], route=AllPrimaries())
        return list(combined)
    reply: Any = await raw.custom_command(["PUBSUB", "CHANNELS", pattern])
    return list(reply)


async def subscribe_calls(raw: GlideClient) -> int:
    """SUBSCRIBE (or SSUBSCRIBE) commands Valkey has served, over every primary."""
    if isinstance(raw, GlideClusterClient):
        per_node: Any = await raw.custom_command(["INFO", "commandstats"], route=AllPrimaries())
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in per_node.values()]
        command = "ssubscribe"
    else:
        info = await raw.custom_command(["INFO", "commandstats"])
        texts = [info.decode() if isinstance(info, bytes) else str(info)]
        command = "subscribe"
    total = 0
    for text in texts:
        if m := re.search(rf"cmdstat_{command}:calls=(\d+)", text):
            total += int(m.group(1))
    return total


async def command_calls(raw: GlideClient, key: str) -> dict[str, int]:
    """Calls per command Valkey has served (on the node of `key`, in a cluster)."""
    if isinstance(raw, GlideClusterClient):
        text: Any = await raw.custom_command(
            ["INFO", "commandstats"], route=SlotKeyRoute(SlotType.PRIMARY, key)
        )
    else:
        text = await raw.custom_command(["INFO", "commandstats"])
    calls: dict[str, int] = {}
    for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line.partition(":")
            calls[name[len("cmdstat_") :]] = int(stats.split(",")[0].split("=")[1])
    return calls
