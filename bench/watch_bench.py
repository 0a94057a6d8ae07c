"""WatchMessages benchmark: append-to-delivery latency and memory per idle watcher.

Starts the real server as a separate process (with its embedded Valkey), drives it over real
gRPC from this process, and prints medians with the baseline of the same run: the AppendMessages
round trip (the append alone, acknowledged) next to the append-to-delivery latency.

The idle-watcher figure has its baseline too: the same streams held open on a bare grpc.aio
server (bench/bare_stream_server.py) with the same options, so the difference is what we add.

    python bench/watch_bench.py                      # 1, 100 and 1000 watchers; 10,000 idle
    python bench/watch_bench.py --idle 2000 --appends 100
    python bench/watch_bench.py --watchers --idle 10000 --idle-sessions 10000   # memory only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import LOAD_CPUS, ROOT, SERVER_CPUS, cpu_seconds
from common import percentile as pct

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import NO_RETRY, SessionClient, user

CHANNELS = 16  # spread streams over several HTTP/2 connections, as many clients would


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


SERVER = ["-m", "chatsession_server", "--listen", "127.0.0.1:0"]
BARE_SERVER = [str(ROOT / "bench" / "bare_stream_server.py")]


async def start_server(args: list[str]) -> tuple[asyncio.subprocess.Process, int]:
    env = {k: v for k, v in os.environ.items() if k != "CHATSESSION_VALKEY_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        if not line:
            raise RuntimeError("server exited")
        if m := re.search(r"serving on [\d.]+:(\d+)", line):
            # The server alone: its embedded Valkey was started from our (load) cores.
            os.sched_setaffinity(proc.pid, SERVER_CPUS)
            # Keep draining its log so a full pipe never stalls it.
            asyncio.get_running_loop().create_task(proc.stderr.read())
            return proc, int(m.group(1))


async def watcher(
    stub: object, session_id: str, arrivals: dict[int, list[float]], ready: asyncio.Event, total: int
) -> None:
    call = stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id))  # type: ignore[attr-defined]
    seen = 0
    async for event in call:
        if event.WhichOneof("event") == "heartbeat" and not seen:
            ready.set()
            continue
        if event.WhichOneof("event") == "message":
            arrivals.setdefault(event.message.seq, []).append(time.perf_counter())
            seen += 1
            if seen >= total:
                call.cancel()
                return


async def latency_run(
    target: str, channels: list[grpc.aio.Channel], watchers: int, appends: int
) -> dict[str, float]:
    """Append-to-delivery latency at `watchers` watchers of one session, and the append round trip."""
    from chatsession.v1 import session_service_pb2_grpc

    async with SessionClient(target, retry=NO_RETRY) as client:
        session = await client.create_session("bench", title=f"{watchers} watchers")
        arrivals: dict[int, list[float]] = {}
        readies = [asyncio.Event() for _ in range(watchers)]
        stubs = [session_service_pb2_grpc.SessionServiceStub(c) for c in channels]
        tasks = [
            asyncio.create_task(
                watcher(stubs[i % len(stubs)], session.session_id, arrivals, readies[i], appends)
            )
            for i in range(watchers)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
        sent: dict[int, float] = {}
        round_trips: list[float] = []
        for _ in range(appends):
            t0 = time.perf_counter()
            reply = await client.append(session.session_id, [user("ping", tokens=1)])
            round_trips.append(time.perf_counter() - t0)
            sent[reply.messages[0].seq] = t0
            await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        delivery = [(t - sent[seq]) * 1000 for seq, times in arrivals.items() for t in times]
        last = [(max(times) - sent[seq]) * 1000 for seq, times in arrivals.items()]
        rtt = [x * 1000 for x in round_trips]
        print(
            f"watchers={watchers:5d} appends={appends} deliveries={len(delivery)}  "
            f"append RTT p50={statistics.median(rtt):.2f}ms p99={pct(rtt, 99):.2f}ms | "
            f"delivery p50={statistics.median(delivery):.2f}ms p99={pct(delivery, 99):.2f}ms "
            f"(p50/RTT={statistics.median(delivery) / statistics.median(rtt):.2f}) | "
            f"last watcher p50={statistics.median(last):.2f}ms"
        )
        return {"append_rtt_p50_ms": statistics.median(rtt), "delivery_p50_ms": statistics.median(delivery)}


async def idle_run(
    channels: list[grpc.aio.Channel], pid: int, session_ids: list[str], idle: int, cpu_window: float
) -> float:
    """Open `idle` watches over `session_ids` and return the server's RSS growth per watch, in KiB.
    Also prints the CPU the server spends holding them idle (heartbeats, keepalive, polling)."""
    from chatsession.v1 import session_service_pb2_grpc

    stubs = [session_service_pb2_grpc.SessionServiceStub(c) for c in channels]

    def open_watch(i: int) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
        request = pb.WatchMessagesRequest(session_id=session_ids[i % len(session_ids)])
        return stubs[i % len(stubs)].WatchMessages(request)

    # Warm the server's allocators and gRPC paths first, so the figure is per watcher.
    warm = [open_watch(i) for i in range(200)]
    for call in warm:
        await call.read()
    await asyncio.sleep(1.0)
    before = rss_kib(pid)
    start = time.perf_counter()
    calls = [open_watch(i) for i in range(idle)]  # all at once, like a reconnect storm
    for call in calls:
        await call.read()  # the first heartbeat: the watch is live
    elapsed = time.perf_counter() - start
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    busy = cpu_seconds(pid, with_children=False)
    await asyncio.sleep(cpu_window)
    idle_cpu = (cpu_seconds(pid, with_children=False) - busy) / cpu_window * 100
    settled = rss_kib(pid)  # after a round of heartbeats and polls
    for call in warm + calls:
        call.cancel()
    print(
        f"  {idle} watches on {len(session_ids)} sessions opened in {elapsed:.1f}s; "
        f"server RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
        f"{settled / 1024:.1f} MiB after {cpu_window:.0f}s idle at {idle_cpu:.1f}% of a core"
    )
    return (max(after, settled) - before) / idle


@asynccontextmanager
async def serving(args: list[str]) -> AsyncIterator[tuple[int, str, list[grpc.aio.Channel]]]:
    """A server process (pid, target) and CHANNELS client connections to it."""
    proc, port = await start_server(args)
    target = f"127.0.0.1:{port}"
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    try:
        yield proc.pid, target, channels
    finally:
        for c in channels:
            await c.close()
        proc.terminate()
        await proc.wait()


async def idle_comparison(idle: int, sessions: int, cpu_window: float) -> dict[str, float]:
    """KiB of server RSS per idle watcher, chatsession and the bare grpc.aio stream."""
    print(f"idle watchers: {idle} on {sessions} sessions, 16 connections")
    figures: dict[str, float] = {}
    for name, args in (("bare grpc.aio stream (baseline)", BARE_SERVER), ("chatsession", SERVER)):
        async with serving(args) as (pid, target, channels):
            if args is SERVER:
                async with SessionClient(target, retry=NO_RETRY) as client:
                    ids = [(await client.create_session("idle")).session_id for _ in range(sessions)]
            else:
                ids = [f"s{i}" for i in range(sessions)]
            figures[name] = await idle_run(channels, pid, ids, idle, cpu_window)
        print(f"  {name}: {figures[name]:.1f} KiB per idle watcher")
    bare, ours = figures.values()
    print(f"  chatsession / bare = {ours / bare:.2f}; chatsession adds {ours - bare:.1f} KiB per watcher")
    return {"idle_watcher_kib": ours, "bare_stream_kib": bare}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, nargs="*", default=[1, 100, 1000])
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--idle-sessions", type=int, default=100)
    parser.add_argument("--idle-cpu-seconds", type=float, default=16.0, help="a heartbeat period and more")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CPUS)
    figures: dict[str, dict[str, float]] = {}
    if args.watchers:
        async with serving(SERVER) as (_, target, channels):
            for n in args.watchers:
                figures[f"watchers_{n}"] = await latency_run(target, channels, n, args.appends)
    if args.idle:
        figures["idle"] = await idle_comparison(args.idle, args.idle_sessions, args.idle_cpu_seconds)
    if args.json:
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
