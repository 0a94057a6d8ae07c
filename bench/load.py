"""One measurement, run as a process of its own (pinned to the load cores), printed as one JSON line.

    python bench/load.py append --port P --in-flight 64 --seconds 3 --cpu-pid PID
    python bench/load.py echo --port P ...            # the bare grpc.aio echo (bare_stream_server.py)
    python bench/load.py echo-script --port P ...     # the echo after one GLIDE script call
    python bench/load.py cookbook --valkey-url URL    # the cookbook append: 4 sequential GLIDE awaits
    python bench/load.py list-sessions --port P / scan-listing --valkey-url URL / populate ...
    python bench/load.py agent-turn --port P          # an Agents SDK turn through ChatsessionSession
    python bench/load.py agent-turn-redis --valkey-url URL   # the same turn through the SDK's RedisSession

The cookbook baselines (the append, the SCAN listing) stand for code an application server runs
against Valkey, so they run with `--as-server` on the server's core, as chatsession does.

Each run warms up for a second, then measures for `--seconds`: calls, p50/p99 latency, and the
CPU the process `--cpu-pid` (the server under test) used per call meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from glide import Batch, GlideClient, GlideClientConfiguration, NodeAddress

sys.path.insert(0, os.path.dirname(__file__))
from common import LOAD_CPUS, SERVER_CPUS, cpu_seconds, percentile

from chatsession.v1 import session_pb2, session_service_pb2, session_service_pb2_grpc

CHANNELS = 8
CONTENT = "x" * 200
MESSAGE = session_pb2.Message(role=session_pb2.ROLE_USER, content=CONTENT, tokens=50)
ECHO_METHOD = "/chatsession.bench.Echo/Echo"
ECHO_SCRIPT_METHOD = "/chatsession.bench.Echo/EchoScript"  # the echo after one EVALSHA
OTHER_USERS = 1000  # populated sessions belong to this many users other than the lister


def channels(port: int) -> list[grpc.aio.Channel]:
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CHANNELS)]


async def glide(url: str) -> GlideClient:
    host, _, port = url.removeprefix("valkey://").partition(":")
    return await GlideClient.create(
        GlideClientConfiguration([NodeAddress(host, int(port))], request_timeout=60_000)
    )


Call = Callable[[int], Awaitable[Any]]


async def drive(call: Call, in_flight: int, args: argparse.Namespace, cpu_pid: int = 0) -> dict[str, float]:
    """`call(slot)` in `in_flight` loops: `args.warmup` seconds of warm-up, then `args.seconds` measured."""
    latencies: list[float] = []
    measuring = False
    stop_at = time.monotonic() + args.warmup + args.seconds

    async def loop(slot: int) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await call(slot)
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(loop(i)) for i in range(in_flight)]
    await asyncio.sleep(args.warmup)
    measuring = True
    started, cpu_before = time.monotonic(), cpu_seconds(cpu_pid) if cpu_pid else 0.0
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    cpu = (cpu_seconds(cpu_pid) - cpu_before) if cpu_pid else 0.0
    calls = max(len(latencies), 1)
    return {
        "calls": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_us": statistics.median(latencies) * 1e6 if latencies else 0.0,
        "p99_us": percentile(latencies, 99) * 1e6 if latencies else 0.0,
        "cpu_us_per_call": cpu / calls * 1e6,
    }


async def sessions_for(stubs: list[Any], count: int, messages: int) -> list[str]:
    ids = []
    for i in range(count):
        request = session_service_pb2.CreateSessionRequest(user_id=f"bench-{uuid.uuid4().hex[:8]}")
        ids.append((await stubs[i % CHANNELS].CreateSession(request, timeout=10)).session.session_id)
        if messages:
            append = session_service_pb2.AppendMessagesRequest(
                session_id=ids[-1], messages=[MESSAGE] * messages
            )
            await stubs[i % CHANNELS].AppendMessages(append, timeout=10)
    return ids


# An Agents SDK turn as the Runner stores it: the user's input, then the model's output message
# (content of CONTENT's size each), and the next turn's read of the newest AGENT_HISTORY items.
AGENT_HISTORY = 20
AGENT_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": CONTENT},
    {
        "id": "msg_0123456789abcdef",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": CONTENT, "annotations": [], "logprobs": []}],
    },
]


async def agent_turns(args: argparse.Namespace) -> dict[str, Any]:
    """`in_flight` conversations, each with AGENT_HISTORY items already, taking turns: add the
    turn's two items, read the newest AGENT_HISTORY. Through chatsession (ChatsessionSession over
    one shared SessionClient) or, the baseline, the Agents SDK's RedisSession on the same Valkey."""
    from agents.extensions.memory.redis_session import RedisSession
    from redis.asyncio import Redis

    from chatsession_client import SessionClient
    from chatsession_client.openai_agents import ChatsessionSession

    run_id = uuid.uuid4().hex[:8]
    sessions: list[Any]
    if args.kind == "agent-turn":
        client = SessionClient(f"127.0.0.1:{args.port}")
        sessions = [
            ChatsessionSession(f"agents-{run_id}-{i}", user_id="bench-agents", client=client)
            for i in range(args.in_flight)
        ]
        close = client.close
    else:
        redis = Redis.from_url(args.valkey_url.replace("valkey://", "redis://"))
        sessions = [RedisSession(f"agents-{run_id}-{i}", redis_client=redis) for i in range(args.in_flight)]
        close = redis.aclose
    try:
        for session in sessions:
            await session.add_items(AGENT_TURN * (AGENT_HISTORY // 2))

        async def turn(slot: int) -> None:
            await sessions[slot].add_items(AGENT_TURN)
            history = await sessions[slot].get_items(limit=AGENT_HISTORY)
            assert len(history) == AGENT_HISTORY, len(history)

        return await drive(turn, args.in_flight, args, args.cpu_pid)
    finally:
        await close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kind = args.kind
    if kind in ("agent-turn", "agent-turn-redis"):
        return await agent_turns(args)
    if kind in ("cookbook", "scan-listing", "populate"):
        client = await glide(args.valkey_url)
        try:
            return await valkey_side(kind, client, args)
        finally:
            await client.close()
    chans = channels(args.port)
    stubs = [session_service_pb2_grpc.SessionServiceStub(c) for c in chans]
    try:
        if kind in ("echo", "echo-script"):
            method = ECHO_METHOD if kind == "echo" else ECHO_SCRIPT_METHOD
            echoes: list[Any] = [c.unary_unary(method) for c in chans]  # bytes in, the same bytes back
            payload = session_service_pb2.AppendMessagesRequest(
                session_id="s", messages=[MESSAGE], request_id=uuid.uuid4().hex
            ).SerializeToString()

            async def call(slot: int) -> Any:
                return await echoes[slot % CHANNELS](payload, timeout=10)

        elif kind == "append":
            ids = await sessions_for(stubs, args.in_flight, 0)
            batch = [MESSAGE] * args.messages

            async def call(slot: int) -> Any:
                request = session_service_pb2.AppendMessagesRequest(
                    session_id=ids[slot], messages=batch, request_id=uuid.uuid4().hex
                )
                return await stubs[slot % CHANNELS].AppendMessages(request, timeout=10)

        elif kind == "list":
            ids = await sessions_for(stubs, args.in_flight, 20)

            async def call(slot: int) -> Any:
                request = session_service_pb2.ListMessagesRequest(session_id=ids[slot], page_size=20)
                return await stubs[slot % CHANNELS].ListMessages(request, timeout=10)

        elif kind == "get":
            ids = await sessions_for(stubs, args.in_flight, 5)

            async def call(slot: int) -> Any:
                request = session_service_pb2.GetSessionRequest(session_id=ids[slot])
                return await stubs[slot % CHANNELS].GetSession(request, timeout=10)

        elif kind == "list-sessions":
            request = session_service_pb2.ListSessionsRequest(user_id="lister", page_size=20)

            async def call(slot: int) -> Any:
                reply = await stubs[0].ListSessions(request, timeout=60)
                assert len(reply.sessions) == 20, len(reply.sessions)
                return reply

        else:
            raise SystemExit(f"unknown kind {kind}")
        return await drive(call, args.in_flight, args, args.cpu_pid)
    finally:
        for c in chans:
            await c.close()


async def valkey_side(kind: str, client: GlideClient, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "populate":  # sessions of other users, as chatsession stores them, for the listings
        now = time.time()
        for start in range(0, args.count, 1000):
            batch = Batch(is_atomic=False)
            for i in range(start, min(start + 1000, args.count)):
                sid, uid = f"other-{args.tag}-{i}", f"other-{i % OTHER_USERS}"
                score = f"{now - i / 1000:.6f}"
                fields = {"user_id": uid, "title": f"session {i}", "last_active": score, "created_at": score}
                batch.hset(f"meta:{{{sid}}}", fields)
                batch.zadd(f"user_sessions:{{{uid}}}", {sid: float(score)})
            await client.exec(batch, raise_on_error=True)
        return {"populated": args.count}
    if kind == "cookbook":
        # The pattern chatsession grew from: the message onto a LIST, then the counters, one
        # awaited command after another.
        ids = [uuid.uuid4().hex for _ in range(args.in_flight)]
        body = json.dumps({"role": "user", "content": CONTENT, "tokens": 50})

        async def one_append(sid: str) -> None:
            await client.rpush(f"chat:{{{sid}}}", [body])
            await client.hincrby(f"meta:{{{sid}}}", "message_count", 1)
            await client.hincrby(f"meta:{{{sid}}}", "token_count", 50)
            await client.hset(f"meta:{{{sid}}}", {"last_active": f"{time.time():.6f}"})

        async def call(slot: int) -> None:
            for _ in range(args.messages):  # n messages: n cookbook appends
                await one_append(ids[slot])

        return await drive(call, args.in_flight, args, args.cpu_pid)
    if kind == "scan-listing":
        # The cookbook's listing: SCAN every session key, read each owner, keep the user's.
        async def listing(slot: int) -> list[bytes]:
            cursor: Any = "0"
            mine: list[Any] = []
            while True:
                cursor, found = await client.scan(cursor, match="meta:{*", count=1000)
                if found:
                    batch = Batch(is_atomic=False)
                    for key in found:
                        batch.hget(key, "user_id")
                    owners = await client.exec(batch, raise_on_error=True) or []
                    mine += [k for k, o in zip(found, owners, strict=True) if o == b"lister"]
                if cursor in (b"0", "0"):
                    return mine[:20]

        return await drive(listing, 1, args)
    raise SystemExit(f"unknown kind {kind}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--valkey-url", default="")
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--messages", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--cpu-pid", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--as-server", action="store_true", help="run on the server cores (the cookbook baselines)"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, SERVER_CPUS if args.as_server else LOAD_CPUS)
    import uvloop

    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
