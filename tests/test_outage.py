"""Valkey going away: UNAVAILABLE while it is gone, service again once it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from chatsession_client import NO_RETRY, Retry, SessionClient, UnavailableError, user
from chatsession_server.app import RunningServer, start_server
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import raises

# Each test runs a standalone Valkey of its own: the cluster pass has nothing to add.
pytestmark = pytest.mark.standalone_only


@pytest.fixture
def private_valkey() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey() as valkey:
        yield valkey


@pytest.fixture
async def outage_server(private_valkey: EmbeddedValkey) -> AsyncIterator[RunningServer]:
    settings = Settings(listen="127.0.0.1:0", valkey_timeout_ms=500, valkey_connect_timeout_ms=500)
    running = await start_server(settings, ValkeyAddress.parse(private_valkey.url))
    yield running
    await running.stop(0.5)


async def test_unavailable_while_valkey_is_down_then_recovers(
    outage_server: RunningServer, private_valkey: EmbeddedValkey
) -> None:
    async with SessionClient(f"127.0.0.1:{outage_server.port}", retry=NO_RETRY) as client:
        s = await client.create_session("u1", session_id="outage")
        await client.append("outage", [user("before")])
        private_valkey.kill()
        started = time.monotonic()
        err = await raises(UnavailableError, client.append("outage", [user("during")]))
        assert "Traceback" not in err.message
        assert time.monotonic() - started < 3.0
        # Known down: every further call fails at once, none waits out the Valkey timeout.
        for _ in range(20):
            call_started = time.monotonic()
            await raises(UnavailableError, client.get_session(s.session_id))
            assert time.monotonic() - call_started < 0.25
        private_valkey.start()  # same port, empty data (no persistence in the embedded server)
        back = time.monotonic()
        while True:
            try:
                created = await client.create_session("u1", session_id="after-outage")
                break
            except UnavailableError:
                assert time.monotonic() - back < 5, "Valkey's return went unnoticed"
                await asyncio.sleep(0.05)
        recovered_in = time.monotonic() - back
        assert created.session_id == "after-outage"
        print(f"\nserved again {recovered_in:.2f}s after Valkey answered")
        assert recovered_in < 2.0


async def test_client_retry_rides_out_a_short_outage(
    outage_server: RunningServer, private_valkey: EmbeddedValkey
) -> None:
    retry = Retry(initial_backoff=0.1, max_backoff=0.5, deadline=20)
    async with SessionClient(f"127.0.0.1:{outage_server.port}", retry=retry) as client:
        private_valkey.kill()

        async def restart_later() -> None:
            await asyncio.sleep(1.0)
            private_valkey.start()

        restarter = asyncio.create_task(restart_later())
        s = await client.create_session("u2", session_id="retried", request_id="create-1")
        await restarter
        r = await client.append(s.session_id, [user("hello")], request_id="append-1")
        again = await client.append(s.session_id, [user("hello")], request_id="append-1")
        assert again.replayed
        assert [m.seq for m in r.messages] == [m.seq for m in again.messages] == [1]
