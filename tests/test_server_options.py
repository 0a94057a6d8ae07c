"""gRPC server options as settings: keepalive, concurrent streams, compression, observability."""

from __future__ import annotations

import grpc
import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_server.app import grpc_options
from chatsession_server.memory import malloc_trim
from chatsession_server.settings import Settings
from tests.helpers import serving


def test_flags_and_environment() -> None:
    env = {
        "CHATSESSION_KEEPALIVE_TIME_MS": "20000",
        "CHATSESSION_ACCESS_LOG": "false",
        "CHATSESSION_LOG_FORMAT": "json",
        "CHATSESSION_METRICS_LISTEN": "0.0.0.0:9464",
    }
    s = Settings.from_sources(
        [
            "--keepalive-timeout-ms", "5000",
            "--keepalive-permit-without-calls", "false",
            "--keepalive-min-ping-interval-ms", "2500",
            "--max-concurrent-streams", "100",
            "--compression-algorithms", "gzip",
            "--default-compression", "gzip",
            "--otlp-endpoint", "http://collector:4317",
        ],
        env,
    )  # fmt: skip
    assert (s.keepalive_time_ms, s.keepalive_timeout_ms, s.keepalive_min_ping_interval_ms) == (
        20000,
        5000,
        2500,
    )
    assert s.keepalive_permit_without_calls is False
    assert s.max_concurrent_streams == 100
    assert s.accepted_compression == ("identity", "gzip")
    assert s.default_compression == "gzip"
    assert (s.access_log, s.log_format) == (False, "json")
    assert (s.metrics_listen, s.otlp_endpoint) == ("0.0.0.0:9464", "http://collector:4317")
    options = dict(grpc_options(s))
    assert options["grpc.keepalive_time_ms"] == 20000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2500
    assert options["grpc.max_concurrent_streams"] == 100
    assert options["grpc.compression_enabled_algorithms_bitset"] == 0b101  # identity and gzip
    defaults = dict(grpc_options(Settings()))
    assert "grpc.max_concurrent_streams" not in defaults  # gRPC's own default
    # No bandwidth probing by default: a call refused before it is read takes in 64 KiB at most.
    assert defaults["grpc.http2.bdp_probe"] == 0
    assert "grpc.http2.bdp_probe" not in dict(grpc_options(Settings(http2_bdp_probe=True)))
    assert Settings().memory_trim_seconds == 10.0
    assert Settings.from_sources(["--memory-trim-seconds", "0"], {}).memory_trim_seconds == 0
    assert defaults["grpc.compression_enabled_algorithms_bitset"] == 0b111
    assert Settings.from_sources(["--access-log"], {}).access_log is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log-format", "yaml"], "log_format must be one of text, json, got 'yaml'"),
        (["--metrics-listen", "9464"], "metrics_listen must be HOST:PORT, got '9464'"),
        (["--keepalive-time-ms", "0"], "keepalive_time_ms must be positive"),
        (["--max-concurrent-streams", "-1"], "max_concurrent_streams must not be negative"),
        (["--memory-trim-seconds", "-1"], "memory_trim_seconds must not be negative"),
        (["--compression-algorithms", "gzip,zstd"], "compression_algorithms: unknown zstd"),
        (
            ["--compression-algorithms", "identity", "--default-compression", "gzip"],
            "default_compression must be one of compression_algorithms, got 'gzip'",
        ),
        (["--access-log", "maybe"], "argument --access-log: invalid"),
    ],
)
def test_bad_values_are_one_line(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        Settings.from_sources(flags, {})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


async def call_with(target: str, compression: grpc.Compression, uid: str) -> pb.CreateSessionResponse:
    async with grpc.aio.insecure_channel(target, compression=compression) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        reply: pb.CreateSessionResponse = await stub.CreateSession(
            pb.CreateSessionRequest(user_id="alice", session_id=uid, title="x" * 1000)
        )
        return reply


async def test_server_starts_with_the_options_and_takes_gzip(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with serving(
        settings,
        valkey_url,
        keepalive_time_ms=5000,
        keepalive_timeout_ms=2000,
        keepalive_permit_without_calls=False,
        keepalive_min_ping_interval_ms=1000,
        max_concurrent_streams=16,
        default_compression="gzip",
    ) as running:
        target = f"127.0.0.1:{running.port}"
        reply = await call_with(target, grpc.Compression.Gzip, f"{uid}-gzip")
        assert reply.session.title == "x" * 1000
        reply = await call_with(target, grpc.Compression.NoCompression, f"{uid}-plain")
        assert reply.session.session_id == f"{uid}-plain"


async def test_compression_not_accepted_is_refused(settings: Settings, valkey_url: str, uid: str) -> None:
    async with serving(settings, valkey_url, compression_algorithms="identity") as running:
        target = f"127.0.0.1:{running.port}"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call_with(target, grpc.Compression.Gzip, f"{uid}-gzip")
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reply = await call_with(target, grpc.Compression.NoCompression, f"{uid}-plain")
        assert reply.session.session_id == f"{uid}-plain"


def test_memory_trim_hands_freed_memory_back() -> None:
    # glibc (this suite's platform): malloc_trim is found and returns 1 once there is freed memory
    # to give back, as after a burst of large buffers.
    trim = malloc_trim()
    assert trim is not None
    burst = [bytearray(64 * 1024) for _ in range(2000)]  # below the mmap threshold: arena memory
    del burst
    assert trim() == 1
