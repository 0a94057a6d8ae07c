"""Values a caller chose cannot forge or flood the log: a session_id or request_id holding a newline
and a whole forged access line, escape sequences or U+2028 stays inside its own record (escaped),
in the text and the JSON format, refused requests included; one of 4 MiB adds a line of bounded
size. Read from a real server process's stderr, written by its own handler and formatters."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path

import grpc
import pytest

from chatsession.v1 import session_pb2, session_service_pb2_grpc
from chatsession.v1 import session_service_pb2 as pb
from chatsession_server.logs import MAX_LOGGED_CHARS, PIPE_BUF, JsonFormatter, TextFormatter, loggable
from tests.processes import ServerProcess

SERVING = r"serving on [\d.]+:(\d+)"
ACCESS = "chatsession_server.access"
FORGED = (
    "2026-12-07 01:09:00,000 INFO chatsession_server.access: /chatsession.v1.SessionService/GetSession "
    "code=OK duration_ms=1.0 session_id=victim"
)
HOSTILE_IDS = (
    f"x\n{FORGED}",
    f"x\r\n{FORGED}",
    f"x\u2028{FORGED}",
    "x\x1b[2J\x1b[31mred\t\\n",
    "x code=OK session_id=victim",
)
# Text records begin with their time and level: a line that does not is no record of its own.
TEXT_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
MIB = 1024 * 1024


async def started(log_format: str) -> tuple[ServerProcess, str]:
    server = await ServerProcess.start("--listen", "127.0.0.1:0", "--log-format", log_format)
    port = (await server.wait_for(SERVING))[0].group(1)
    return server, f"127.0.0.1:{port}"


async def stopped(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def refused(call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def hostile_calls(target: str) -> int:
    """Every hostile id as a session_id (GetSession) and as a request_id (AppendMessages), each
    refused; how many calls that was."""
    message = session_pb2.Message(role=session_pb2.ROLE_USER, content="hi")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        for hostile in HOSTILE_IDS:
            await refused(stub.GetSession(pb.GetSessionRequest(session_id=hostile)))
            await refused(
                stub.AppendMessages(
                    pb.AppendMessagesRequest(session_id="x", request_id=hostile, messages=[message])
                )
            )
    return 2 * len(HOSTILE_IDS)


def text_fields(line: str) -> dict[str, str]:
    """An access line's `key=value` fields, each key once (a repeated key fails the test)."""
    fields: dict[str, str] = {}
    for part in line.partition(f"{ACCESS}: ")[2].split(" ")[1:]:
        key, _, value = part.partition("=")
        assert key not in fields, line
        fields[key] = value
    return fields


@pytest.mark.standalone_only  # a server of its own with an embedded Valkey
async def test_a_forged_line_in_an_id_stays_escaped_in_its_own_text_record() -> None:
    server, target = await started("text")
    calls = await hostile_calls(target)
    await stopped(server)
    for line in server.lines:  # every line is a record: nothing began a line of its own
        assert TEXT_RECORD.match(line), line
        assert not {"\r", "\u2028", "\x1b"} & set(line), line
    access = [line for line in server.lines if f" {ACCESS}: " in line]
    assert len(access) == calls
    logged = [text_fields(line) for line in access]
    assert all(fields["code"] == "INVALID_ARGUMENT" for fields in logged)
    assert not [fields for fields in logged if fields.get("session_id") == "victim"]
    assert [f["session_id"] for f in logged[0::2]] == [loggable(h, spaces=False) for h in HOSTILE_IDS]
    assert [f["request_id"] for f in logged[1::2]] == [loggable(h, spaces=False) for h in HOSTILE_IDS]
    assert logged[0]["session_id"].startswith("x\\n2026-12-07\\x2001:09:00,000\\x20INFO")
    assert logged[6]["session_id"] == "x\\x1b[2J\\x1b[31mred\\t\\\\n"  # the caller's own backslash doubled


@pytest.mark.standalone_only
async def test_a_forged_line_in_an_id_stays_inside_its_own_json_record() -> None:
    server, target = await started("json")
    calls = await hostile_calls(target)
    await stopped(server)
    entries = [json.loads(line) for line in server.lines]  # every line is one JSON object
    access = [entry for entry in entries if entry["logger"] == ACCESS]
    assert len(access) == calls
    assert all(entry["code"] == "INVALID_ARGUMENT" for entry in access)
    assert [e["session_id"] for e in access[0::2]] == [loggable(h, spaces=False) for h in HOSTILE_IDS]
    assert [e["request_id"] for e in access[1::2]] == [loggable(h, spaces=False) for h in HOSTILE_IDS]
    assert not [line for line in server.lines if {"\r", "\u2028", "\x1b"} & set(line)]


@pytest.mark.standalone_only
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_an_id_of_4_mib_adds_a_line_of_bounded_size(log_format: str) -> None:
    """The largest a request may be (--max-request-bytes, 4 MiB): ten of them, as a session_id or
    a request_id, add ten lines of a few hundred bytes (each was 4 MB); a value of printable
    4-byte characters, cut at as many characters, still leaves an access line under PIPE_BUF."""
    server, target = await started(log_format)
    await server.wait_for(SERVING)
    before = len(server.lines)
    huge = "x" * (4 * MIB - 64)
    wide = "\U0001d11e" * (MIB - 64)  # 4 bytes each in UTF-8
    message = session_pb2.Message(role=session_pb2.ROLE_USER, content="hi")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        for i in range(5):
            await refused(stub.GetSession(pb.GetSessionRequest(session_id=huge if i % 2 else wide)))
            append = pb.AppendMessagesRequest(
                session_id="x", request_id=wide if i % 2 else huge, messages=[message]
            )
            await refused(stub.AppendMessages(append))
    await stopped(server)
    added = [line for line in server.lines[before:] if ACCESS in line]
    assert len(added) == 10
    sizes = [len(line.encode()) + 1 for line in added]
    assert max(sizes) < PIPE_BUF
    assert sum(sizes) < 10 * 1024, sizes
    assert f"...[cut:{len(huge)}chars]" in added[1]  # the request_id of the first append
    assert "x" * MAX_LOGGED_CHARS in added[1]
    assert f"{wide[:MAX_LOGGED_CHARS]}...[cut:{len(wide)}chars]" in added[0]  # printable: shown, not escaped


@pytest.mark.parametrize("formatter", [TextFormatter("%(levelname)s %(name)s: %(message)s"), JsonFormatter()])
def test_any_record_quoting_an_unescaped_value_stays_one_line(formatter: logging.Formatter) -> None:
    """The formatters' own guard, for a value some log call did not pass through loggable()."""
    record = logging.LogRecord(
        "chatsession_server.store", logging.WARNING, "", 0, "session %s: %s", ("a\nb", "\x1b\u2028"), None
    )
    line = formatter.format(record)
    assert line.splitlines() == [line]
    message = json.loads(line)["message"] if isinstance(formatter, JsonFormatter) else line
    assert "session a\\nb: \\x1b\\u2028" in message


@pytest.mark.standalone_only
async def test_an_unknown_methods_path_is_logged_escaped_and_cut(tmp_path: Path) -> None:
    """With auth on, a call to any method is refused (and logged) before gRPC looks for it: its
    path, the caller's to choose, is a logged value like the ids."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-7Hq2LmZ0pX9vR4sW alice\n")
    server = await ServerProcess.start("--listen", "127.0.0.1:0", "--auth-tokens-file", str(tokens))
    port = (await server.wait_for(SERVING))[0].group(1)
    path = "/evil.Service/" + "\x1b[2J" + "m" * 4_000  # within gRPC's 8 KiB of headers
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(b"", timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await server.wait_for("UNAUTHENTICATED")
    await stopped(server)
    (line,) = [line for line in server.lines if f" {ACCESS}: " in line]
    assert TEXT_RECORD.match(line)
    assert "\x1b" not in line
    assert f" {ACCESS}: {loggable(path, spaces=False)} code=UNAUTHENTICATED " in line
    assert len(line.encode()) < 1024


@pytest.mark.standalone_only
async def test_a_traceparent_trace_id_cannot_bring_spaces_into_the_access_line() -> None:
    server, target = await started("text")
    # 32 characters int(_, 16) accepts: leading/trailing whitespace is allowed by int().
    forged = " " * 2 + "0x" + "a_" * 13 + "a" + " " * 1
    assert len(forged) == 32
    assert int(forged, 16)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetSession(
                pb.GetSessionRequest(session_id="nope"),
                metadata=(("traceparent", f"00-{forged}-00f067aa0ba902b7-01"),),
            )
    await stopped(server)
    (line,) = [line for line in server.lines if f" {ACCESS}: " in line]
    # the trace_id, if logged at all, is 32 hex digits ending the line: no bare tokens beside it
    assert re.search(r" trace_id=[0-9a-f]{32}$", line) or " trace_id=" not in line, line
