"""Real parts only: a real valkey-server (embedded, or CHATSESSION_TEST_VALKEY_URL to use an
existing one), a real in-process gRPC server on port 0, a real channel, and a raw GLIDE client
to check side effects in Valkey directly."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from glide import GlideClient, GlideClientConfiguration, Logger, LogLevel, NodeAddress

from chatsession_client import NO_RETRY, SessionClient
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.settings import Settings, ValkeyAddress

Logger.set_logger_config(LogLevel.ERROR)


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    existing = os.environ.get("CHATSESSION_TEST_VALKEY_URL")
    if existing:
        yield existing
        return
    with EmbeddedValkey() as valkey:
        yield valkey.url


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(listen="127.0.0.1:0", default_ttl_seconds=3600, max_content_bytes=1024)


@pytest.fixture(scope="session")
async def server(settings: Settings, valkey_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, ValkeyAddress.parse(valkey_url))
    yield running
    await running.stop(1.0)


@pytest.fixture(scope="session")
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
async def client(target: str) -> AsyncIterator[SessionClient]:
    async with SessionClient(target, retry=NO_RETRY) as c:
        yield c


@pytest.fixture(scope="session")
async def raw(valkey_url: str) -> AsyncIterator[GlideClient]:
    """A GLIDE client of the test's own, to look at keys without going through the service."""
    address = ValkeyAddress.parse(valkey_url)
    config = GlideClientConfiguration([NodeAddress(address.host, address.port)], request_timeout=2000)
    c = await GlideClient.create(config)
    yield c
    await c.close()


@pytest.fixture
def uid() -> str:
    """A fresh id prefix per test, so tests share one Valkey without seeing each other's keys."""
    return "t" + uuid.uuid4().hex[:12]
