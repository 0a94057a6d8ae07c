"""Scale-out benchmark: AppendMessages throughput on standalone Valkey (the baseline), on a
3-primary Valkey Cluster, and with 2 worker processes, in one run; plus Valkey memory per stored
message and ListSessions over thousands of expired index entries.

The servers run as separate processes (`python -m chatsession_server`), Valkey as its own
processes; the load comes from this process: 64 appends in flight over 8 HTTP/2 connections,
each in-flight slot on a session of its own. Configurations alternate in rounds and each figure
is the median of the rounds, shown with its ratio to standalone/1 worker of the same run. On 2
shared cores the load generator, the server and Valkey compete: read ratios, not absolutes.

    python bench/scale_bench.py                 # 3 rounds of 5 s
    python bench/scale_bench.py --rounds 1 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import LOAD_CPUS, ROOT, SERVER_CPUS, cpu_seconds, pin

from chatsession.v1 import session_pb2, session_service_pb2, session_service_pb2_grpc
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.embedded_cluster import EmbeddedCluster, command

CHANNELS = 8
IN_FLIGHT = 64


@dataclass(frozen=True)
class Config:
    name: str
    cluster: bool
    workers: int


CONFIGS = (
    Config("standalone, 1 worker", cluster=False, workers=1),
    Config("3-primary cluster, 1 worker", cluster=True, workers=1),
    Config("standalone, 2 workers", cluster=False, workers=2),
)


@dataclass
class Figures:
    rps: float
    p50_ms: float
    p99_ms: float
    server_cores: float
    valkey_cores: float
    loader_cores: float


@asynccontextmanager
async def server(url: str, config: Config) -> AsyncIterator[tuple[int, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSION_")}
    args = ["--listen", "127.0.0.1:0", "--valkey-url", url, "--workers", str(config.workers)]
    if config.cluster:
        args.append("--valkey-cluster")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", *args, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT
    )
    assert proc.stderr is not None
    ports: list[int] = []
    while len(ports) < config.workers:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        if not line:
            raise RuntimeError("server exited")
        if m := re.search(r"serving on [\d.]+:(\d+)", line):
            ports.append(int(m.group(1)))
    pin(proc.pid, SERVER_CPUS)  # the supervisor and its workers; Valkey and the load stay on theirs
    drain = asyncio.create_task(proc.stderr.read())  # a full pipe must never stall it
    try:
        yield ports[0], proc.pid
    finally:
        proc.terminate()
        await proc.wait()
        drain.cancel()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def append_load(port: int, seconds: float, server_pid: int, valkey_pids: list[int]) -> Figures:
    """One-message appends at IN_FLIGHT in flight: RPC/s, latency, and the cores each side used."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    stubs = [session_service_pb2_grpc.SessionServiceStub(c) for c in channels]
    try:
        sessions = []
        for i in range(IN_FLIGHT):
            reply = await stubs[i % CHANNELS].CreateSession(
                session_service_pb2.CreateSessionRequest(user_id=f"bench-{uuid.uuid4().hex[:8]}"), timeout=10
            )
            sessions.append(reply.session.session_id)
        message = session_pb2.Message(role=session_pb2.ROLE_USER, content="x" * 200, tokens=50)
        latencies: list[float] = []
        stop_at = 0.0
        measuring = False

        async def slot(i: int) -> None:
            stub = stubs[i % CHANNELS]
            request = session_service_pb2.AppendMessagesRequest(session_id=sessions[i], messages=[message])
            while time.monotonic() < stop_at:
                started = time.monotonic()
                await stub.AppendMessages(request, timeout=10)
                if measuring:
                    latencies.append(time.monotonic() - started)

        stop_at = time.monotonic() + 1.0 + seconds  # one second of warm-up, not counted
        tasks = [asyncio.create_task(slot(i)) for i in range(IN_FLIGHT)]
        await asyncio.sleep(1.0)
        measuring = True
        started = time.monotonic()
        cpu_before = (cpu_seconds(server_pid), sum(cpu_seconds(p) for p in valkey_pids), time.process_time())
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        cpu_after = (cpu_seconds(server_pid), sum(cpu_seconds(p) for p in valkey_pids), time.process_time())
        cores = [(b - a) / elapsed for a, b in zip(cpu_before, cpu_after, strict=True)]
        return Figures(
            len(latencies) / elapsed,
            percentile(latencies, 50) * 1e3,
            percentile(latencies, 99) * 1e3,
            *cores,
        )
    finally:
        for c in channels:
            await c.close()


async def throughput(
    rounds: int, seconds: float, configs: tuple[Config, ...] = CONFIGS
) -> dict[str, list[Figures]]:
    results: dict[str, list[Figures]] = {c.name: [] for c in configs}
    with contextlib.ExitStack() as stack:
        standalone = stack.enter_context(EmbeddedValkey())
        cluster = (
            stack.enter_context(EmbeddedCluster(primaries=3)) if any(c.cluster for c in configs) else None
        )
        for r in range(rounds):
            for config in configs:
                url = cluster.url if cluster and config.cluster else standalone.url
                nodes: list[Any] = cluster.primaries if cluster and config.cluster else [standalone]
                async with server(url, config) as (port, pid):
                    figures = await append_load(port, seconds, pid, [n.pid for n in nodes if n.pid])
                results[config.name].append(figures)
                print(f"  round {r + 1}: {config.name}: {figures.rps:,.0f} RPC/s", file=sys.stderr)
    return results


def used_memory(port: int) -> int:
    info = command("127.0.0.1", port, "INFO", "memory")
    return int(re.search(r"used_memory:(\d+)", info).group(1))  # type: ignore[union-attr]


async def bytes_per_message(count: int = 20_000, content: int = 200) -> tuple[float, float]:
    """Valkey memory per stored message (content of `content` bytes), and per empty session."""
    with EmbeddedValkey() as valkey:
        async with (
            server(valkey.url, CONFIGS[0]) as (port, _),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            stub = session_service_pb2_grpc.SessionServiceStub(ch)
            before = used_memory(valkey.port)
            sessions = [
                (
                    await stub.CreateSession(
                        session_service_pb2.CreateSessionRequest(user_id="mem"), timeout=10
                    )
                ).session.session_id
                for _ in range(100)
            ]
            after_sessions = used_memory(valkey.port)
            message = session_pb2.Message(role=session_pb2.ROLE_USER, content="x" * content, tokens=50)
            batch = [message] * 10
            for i in range(count // 10):
                await stub.AppendMessages(
                    session_service_pb2.AppendMessagesRequest(session_id=sessions[i % 100], messages=batch),
                    timeout=10,
                )
            after = used_memory(valkey.port)
    return (after - after_sessions) / count, (after_sessions - before) / 100


async def listing_over_expired(dead: int = 5000) -> tuple[float, float]:
    """ms for the first ListSessions page of a user whose index holds `dead` expired entries
    (then the next page, once they are pruned)."""
    with EmbeddedValkey() as valkey:
        async with (
            server(valkey.url, CONFIGS[0]) as (port, _),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            stub = session_service_pb2_grpc.SessionServiceStub(ch)
            for _ in range(10):
                await stub.CreateSession(
                    session_service_pb2.CreateSessionRequest(user_id="lister"), timeout=10
                )
            now = time.time()
            args = ["ZADD", "user_sessions:{lister}"]
            for i in range(dead):  # newer than the live ones: a listing meets them first
                args += [f"{now + 1 + i / 1000:.6f}", f"expired-{i}"]
            command("127.0.0.1", valkey.port, *args)
            request = session_service_pb2.ListSessionsRequest(user_id="lister", page_size=10)
            started = time.monotonic()
            first = await stub.ListSessions(request, timeout=30)
            first_ms = (time.monotonic() - started) * 1e3
            assert len(first.sessions) == 10, len(first.sessions)
            started = time.monotonic()
            await stub.ListSessions(request, timeout=30)
            again_ms = (time.monotonic() - started) * 1e3
    return first_ms, again_ms


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-cluster", action="store_true", help="standalone layouts only (1 vs 2 workers)")
    parser.add_argument("--memory-messages", type=int, default=20_000)
    parser.add_argument("--expired", type=int, default=5000, help="expired index entries (0: skip)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CPUS)
    configs = tuple(c for c in CONFIGS if not (args.no_cluster and c.cluster))
    shape = f"{IN_FLIGHT} in flight over {CHANNELS} connections, {args.rounds} x {args.seconds:g}s"
    print(f"AppendMessages, {shape}")
    results = await throughput(args.rounds, args.seconds, configs)
    base = statistics.median(r.rps for r in results[configs[0].name])
    print(
        f"{'configuration':30} {'RPC/s':>7} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'cores: server':>14} {'valkey':>7} {'load':>5}"
    )
    figures: dict[str, dict[str, float]] = {}
    for config in configs:
        rows = results[config.name]

        def median(pick: str, rows: list[Figures] = rows) -> float:
            return float(statistics.median(getattr(r, pick) for r in rows))

        figures[config.name] = {pick: median(pick) for pick in Figures.__dataclass_fields__}
        print(
            f"{config.name:30} {median('rps'):7,.0f} {median('rps') / base:6.2f} {median('p50_ms'):7.1f}"
            f" {median('p99_ms'):7.1f} {median('server_cores'):14.2f} {median('valkey_cores'):7.2f}"
            f" {median('loader_cores'):5.2f}"
        )
    per_message, per_session = await bytes_per_message(args.memory_messages)
    print(f"Valkey memory: {per_message:,.0f} B per stored message (200 B content),", end=" ")
    print(f"{per_session:,.0f} B per session")
    figures["memory"] = {"bytes_per_message": per_message, "bytes_per_session": per_session}
    if args.expired:
        first_ms, again_ms = await listing_over_expired(args.expired)
        print(
            f"ListSessions first page over {args.expired:,} expired entries: {first_ms:,.0f} ms "
            f"(then {again_ms:,.1f} ms)"
        )
        figures["expired_listing"] = {"first_ms": first_ms, "again_ms": again_ms}
    if args.json:
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
