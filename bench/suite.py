"""`make bench`: every figure of chatsession next to a baseline measured in the same run.

Starts its own Valkey, the chatsession server and the bare grpc.aio server
(bench/bare_stream_server.py) as separate processes; every load comes from a process of its own
(bench/load.py, and bench/watch_bench.py and bench/scale_bench.py for the watch, memory and
worker figures). Servers run on one core, Valkey and the load on the other (bench/common.py).
The unary figures are medians of interleaved rounds: each round measures chatsession and its
baselines one after the other, so a busy moment of the machine hits both; a ratio is the median
of the rounds' ratios. Prints one table and
writes every figure, its baseline and the ratio to bench/results.json.

    python bench/suite.py                      # a few minutes; ListSessions at 0 and 10k others
    python bench/suite.py --listing-100k       # also at 100k (the SCAN baseline takes ~20 s a call)
    python bench/suite.py --smoke              # seconds: every row once, tiny counts (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import LOAD_CPUS, ROOT, SERVER_CPUS, pin, placement

from chatsession.v1 import session_service_pb2, session_service_pb2_grpc
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.embedded_cluster import command

BENCH = ROOT / "bench"
CONTENT_BYTES = 200  # of every message the loads append (bench/load.py)


@dataclass
class Row:
    name: str
    unit: str
    value: float
    baseline_name: str
    baseline: float
    target: str  # the bound value/baseline must meet, as "<= 1.1", or "" when there is none
    higher_is_better: bool = False
    round_ratios: list[float] = field(default_factory=list)
    """value/baseline of each round, when both were measured in rounds: the ratio is their median
    (a busy moment of the machine hits a figure and the baseline next to it alike)"""

    @property
    def ratio(self) -> float:
        if self.round_ratios:
            return float(statistics.median(self.round_ratios))
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.ratio >= float(bound) if op == ">=" else self.ratio <= float(bound)


@contextmanager
def server_process(argv: list[str]) -> Iterator[tuple[int, int]]:
    """A server process on the server cores: (port, pid) once it says where it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSION_")}
    proc = subprocess.Popen([sys.executable, *argv], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stderr is not None
    drain: subprocess.Popen[bytes] | None = None
    try:
        for line in proc.stderr:
            if m := re.search(r"serving on [\d.]+:(\d+)", line):
                break
        else:
            raise RuntimeError(f"{argv[-1]} exited before serving")
        pin(proc.pid, SERVER_CPUS)
        # Its log is read and dropped from now on: a full pipe must never stall it.
        drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
        yield int(m.group(1)), proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        if drain is not None:
            drain.wait(10)


def measure(kind: str, args: argparse.Namespace, **options: Any) -> dict[str, Any]:
    """One bench/load.py run (a process of its own on the load cores)."""
    argv = [sys.executable, str(BENCH / "load.py"), kind, "--warmup", str(args.warmup)]
    options.setdefault("seconds", args.seconds)
    if kind in ("cookbook", "scan-listing"):
        argv.append("--as-server")  # application code against Valkey, where chatsession runs
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"load {kind} failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def sub_bench(script: str, argv: list[str]) -> dict[str, Any]:
    """watch_bench.py / scale_bench.py with --json: their output passes through, their figures return."""
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *argv, "--json"],
        stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    print("\n".join(f"  | {line}" for line in lines[:-1]), file=sys.stderr)
    figures: dict[str, Any] = json.loads(lines[-1])
    return figures


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rounds))


Plan = list[tuple[str, str, dict[str, Any]]]
"""Measurements of a round, in order: (name, bench/load.py kind, its options)."""


def interleaved(args: argparse.Namespace, plan: Plan, label: str) -> dict[str, list[dict[str, Any]]]:
    """`args.rounds` rounds of `plan`: each figure's runs, one a round, measured right next to the
    runs of its baseline."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for name, kind, options in plan:
            runs.setdefault(name, []).append(measure(kind, args, **options))
        print(f"  {label}round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {runs[name][-1]['rps']:,.0f}/s" for name, _, _ in plan
        ), file=sys.stderr)  # fmt: skip
    return runs


def paired_row(
    runs: dict[str, list[dict[str, Any]]], name: str, unit: str, ours: str, base: str, key: str,
    base_name: str, target: str = "",
) -> Row:  # fmt: skip
    """The median of `ours`' runs against the median of `base`'s, and the median of the rounds' ratios."""
    ratios = [a[key] / b[key] for a, b in zip(runs[ours], runs[base], strict=True) if b[key]]
    return Row(name, unit, median(runs[ours], key), base_name, median(runs[base], key), target,
               higher_is_better=key == "rps", round_ratios=ratios)  # fmt: skip


def unary_rounds(args: argparse.Namespace, url: str, cs: tuple[int, int], bare: tuple[int, int]) -> list[Row]:
    (cs_port, cs_pid), (bare_port, bare_pid) = cs, bare
    # Each figure is measured right next to its baseline.
    plan: Plan = [
        ("echo_1", "echo", {"port": bare_port, "cpu_pid": bare_pid}),
        ("append_1", "append", {"port": cs_port, "cpu_pid": cs_pid}),
        ("cookbook_1", "cookbook", {"valkey_url": url}),
        ("cookbook_10", "cookbook", {"valkey_url": url, "messages": 10}),
        ("append_10", "append", {"port": cs_port, "cpu_pid": cs_pid, "messages": 10}),
        ("append_64", "append", {"port": cs_port, "cpu_pid": cs_pid, "in_flight": 64}),
        ("echo_64", "echo", {"port": bare_port, "cpu_pid": bare_pid, "in_flight": 64}),
        ("script_1", "echo-script", {"port": bare_port, "cpu_pid": bare_pid}),
        ("script_64", "echo-script", {"port": bare_port, "cpu_pid": bare_pid, "in_flight": 64}),
        ("list_64", "list", {"port": cs_port, "cpu_pid": cs_pid, "in_flight": 64}),
        ("get_64", "get", {"port": cs_port, "cpu_pid": cs_pid, "in_flight": 64}),
    ]
    runs = interleaved(args, plan, "")

    def row(name: str, unit: str, ours: str, base: str, key: str, base_name: str, target: str) -> Row:
        return paired_row(runs, name, unit, ours, base, key, base_name, target)

    echo, cpu = "bare grpc.aio echo", "cpu_us_per_call"
    floor = "the echo after one GLIDE script call"
    return [
        row("AppendMessages 1 message, 1 in flight, p50", "µs", "append_1", "cookbook_1", "p50_us",
            "cookbook: 4 sequential GLIDE awaits", "<= 1.2"),
        row("AppendMessages 1 message, 1 in flight, p50 (vs echo)", "µs", "append_1", "echo_1", "p50_us",
            echo, ""),
        row("AppendMessages 10 messages, 1 in flight, p50", "µs", "append_10", "cookbook_10", "p50_us",
            "ten cookbook appends", "<= 0.15"),
        row("AppendMessages 64 in flight", "RPC/s", "append_64", "echo_64", "rps", echo, ">= 0.8"),
        row("AppendMessages 64 in flight, p99", "µs", "append_64", "echo_64", "p99_us", echo, "<= 1.5"),
        row("ListMessages(20) 64 in flight", "RPC/s", "list_64", "echo_64", "rps", echo, ""),
        row("GetSession 64 in flight", "RPC/s", "get_64", "echo_64", "rps", echo, ""),
        row("server CPU per AppendMessages", "µs", "append_64", "echo_64", cpu, echo, "<= 2"),
        row("server CPU per ListMessages(20)", "µs", "list_64", "echo_64", cpu, echo, "<= 2"),
        row("server CPU per GetSession", "µs", "get_64", "echo_64", cpu, echo, "<= 2"),
        # The floor: a call that reaches Valkey once through GLIDE, with no work of chatsession's.
        row("echo + one GLIDE script call, 1 in flight, p50", "µs", "script_1", "cookbook_1", "p50_us",
            "cookbook: 4 sequential GLIDE awaits", ""),
        row("server CPU per echo + one GLIDE script call", "µs", "script_64", "echo_64", cpu, echo, ""),
        row("server CPU per AppendMessages (vs the floor)", "µs", "append_64", "script_64", cpu, floor, ""),
    ]  # fmt: skip


async def lister_sessions(port: int, count: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        for _ in range(count):
            await stub.CreateSession(session_service_pb2.CreateSessionRequest(user_id="lister"), timeout=10)


def listing_rows(args: argparse.Namespace, url: str, cs_port: int) -> list[Row]:
    """ListSessions (the per-user index) against the cookbook's SCAN, as other users' sessions grow."""
    asyncio.run(lister_sessions(cs_port, 20))
    rows: list[Row] = []
    populated = 0
    first: float | None = None
    for others in args.listing:
        if others > populated:
            measure("populate", args, valkey_url=url, count=others - populated, tag=str(populated))
            populated = others
        ours = measure("list-sessions", args, port=cs_port)["p50_us"]
        scan = measure("scan-listing", args, valkey_url=url)["p50_us"]
        first = ours if first is None else first
        rows.append(Row(f"ListSessions(20) with {others:,} other sessions, p50", "µs", ours,
                        "cookbook SCAN listing", scan, ""))  # fmt: skip
    rows.append(Row(f"ListSessions flat: p50 at {args.listing[-1]:,} others", "µs", rows[-1].value,
                    f"p50 at {args.listing[0]:,} others", rows[0].value, "<= 1.5"))  # fmt: skip
    return rows


def watch_rows(args: argparse.Namespace) -> list[Row]:
    w = args.watchers
    figures = sub_bench("watch_bench.py", [
        "--watchers", str(w), "--appends", str(args.appends), "--idle", str(args.idle),
        "--idle-sessions", str(min(100, args.idle)), "--idle-cpu-seconds", str(args.idle_cpu_seconds),
    ])  # fmt: skip
    latency, idle = figures[f"watchers_{w}"], figures["idle"]
    return [
        Row(f"watch delivery p50 at {w} watchers", "ms", latency["delivery_p50_ms"],
            "AppendMessages round trip p50", latency["append_rtt_p50_ms"], "<= 1.5"),
        Row(f"idle watcher server RSS ({args.idle:,} watchers)", "KiB", idle["idle_watcher_kib"],
            "bare grpc.aio stream", idle["bare_stream_kib"], "<= 1.1"),
    ]  # fmt: skip


def agent_rows(args: argparse.Namespace, url: str, cs: tuple[int, int]) -> list[Row]:
    """An OpenAI Agents SDK turn (add the turn's 2 items, read the newest 20) through
    ChatsessionSession against the SDK's own RedisSession on the same Valkey, each from a load
    process of its own, in interleaved rounds."""
    port, pid = cs
    plan: Plan = [
        ("ours_1", "agent-turn", {"port": port, "cpu_pid": pid}),
        ("redis_1", "agent-turn-redis", {"valkey_url": url}),
        ("redis_16", "agent-turn-redis", {"valkey_url": url, "in_flight": 16}),
        ("ours_16", "agent-turn", {"port": port, "cpu_pid": pid, "in_flight": 16}),
    ]
    runs = interleaved(args, plan, "agent turns, ")

    def row(name: str, unit: str, ours: str, base: str, key: str) -> Row:
        return paired_row(runs, name, unit, ours, base, key, "openai-agents RedisSession, same Valkey")

    return [
        row("Agents SDK turn (add 2 items, read newest 20), ChatsessionSession, 1 in flight, p50", "µs",
            "ours_1", "redis_1", "p50_us"),
        row("Agents SDK turns, ChatsessionSession, 16 conversations in flight", "turns/s",
            "ours_16", "redis_16", "rps"),
    ]  # fmt: skip


def scale_rows(args: argparse.Namespace) -> list[Row]:
    figures = sub_bench("scale_bench.py", [
        "--no-cluster", "--rounds", str(args.rounds), "--seconds", str(args.seconds),
        "--memory-messages", str(args.memory_messages), "--expired", "0",
    ])  # fmt: skip
    one, two = figures["standalone, 1 worker"], figures["standalone, 2 workers"]
    return [
        Row("Valkey memory per stored message", "B", figures["memory"]["bytes_per_message"],
            f"its content ({CONTENT_BYTES} B)", CONTENT_BYTES, ""),
        Row("AppendMessages 64 in flight, 2 workers", "RPC/s", two["rps"],
            "1 worker", one["rps"], "", higher_is_better=True),
    ]  # fmt: skip


def print_table(rows: list[Row]) -> None:
    print(f"{'figure':58} {'value':>12} {'baseline':>12}  {'ratio':>6}  target  baseline is")
    for row in rows:
        met = {True: "met", False: "NOT met", None: ""}[row.met]
        value = f"{row.value:,.1f} {row.unit}"
        base = f"{row.baseline:,.1f}"
        target = f"{row.target} {met}".strip()
        print(f"{row.name:58} {value:>12} {base:>12}  {row.ratio:6.2f}  {target:14} {row.baseline_name}")


def machine() -> dict[str, Any]:
    model = ""
    for line in open("/proc/cpuinfo").read().splitlines():  # noqa: SIM115
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts, every row once; checks the JSON")
    parser.add_argument("--listing-100k", action="store_true", help="ListSessions at 100k other sessions too")
    parser.add_argument("--output", default=str(BENCH / "results.json"))
    parser.add_argument(
        "--note",
        default="",
        help="a remark for the results file (how quiet the machine was)",
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CPUS)  # Valkey started from here inherits it
    if args.smoke:
        args.rounds, args.seconds, args.warmup = 1, 0.3, 0.2
        args.listing = [0, 200]
        args.watchers, args.appends, args.idle, args.idle_cpu_seconds = 3, 5, 20, 0.5
        args.memory_messages = 100
        if args.output == str(BENCH / "results.json"):
            args.output = os.path.join(tempfile.mkdtemp(), "results.json")
    else:
        args.rounds, args.seconds, args.warmup = 5, 2.0, 1.0
        args.listing = [0, 10_000, 100_000] if args.listing_100k else [0, 10_000]
        args.watchers, args.appends, args.idle, args.idle_cpu_seconds = 100, 200, 2000, 5.0
        args.memory_messages = 20_000
    started, host = time.time(), machine()
    print(placement(), file=sys.stderr)
    rows: list[Row] = []
    with EmbeddedValkey() as valkey:
        server = ["-m", "chatsession_server", "--listen", "127.0.0.1:0", "--valkey-url", valkey.url]
        with (
            server_process(server) as cs,
            server_process([str(BENCH / "bare_stream_server.py"), "--valkey-url", valkey.url]) as bare,
        ):
            rows += unary_rounds(args, valkey.url, cs, bare)
            rows += agent_rows(args, valkey.url, cs)
            command("127.0.0.1", valkey.port, "FLUSHALL")
            rows += listing_rows(args, valkey.url, cs[0])
    rows += watch_rows(args)
    rows += scale_rows(args)
    print_table(rows)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": host,
        "placement": placement(),
        "smoke": args.smoke,
        "rounds": args.rounds,
        "seconds_per_measurement": args.seconds,
        "load_average_at_end": os.getloadavg(),
        "note": args.note,
        "rows": [{**asdict(row), "ratio": row.ratio, "met": row.met} for row in rows],
    }
    with open(args.output, "w") as out:
        json.dump(results, out, indent=2, ensure_ascii=False)
        out.write("\n")
    print(f"wrote {args.output} ({time.time() - started:.0f} s)", file=sys.stderr)
    if args.smoke:
        check(results, expected=13 + 2 + len(args.listing) + 1 + 2 + 2)


def check(results: dict[str, Any], expected: int) -> None:
    """The smoke run's assertion: every row there (13 unary, 2 agent turns, the listings and their
    flatness, 2 watch, 2 scale-out), each with a figure and a baseline."""
    rows = results["rows"]
    assert len(rows) == expected, f"{len(rows)} rows, expected {expected}"
    for row in rows:
        assert row["value"] > 0, row
        assert row["baseline"] > 0, row
    print(f"smoke: all {len(rows)} rows present", file=sys.stderr)


if __name__ == "__main__":
    main()
