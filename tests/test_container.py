"""What the container image relies on: the health probe of its HEALTHCHECK and the refusal to start
an embedded Valkey it was not asked for (real processes; there is no container engine here)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from chatsession_server.embedded import free_port
from chatsession_server.healthcheck import default_address
from tests.processes import ROOT, ServerProcess

pytestmark = pytest.mark.standalone_only


async def probe(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m chatsession_server.healthcheck ARGS`: its exit code and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server.healthcheck", *args,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    _, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stderr.decode()


async def test_probe_passes_on_a_serving_server(target: str) -> None:
    assert await probe(target) == (0, "")


async def test_probe_finds_the_port_in_chatsession_listen(target: str) -> None:
    port = target.rpartition(":")[2]
    assert await probe(env={"CHATSESSION_LISTEN": f"0.0.0.0:{port}"}) == (0, "")


async def test_probe_fails_when_nothing_listens() -> None:
    code, stderr = await probe(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 1
    assert stderr.startswith("unhealthy: 127.0.0.1:")
    assert "UNAVAILABLE" in stderr
    assert stderr.count("\n") == 1


async def test_probe_fails_while_the_server_waits_for_valkey() -> None:
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", "--valkey-url", f"valkey://127.0.0.1:{free_port()}"
    )
    try:
        port = (await server.wait_for(r"listening on [\d.]+:(\d+)"))[0].group(1)
        code, stderr = await probe(f"127.0.0.1:{port}")
        assert (code, stderr) == (1, f"unhealthy: 127.0.0.1:{port}: NOT_SERVING\n")
    finally:
        await server.kill()


def test_default_address_asks_the_loopback_for_a_wildcard_listen() -> None:
    assert default_address({}) == "127.0.0.1:50051"
    assert default_address({"CHATSESSION_LISTEN": "0.0.0.0:7000"}) == "127.0.0.1:7000"
    assert default_address({"CHATSESSION_LISTEN": "[::]:7000"}) == "127.0.0.1:7000"
    assert default_address({"CHATSESSION_LISTEN": "10.1.2.3:7000"}) == "10.1.2.3:7000"


async def test_no_valkey_url_and_embedded_valkey_off_is_refused_in_one_line() -> None:
    server = await ServerProcess.start("--listen", "127.0.0.1:0", env={"CHATSESSION_EMBEDDED_VALKEY": "0"})
    assert await server.exit_code() == 2
    assert len(server.lines) == 1, server.text
    assert "no Valkey configured: set --valkey-url (CHATSESSION_VALKEY_URL)" in server.lines[0]
    assert "CHATSESSION_EMBEDDED_VALKEY=1" in server.lines[0]


async def test_embedded_valkey_on_starts_one() -> None:
    server = await ServerProcess.start("--listen", "127.0.0.1:0", env={"CHATSESSION_EMBEDDED_VALKEY": "1"})
    try:
        await server.wait_for(r"started an embedded valkey-server")
        await server.wait_for(r"serving on")
    finally:
        await server.kill()
