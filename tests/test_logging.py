"""Logs: JSON or text lines, one access-log line per call, never a token or a message's content."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import NO_RETRY, NotFoundError, SessionClient, user
from tests.helpers import raises
from tests.processes import ServerProcess

SERVING = r"serving on [\d.]+:(\d+)"
TOKEN = "tok-7Hq2LmZ0pX9vR4sW"
CONTENT = "the secret plan: meet at the old mill"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ACCESS = "chatsession_server.access"

# Servers of their own with an embedded Valkey: the cluster pass has nothing to add.
pytestmark = pytest.mark.standalone_only


async def stopped(server: ServerProcess) -> str:
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    return server.text


async def test_json_access_log(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice,carol\n")
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--log-format", "json", "--auth-tokens-file", str(tokens)
    )
    port = (await server.wait_for(SERVING))[0].group(1)
    target = f"127.0.0.1:{port}"
    async with SessionClient(target, token=TOKEN, retry=NO_RETRY) as client:
        session = await client.create_session("alice", session_id="logged")
        await client.append("logged", [user(CONTENT, tokens=9)], request_id="turn-1")
        await raises(NotFoundError, client.get_session("absent"))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        traced = (("authorization", f"Bearer {TOKEN}"), ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"))
        watch = stub.WatchMessages(pb.WatchMessagesRequest(session_id="logged", after_seq=0), metadata=traced)
        assert isinstance(await watch.read(), pb.WatchMessagesResponse)  # the heartbeat
        await asyncio.sleep(0.2)  # a stream is logged when it ends, not before
        assert not [line for line in server.lines if "WatchMessages" in line]
        watch.cancel()
        wrong = (("authorization", "Bearer not-the-token-at-all-123"),)
        with pytest.raises(grpc.aio.AioRpcError) as unknown_token:
            await stub.GetSession(pb.GetSessionRequest(session_id="logged"), metadata=wrong)
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
    assert (append["code"], append["session_id"], append["request_id"]) == ("OK", "logged", "turn-1")
    found, refused = by_method["GetSession"]
    assert (found["code"], found["session_id"]) == ("NOT_FOUND", "absent")
    assert (refused["code"], refused["user"]) == ("UNAUTHENTICATED", "")
    (watched,) = by_method["WatchMessages"]  # one line, when the stream ended
    assert (watched["code"], watched["trace_id"]) == ("CANCELLED", TRACE_ID)
    assert set(access[0]) == {
        "time", "level", "logger", "message", "method", "code", "duration_ms",
        "session_id", "request_id", "peer", "user", "trace_id",
    }  # fmt: skip
    assert CONTENT not in text
    assert TOKEN not in text
    assert "not-the-token-at-all" not in text


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
