"""Fixtures of the ADK tests, which run in a virtualenv of their own (.venv-adk: google-adk pins
opentelemetry-api<=1.44, the server needs 1.45), with only the client and google-adk installed.

The server is the main suite's (tests/test_adk.py runs these tests against it, standalone and
on a cluster, passing its address in CHATSESSION_ADK_TARGET), or, run alone, a chatsession-server
process of the server's virtualenv (.venv) with an embedded Valkey."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from chatsession_client import NO_RETRY, SessionClient
from chatsession_client.adk import ChatsessionSessionService

ROOT = Path(__file__).resolve().parent.parent.parent
SERVER = Path(os.environ.get("CHATSESSION_SERVER", ROOT / ".venv" / "bin" / "chatsession-server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """A chatsession-server process with an embedded Valkey, and its address once it answers."""
    target = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(SERVER), "--listen", target, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(target) as channel:
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.2)
                return proc, target
            except grpc.FutureTimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"chatsession-server did not start: {err}") from None


@pytest.fixture(scope="session")
def target() -> Iterator[str]:
    given = os.environ.get("CHATSESSION_ADK_TARGET")
    if given:
        yield given
        return
    proc, address = serve()
    yield address
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def uid() -> str:
    """A fresh prefix per test, so tests share one server without seeing each other's data."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def service(target: str) -> AsyncIterator[ChatsessionSessionService]:
    async with ChatsessionSessionService(target, retry=NO_RETRY) as s:
        yield s


@pytest.fixture(scope="session")
async def client(target: str) -> AsyncIterator[SessionClient]:
    """A plain client, to see what the adapter stored."""
    async with SessionClient(target, retry=NO_RETRY) as c:
        yield c
