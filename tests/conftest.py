"""Real parts only: a real valkey-server (embedded, or CHATSESSION_TEST_VALKEY_URL to use an
existing one), a real in-process gRPC server on port 0, a real channel, and a raw GLIDE client
to check side effects in Valkey directly.

`pytest --valkey-cluster` runs the same tests against a real local 3-primary Valkey Cluster
(or the cluster named by CHATSESSION_TEST_VALKEY_URL). Tests that need their own standalone
Valkey (to kill it, say) are marked `standalone_only` and run in the standalone pass."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from glide import (
    GlideClient,
    GlideClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    Logger,
    LogLevel,
    NodeAddress,
)

from chatsession_client import NO_RETRY, SessionClient
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.embedded_cluster import EmbeddedCluster
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import TOKENS

Logger.set_logger_config(LogLevel.ERROR)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--valkey-cluster", action="store_true", help="run against a local 3-primary Valkey Cluster"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "standalone_only: needs a standalone Valkey of its own")
    config.addinivalue_line("markers", "cluster_only: tests what only a cluster does")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cluster = bool(config.getoption("--valkey-cluster"))
    skip = "standalone_only" if cluster else "cluster_only"
    reason = "runs in the standalone pass" if cluster else "runs in the --valkey-cluster pass"
    for item in items:
        if skip in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


# tests/adk/ needs google-adk, which lives in .venv-adk: tests/test_adk.py runs it there.
collect_ignore = ["adk"]


@pytest.fixture(scope="session")
def valkey_cluster(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("--valkey-cluster"))


@pytest.fixture(scope="session")
def embedded_cluster(valkey_cluster: bool) -> Iterator[EmbeddedCluster | None]:
    """The local cluster of the --valkey-cluster pass (None in the standalone pass)."""
    if not valkey_cluster or os.environ.get("CHATSESSION_TEST_VALKEY_URL"):
        yield None
        return
    with EmbeddedCluster(primaries=3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def valkey_url(valkey_cluster: bool, embedded_cluster: EmbeddedCluster | None) -> Iterator[str]:
    existing = os.environ.get("CHATSESSION_TEST_VALKEY_URL")
    if existing:
        yield existing
    elif embedded_cluster is not None:
        yield embedded_cluster.url
    else:
        with EmbeddedValkey() as valkey:
            yield valkey.url


@pytest.fixture(scope="session")
def settings(valkey_cluster: bool) -> Settings:
    return Settings(
        listen="127.0.0.1:0", default_ttl_seconds=3600, max_content_bytes=1024, valkey_cluster=valkey_cluster
    )


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
async def raw(valkey_url: str, valkey_cluster: bool) -> AsyncIterator[GlideClient]:
    """A GLIDE client of the test's own, to look at keys without going through the service.
    (A GlideClusterClient in the cluster pass: the same command methods, typed as one.)"""
    address = ValkeyAddress.parse(valkey_url)
    nodes = [NodeAddress(host, port) for host, port in address.nodes]
    c: Any
    if valkey_cluster:
        c = await GlideClusterClient.create(GlideClusterClientConfiguration(nodes, request_timeout=2000))
    else:
        c = await GlideClient.create(GlideClientConfiguration(nodes, request_timeout=2000))
    yield c
    await c.close()


@pytest.fixture
def uid() -> str:
    """A fresh id prefix per test, so tests share one Valkey without seeing each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(TOKENS)
    return path
