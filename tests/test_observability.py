"""What the server tells its operators: logs (JSON or text lines, one access-log line per call,
never a token or a message's content; access lines written in whole-line batches, in order), and
OpenTelemetry (Prometheus text at /metrics, per worker too; the caller's trace continued into
server spans)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import random
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from glide import GlideClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import (
    NO_RETRY,
    InvalidArgumentError,
    NotFoundError,
    SessionClient,
    UnavailableError,
    user,
)
from chatsession_server.api.telemetry import Telemetry
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.logs import PIPE_BUF, AccessBatchingHandler
from chatsession_server.settings import Settings, ValkeyAddress
from chatsession_server.store import keys
from tests.helpers import eventually, raises, serving
from tests.processes import ServerProcess

SERVICE = "chatsession.v1.SessionService"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def metrics_text(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            text: str = reply.read().decode()
            return text

    return await asyncio.to_thread(get)


async def scrape(running: RunningServer) -> Samples:
    """Every sample of /metrics, by name and labels (the scope labels left out)."""
    assert running.telemetry is not None
    assert running.telemetry.metrics_port is not None
    samples: Samples = {}
    for family in text_string_to_metric_families(await metrics_text(running.telemetry.metrics_port)):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))
            samples[(sample.name, labels)] = sample.value
    return samples


def calls(samples: Samples, method: str, code: str) -> float:
    labels = frozenset(
        {
            ("rpc_system", "grpc"),
            ("rpc_service", SERVICE),
            ("rpc_method", method),
            ("rpc_response_status_code", code),
        }
    )
    return samples.get(("rpc_server_call_duration_seconds_count", labels), 0.0)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
async def metered(settings: Settings, valkey_url: str) -> AsyncIterator[RunningServer]:
    async with serving(settings, valkey_url, metrics_listen="127.0.0.1:0", watch_poll_seconds=0.1) as running:
        yield running


async def test_off_by_default(server: RunningServer) -> None:
    assert server.telemetry is None


async def test_metrics_count_calls_by_method_and_code(metered: RunningServer, uid: str) -> None:
    async with SessionClient(f"127.0.0.1:{metered.port}") as client:
        session = await client.create_session("alice", session_id=uid)
        for _ in range(3):
            await client.get_session(session.session_id)
        for _ in range(2):
            await raises(NotFoundError, client.get_session(f"{uid}-missing"))
        await raises(InvalidArgumentError, client.append(uid, [user("")]))
    samples = await scrape(metered)
    assert calls(samples, "CreateSession", "OK") == 1
    assert calls(samples, "GetSession", "OK") == 3
    assert calls(samples, "GetSession", "NOT_FOUND") == 2
    assert calls(samples, "AppendMessages", "INVALID_ARGUMENT") == 1
    assert calls(samples, "AppendMessages", "OK") == 0
    # A latency histogram: cumulative buckets ending in +Inf with every call.
    labels = {
        "rpc_system": "grpc",
        "rpc_service": SERVICE,
        "rpc_method": "GetSession",
        "rpc_response_status_code": "OK",
    }
    assert value(samples, "rpc_server_call_duration_seconds_bucket", **labels, le="+Inf") == 3
    assert value(samples, "rpc_server_call_duration_seconds_sum", **labels) > 0
    assert value(samples, "chatsession_valkey_up") == 1


async def test_watch_gauges_and_resyncs(metered: RunningServer, raw: GlideClient, uid: str) -> None:
    """A watcher is counted while open; appends pub/sub never announced (here: message_count
    raised behind the server's back) are found by the poll and counted as a resync."""
    async with SessionClient(f"127.0.0.1:{metered.port}") as client:
        await client.create_session("alice", session_id=uid)
        seen: asyncio.Queue[int] = asyncio.Queue()

        async def watch() -> None:
            async for event in client.watch(uid, after_seq=0, include_heartbeats=True):
                # The first heartbeat says the watch is live (subscribed): 0 stands for it.
                await seen.put(event.message.seq if event.HasField("message") else 0)

        watcher = asyncio.create_task(watch())
        try:
            assert await asyncio.wait_for(seen.get(), 10) == 0
            await client.append(uid, [user("one")])
            assert await asyncio.wait_for(seen.get(), 10) == 1  # heard through pub/sub
            samples = await scrape(metered)
            assert value(samples, "chatsession_watchers") == 1
            assert value(samples, "chatsession_watch_subscriptions") == 1
            resyncs_before = value(samples, "chatsession_watch_resyncs_total")
            await raw.hincrby(keys.KeySpace().meta(uid), "message_count", 1)

            async def resynced() -> bool:
                nonlocal samples
                samples = await scrape(metered)
                return value(samples, "chatsession_watch_resyncs_total") > resyncs_before

            await eventually(resynced)
            assert value(samples, "chatsession_watch_resyncs_total") == resyncs_before + 1
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

        async def no_watcher() -> bool:  # the stream ends on the server shortly after the client cancels
            return value(await scrape(metered), "chatsession_watchers") == 0

        await eventually(no_watcher)
        samples = await scrape(metered)
        assert value(samples, "chatsession_watchers") == 0
        assert calls(samples, "WatchMessages", "CANCELLED") == 1


@pytest.mark.standalone_only
async def test_valkey_errors_and_state() -> None:
    with EmbeddedValkey() as valkey:
        settings = Settings(
            listen="127.0.0.1:0",
            valkey_timeout_ms=500,
            valkey_connect_timeout_ms=500,
            metrics_listen="127.0.0.1:0",
        )
        running = await start_server(settings, ValkeyAddress.parse(valkey.url))
        try:
            async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client:
                await client.create_session("alice", session_id="before")
                valkey.kill()
                for _ in range(3):
                    await raises(UnavailableError, client.get_session("before"))
            samples = await scrape(running)
            assert value(samples, "chatsession_valkey_up") == 0
            assert value(samples, "chatsession_valkey_errors_total", error_type="unavailable") == 3
            assert calls(samples, "GetSession", "UNAVAILABLE") == 3
        finally:
            await running.stop(0.5)


async def test_traceparent_continues_into_server_spans(settings: Settings, valkey_url: str, uid: str) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    running = await start_server(
        dataclasses.replace(settings, listen="127.0.0.1:0"),
        ValkeyAddress.parse(valkey_url),
        telemetry=Telemetry(tracer_provider=tracer_provider),
    )
    metadata = (("traceparent", TRACEPARENT),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            await stub.CreateSession(
                pb.CreateSessionRequest(user_id="alice", session_id=uid), metadata=metadata
            )
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetSession(pb.GetSessionRequest(session_id=f"{uid}-missing"), metadata=metadata)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            # A stream under the tracing interceptor: its events still flow, its span ends with it.
            watch = stub.WatchMessages(
                pb.WatchMessagesRequest(session_id=uid, after_seq=0), metadata=metadata
            )
            first = await watch.read()
            assert isinstance(first, pb.WatchMessagesResponse)
            assert first.HasField("heartbeat")
            watch.cancel()
            await stub.GetSession(pb.GetSessionRequest(session_id=uid))  # no traceparent: a trace of its own
    finally:
        await running.stop(1.0)
    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name.rpartition("/")[2], []).append(span)
    create, watched = spans["CreateSession"][0], spans["WatchMessages"][0]
    missing_span, own = spans["GetSession"]
    for span in (create, missing_span, watched):
        assert span.context is not None
        assert span.parent is not None
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert f"{span.parent.span_id:016x}" == PARENT_SPAN_ID
        assert span.parent.is_remote
    assert own.context is not None
    assert f"{own.context.trace_id:032x}" != TRACE_ID
    assert own.parent is None
    assert create.attributes is not None
    assert create.attributes["rpc.grpc.status_code"] == 0
    # NOT_FOUND is the caller's mistake: the code is on the span, which is not an error.
    assert missing_span.attributes is not None
    assert missing_span.attributes["rpc.grpc.status_code"] == 5
    assert missing_span.status.status_code != StatusCode.ERROR
    assert create.attributes["rpc.method"] == "CreateSession"


async def test_metrics_address_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = await ServerProcess.start("--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}")
        assert await server.exit_code() == 1
    refusal = f"cannot listen on 127.0.0.1:{port} for metrics: Address already in use"
    assert [line for line in server.lines if line.endswith(refusal)], server.text
    assert "Traceback" not in server.text


def _two_free_ports() -> int:
    """A port P with P+1 free too, below the ephemeral range: a port the kernel hands out for
    outgoing connections (as bind(0) does) may be taken by one before a worker binds P+1."""
    low, _ = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(100):
        base = random.randrange(max(1024, low - 12_000), low - 2)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", base))
                second.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.standalone_only
async def test_each_worker_serves_its_own_metrics() -> None:
    """Workers share the gRPC port but not the metrics one: worker N serves at PORT+N-1."""
    base = _two_free_ports()
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--workers", "2", "--metrics-listen", f"127.0.0.1:{base}"
    )
    try:
        announced = await server.wait_for(
            r"\[worker (\d) pid \d+\] .*metrics at http://127\.0\.0\.1:(\d+)/metrics", count=2
        )
        assert {m.group(1): int(m.group(2)) for m in announced} == {"1": base, "2": base + 1}
        await server.wait_for(r"\[worker \d pid \d+\] .*serving on", count=2)
        for port in (base, base + 1):
            assert "\nchatsession_valkey_up{" in await metrics_text(port)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code() == 0


def test_the_per_worker_metrics_test_runs_in_the_standalone_pass_only() -> None:
    """It starts a supervisor with an embedded Valkey of its own: the cluster pass would only run it
    again. A marker put on the wrong function (a helper above the test) fails nothing else."""
    marks = getattr(test_each_worker_serves_its_own_metrics, "pytestmark", [])
    assert "standalone_only" in [mark.name for mark in marks]


# -- logs

SERVING = r"serving on [\d.]+:(\d+)"
TOKEN = "tok-7Hq2LmZ0pX9vR4sW"
CONTENT = "the secret plan: meet at the old mill"
LOGGED_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ACCESS = "chatsession_server.access"


async def stopped(server: ServerProcess) -> str:
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    return server.text


@pytest.mark.standalone_only  # a server of its own with an embedded Valkey
async def test_json_access_log(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice,carol\n")
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--log-format", "json", "--auth-tokens-file", str(tokens)
    )
    port = (await server.wait_for(SERVING))[0].group(1)
    target = f"127.0.0.1:{port}"
    async with SessionClient(target, token=TOKEN, retry=NO_RETRY) as client:
        session = await client.create_session("alice", session_id="alice/logged")
        await client.append("alice/logged", [user(CONTENT, tokens=9)], request_id="turn-1")
        await raises(NotFoundError, client.get_session("absent"))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        traced = (
            ("authorization", f"Bearer {TOKEN}"),
            ("traceparent", f"00-{LOGGED_TRACE_ID}-00f067aa0ba902b7-01"),
        )
        watch = stub.WatchMessages(
            pb.WatchMessagesRequest(session_id="alice/logged", after_seq=0), metadata=traced
        )
        assert isinstance(await watch.read(), pb.WatchMessagesResponse)  # the heartbeat
        # A stream is logged when it ends, not before: a call made after it began is logged (and
        # access lines are written in order), the open stream is not.
        await stub.ListSessions(pb.ListSessionsRequest(user_id="alice"), metadata=traced)
        await server.wait_for("ListSessions OK")
        assert not [line for line in server.lines if "WatchMessages" in line]
        watch.cancel()
        wrong = (("authorization", "Bearer not-the-token-at-all-123"),)
        with pytest.raises(grpc.aio.AioRpcError) as unknown_token:
            await stub.GetSession(pb.GetSessionRequest(session_id="alice/logged"), metadata=wrong)
        assert unknown_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await server.wait_for("GetSession UNAUTHENTICATED")
    text = await stopped(server)

    entries = [json.loads(line) for line in server.lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    access = [e for e in entries if e["logger"] == ACCESS]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for entry in access:
        by_method.setdefault(entry["method"].rpartition("/")[2], []).append(entry)
    (create,) = by_method["CreateSession"]
    assert create["code"] == "OK"
    assert create["session_id"] == session.session_id
    assert create["user"] == "alice,carol"  # whom the caller may act for, never its token
    assert create["peer"].startswith("ipv4:127.0.0.1:")
    assert create["duration_ms"] > 0
    (append,) = by_method["AppendMessages"]
    assert (append["code"], append["session_id"], append["request_id"]) == ("OK", "alice/logged", "turn-1")
    found, refused = by_method["GetSession"]
    assert (found["code"], found["session_id"]) == ("NOT_FOUND", "absent")
    assert (refused["code"], refused["user"]) == ("UNAUTHENTICATED", "")
    (watched,) = by_method["WatchMessages"]  # one line, when the stream ended
    assert (watched["code"], watched["trace_id"]) == ("CANCELLED", LOGGED_TRACE_ID)
    assert set(access[0]) == {
        "time", "level", "logger", "message", "method", "code", "duration_ms",
        "session_id", "request_id", "peer", "user", "trace_id",
    }  # fmt: skip
    assert CONTENT not in text
    assert TOKEN not in text
    assert "not-the-token-at-all" not in text


@pytest.mark.standalone_only  # a server of its own with an embedded Valkey
async def test_text_lines_and_access_log_off() -> None:
    for flags, logged in ((["--access-log", "false"], False), ([], True)):
        server = await ServerProcess.start("--listen", "127.0.0.1:0", *flags)
        port = (await server.wait_for(SERVING))[0].group(1)
        async with SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            await raises(NotFoundError, client.get_session("absent"))
        await stopped(server)
        lines = [line for line in server.lines if ACCESS in line]
        if logged:
            (line,) = lines
            assert " INFO chatsession_server.access: /chatsession.v1.SessionService/GetSession" in line
            assert "code=NOT_FOUND" in line
            assert "session_id=absent" in line
        else:
            assert lines == [], lines
        assert not [line for line in server.lines if line.startswith("{")]  # text, not JSON


# -- access lines held and written in batches


class Writes(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def record(message: str, *, access: bool) -> logging.LogRecord:
    name = "chatsession_server.access" if access else "chatsession_server.app"
    made = logging.LogRecord(name, logging.INFO, "", 0, message, (), None)
    if access:
        made.access = {"method": "m", "code": "OK"}
    return made


def test_access_lines_are_held_then_written_in_order_before_any_other_record() -> None:
    stream = Writes()
    handler = AccessBatchingHandler(stream)
    try:
        for i in range(3):
            handler.emit(record(f"call {i}", access=True))
        assert stream.writes == []  # held
        handler.emit(record("serving", access=False))
        assert stream.getvalue() == "call 0\ncall 1\ncall 2\nserving\n"
        assert len(stream.writes) == 1
    finally:
        handler.close()


async def test_held_lines_go_out_within_the_flush_window_and_at_close() -> None:
    stream = Writes()
    handler = AccessBatchingHandler(stream)
    handler.emit(record("late", access=True))

    def written() -> bool:
        return stream.getvalue() != ""

    await eventually(written, 5)
    assert stream.getvalue() == "late\n"
    handler.emit(record("last", access=True))
    handler.close()
    assert stream.getvalue() == "late\nlast\n"


def test_a_batch_is_written_in_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    stream = Writes()
    handler = AccessBatchingHandler(stream)
    try:
        lines = [f"{i:04d} " + "é" * 300 for i in range(40)]  # 605 bytes each, with the newline
        for line in lines:
            handler.emit(record(line, access=True))
        handler.flush()
    finally:
        handler.close()
    assert "".join(stream.writes) == "".join(f"{line}\n" for line in lines)
    assert len(stream.writes) > 1
    for write in stream.writes:
        assert write.endswith("\n")
        assert len(write.encode()) <= PIPE_BUF
