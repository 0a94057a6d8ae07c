"""Hostile load, found in review: a request of many empty messages (well inside the 4 MiB limit)
used to make validation build two violations per message on the event loop (4 MiB: 30 s of CPU,
1.8 GB); requests without credentials used to be parsed before they were refused."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from chatsession.v1 import session_pb2
from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import SessionClient
from tests.processes import ServerProcess

MESSAGES = 400_000


async def start_server_process(*args: str) -> tuple[ServerProcess, int]:
    server = await ServerProcess.start("--listen", "127.0.0.1:0", *args)
    [serving] = await server.wait_for(r"serving on [\d.]+:(\d+)")
    return server, int(serving.group(1))


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


@pytest.mark.standalone_only
async def test_a_request_of_many_empty_messages_does_not_stall_the_server() -> None:
    server, port = await start_server_process()
    proc = server.proc
    try:
        target = f"127.0.0.1:{port}"
        async with SessionClient(target) as client:
            s = await client.create_session("u")
            before_mb = peak_rss_mb(proc.pid)
            entry = pb.AppendMessagesRequest(messages=[session_pb2.Message()]).SerializeToString()
            hostile = pb.AppendMessagesRequest(session_id=s.session_id).SerializeToString() + entry * MESSAGES
            async with grpc.aio.insecure_channel(target) as channel:
                raw_append: Any = channel.unary_unary("/chatsession.v1.SessionService/AppendMessages")
                call = asyncio.ensure_future(raw_append(hostile, timeout=120))
                await asyncio.sleep(0.5)  # the request is in the server by now
                started = time.monotonic()
                await client.get_session(s.session_id)
                waited = time.monotonic() - started
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
            grown_mb = peak_rss_mb(proc.pid) - before_mb
    finally:
        proc.send_signal(signal.SIGTERM)
        await server.exit_code(20)
    print(f"GetSession waited {waited:.1f} s; server peak RSS grew {grown_mb} MB")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert waited < 1.0, f"an unrelated GetSession waited {waited:.1f} s"
    assert grown_mb < 100, f"server peak RSS grew {grown_mb} MB"


@pytest.mark.standalone_only
async def test_an_unauthenticated_caller_cannot_make_the_server_parse_its_requests(tmp_path: Path) -> None:
    """AuthInterceptor authenticates inside the handler, after gRPC has deserialized the request:
    4 concurrent 4 MiB requests without a token took a server from 67 MB to 1018 MB peak RSS
    (2 of 2 MiB here). The metadata is in `handler_call_details` already: a handler that aborts
    with UNAUTHENTICATED and takes the request as bytes would never parse it."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-of-the-only-caller alice\n")
    server, port = await start_server_process("--auth-tokens-file", str(tokens))
    proc = server.proc
    try:
        before_mb = peak_rss_mb(proc.pid)
        entry = pb.AppendMessagesRequest(messages=[session_pb2.Message()]).SerializeToString()
        hostile = pb.AppendMessagesRequest(session_id="x").SerializeToString() + entry * 1_000_000
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw_append: Any = channel.unary_unary("/chatsession.v1.SessionService/AppendMessages")
            errors = await asyncio.gather(
                *(raw_append(hostile, timeout=60) for _ in range(2)), return_exceptions=True
            )
        grown_mb = peak_rss_mb(proc.pid) - before_mb
    finally:
        proc.send_signal(signal.SIGTERM)
        await server.exit_code(20)
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors)
    assert {e.code() for e in errors if isinstance(e, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.UNAUTHENTICATED
    }
    assert grown_mb < 50, f"server peak RSS grew {grown_mb} MB for two unauthenticated calls"
