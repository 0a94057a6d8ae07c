"""The real `python -m chatsession_server` process: embedded Valkey, SIGTERM drain, no orphans."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from chatsession_client import SessionClient, user

# Each test runs a standalone Valkey of its own: the cluster pass has nothing to add.
pytestmark = pytest.mark.standalone_only

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is as good as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def start_server_process(*extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """Start the server on a free port; return it, its gRPC port and its embedded Valkey's pid."""
    env = dict(os.environ)
    env.pop("CHATSESSION_VALKEY_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", "--listen", "127.0.0.1:0", *extra,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    valkey_pid = port = 0
    deadline = time.monotonic() + 30
    while not port:
        line = (
            await asyncio.wait_for(proc.stderr.readline(), max(deadline - time.monotonic(), 0.1))
        ).decode()
        assert line, "server exited before it was serving"
        if m := re.search(r"\(pid (\d+)\)", line):
            valkey_pid = int(m.group(1))
        if m := re.search(r"serving on [\d.]+:(\d+)", line):
            port = int(m.group(1))
    return proc, port, valkey_pid


async def test_sigterm_drains_and_stops_embedded_valkey() -> None:
    proc, port, valkey_pid = await start_server_process()
    assert alive(valkey_pid)
    async with SessionClient(f"127.0.0.1:{port}") as client:
        s = await client.create_session("u")
        await client.append(s.session_id, [user("hello")])
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert not alive(valkey_pid)


async def test_sigkill_of_the_server_leaves_no_orphan_valkey() -> None:
    proc, _, valkey_pid = await start_server_process()
    assert alive(valkey_pid)
    proc.kill()
    await proc.wait()
    deadline = time.monotonic() + 5
    while alive(valkey_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not alive(valkey_pid)


async def test_bad_flag_fails_fast_with_a_message() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", "--valkey-url", "http://nope",
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"valkey://" in err
    assert b"Traceback" not in err
