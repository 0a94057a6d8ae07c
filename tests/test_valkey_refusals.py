"""How Valkey's own refusals reach callers (found in the second review: a Valkey at maxmemory
made every write INTERNAL with a traceback)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from chatsession_client import NO_RETRY, ChatSessionError, ResourceExhaustedError, SessionClient, user
from chatsession_server.app import start_server
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import raises


@pytest.mark.standalone_only
async def test_a_full_valkey_is_resource_exhausted_not_an_internal_error(
    settings: Settings, caplog: pytest.LogCaptureFixture, uid: str
) -> None:
    with EmbeddedValkey() as valkey:
        running = await start_server(
            dataclasses.replace(settings, listen="127.0.0.1:0"), ValkeyAddress.parse(valkey.url)
        )
        try:
            async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client:
                s = await client.create_session(uid)
                await running.connection.client.custom_command(["CONFIG", "SET", "maxmemory", "1"])
                with caplog.at_level(logging.ERROR):
                    error = await raises(ChatSessionError, client.append(s.session_id, [user("hello")]))
                assert isinstance(error, ResourceExhaustedError), error
                assert "out of memory" in error.message
                assert "Traceback" not in caplog.text
        finally:
            await running.stop(1.0)
