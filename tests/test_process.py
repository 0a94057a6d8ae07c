"""The real `python -m chatsession_server` process: embedded Valkey, SIGTERM drain, no orphans,
one-line start-up errors, waiting for Valkey at start."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatsession.v1 import session_service_pb2, session_service_pb2_grpc
from chatsession_client import NO_RETRY, SessionClient, UnavailableError, user
from chatsession_server.embedded import EmbeddedValkey, free_port
from tests.helpers import raises
from tests.processes import ServerProcess, alive, gone, processes_mentioning

SERVICE = "chatsession.v1.SessionService"
VALKEY_PID = r"valkey-server started on \S+ \(pid (\d+)\)"
SERVING = r"serving on [\d.]+:(\d+)"

# Each test runs a standalone Valkey of its own (or none): the cluster pass has nothing to add.
pytestmark = pytest.mark.standalone_only


async def start_serving(*args: str) -> tuple[ServerProcess, int, int]:
    """A server with an embedded Valkey on a free port: it, its gRPC port and its Valkey's pid."""
    server = await ServerProcess.start("--listen", "127.0.0.1:0", *args)
    valkey_pid = int((await server.wait_for(VALKEY_PID))[0].group(1))
    port = int((await server.wait_for(SERVING))[0].group(1))
    return server, port, valkey_pid


async def watch_status(port: int) -> grpc.StatusCode:
    """How a WatchMessages stream ends (the streaming call has its own handler kind)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        call = stub.WatchMessages(session_service_pb2.WatchMessagesRequest(session_id="s"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in call:
                pass
        return ended.value.code()


def error_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.lines if line.strip()]


async def health_status(port: int) -> list[int]:
    """The health of the server as a whole and of SessionService."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return [
            (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status for name in ("", SERVICE)
        ]


async def test_sigterm_drains_and_stops_embedded_valkey() -> None:
    server, port, valkey_pid = await start_serving()
    assert alive(valkey_pid)
    async with SessionClient(f"127.0.0.1:{port}") as client:
        s = await client.create_session("u")
        await client.append(s.session_id, [user("hello")])
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_code(20) == 0
    assert not alive(valkey_pid)


async def test_sigkill_of_the_server_leaves_no_orphan_valkey() -> None:
    server, _, valkey_pid = await start_serving()
    assert alive(valkey_pid)
    await server.kill()
    assert await gone(valkey_pid, timeout=5)


async def test_bad_flag_fails_fast_with_a_message() -> None:
    server = await ServerProcess.start("--valkey-url", "http://nope")
    assert await server.exit_code() == 2
    assert "valkey://" in server.text
    assert len(error_lines(server)) == 1


async def test_a_second_server_on_a_busy_port_fails_in_one_line(tmp_path: Path) -> None:
    """gRPC's default SO_REUSEPORT once let a second server share the port (and half the calls
    reached the wrong Valkey). Now it stops at once, before starting an embedded Valkey."""
    first, port, _ = await start_serving()
    try:
        for extra in ((), ("--workers", "2")):
            # A private TMPDIR: an embedded Valkey of the second would show it in its command line.
            second = await ServerProcess.start(
                "--listen", f"127.0.0.1:{port}", *extra, env={"TMPDIR": str(tmp_path)}
            )
            assert await second.exit_code(20) == 1
            [line] = error_lines(second)
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line
            assert processes_mentioning(str(tmp_path)) == []
            assert os.listdir(tmp_path) == []
        # The first one is untouched.
        async with SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            await client.create_session("u")
    finally:
        first.proc.send_signal(signal.SIGTERM)
        assert await first.exit_code(20) == 0


async def test_valkey_unreachable_at_start_gives_up_after_the_timeout_in_one_line() -> None:
    nobody = free_port()
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--valkey-url", f"valkey://127.0.0.1:{nobody}",
        "--valkey-startup-timeout", "1.5",
    )  # fmt: skip
    assert await server.exit_code() == 1
    assert "Traceback" not in server.text
    attempts = [line for line in server.lines if "not answering (attempt" in line]
    assert len(attempts) >= 2
    [error] = [line for line in server.lines if " ERROR " in line]
    assert error == server.lines[-1]
    assert f"Valkey at valkey://127.0.0.1:{nobody} did not answer within 1.5s" in error


async def test_the_server_waits_for_valkey_not_serving_until_it_answers() -> None:
    valkey_port = free_port()
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--valkey-url", f"valkey://127.0.0.1:{valkey_port}"
    )
    valkey = EmbeddedValkey(port=valkey_port)
    try:
        port = int((await server.wait_for(r"listening on [\d.]+:(\d+)"))[0].group(1))
        await server.wait_for(r"not answering \(attempt 1")
        assert await health_status(port) == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
        async with SessionClient(f"127.0.0.1:{port}", retry=NO_RETRY) as client:
            error = await raises(UnavailableError, client.create_session("u"))
            assert "waiting for Valkey" in str(error)
            assert await watch_status(port) == grpc.StatusCode.UNAVAILABLE
            valkey.start()
            await server.wait_for(SERVING)
            assert await health_status(port) == [health_pb2.HealthCheckResponse.SERVING] * 2
            s = await client.create_session("u")
            assert (await client.get_session(s.session_id)).user_id == "u"
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(20) == 0
        assert "Traceback" not in server.text
    finally:
        await server.kill()
        valkey.stop()


async def test_sigterm_while_waiting_for_valkey_stops_at_once() -> None:
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--valkey-url", f"valkey://127.0.0.1:{free_port()}"
    )
    await server.wait_for(r"not answering \(attempt 1")
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_code(10) == 0
    assert "Traceback" not in server.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-level", "nonsense"], "log_level must be one of"),
        (["--listen", "127.0.0.1:65536"], "listen port must be 0..65535, got 65536"),
    ],
)
async def test_configuration_errors_of_the_process_are_one_line(argv: list[str], message: str) -> None:
    server = await ServerProcess.start(*argv)
    assert await server.exit_code() == 2
    [line] = error_lines(server)
    assert message in line
