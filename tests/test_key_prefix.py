"""Two deployments with different --key-prefix share one Valkey (both passes) without seeing each
other: the same session id and user id live twice, appends and watches stay on their side, and
every key the service writes carries its deployment's prefix."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatsession_client import NO_RETRY, SessionClient, user
from chatsession_server.settings import Settings
from chatsession_server.store.keys import KeySpace
from tests.helpers import eventually, keys_named, serving


async def test_two_prefixes_share_one_valkey_without_interference(
    settings: Settings, valkey_url: str, raw: Any, valkey_cluster: bool, uid: str
) -> None:
    prefix_a, prefix_b = f"{uid}a:", f"{uid}b:"
    async with (
        serving(settings, valkey_url, key_prefix=prefix_a) as server_a,
        serving(settings, valkey_url, key_prefix=prefix_b) as server_b,
        SessionClient(f"127.0.0.1:{server_a.port}", retry=NO_RETRY) as a,
        SessionClient(f"127.0.0.1:{server_b.port}", retry=NO_RETRY) as b,
    ):
        session_id = f"{uid}-s"
        await a.create_session(uid, session_id=session_id, title="on a")
        await b.create_session(uid, session_id=session_id, title="on b")
        seen_on_b: list[str] = []
        live = asyncio.Event()

        async def watch_b() -> None:
            async for event in b.watch(session_id, include_heartbeats=True):
                live.set()  # the first event, a heartbeat: joined the feed, subscribed
                if event.WhichOneof("event") == "message":
                    seen_on_b.append(event.message.content)
                    return

        watcher = asyncio.create_task(watch_b())
        await eventually(live.is_set)  # the watch is subscribed: a's appends must not reach it
        await a.append(session_id, [user("for a")], request_id="r1")
        await a.append(session_id, [user("for a again")], request_id="r2")
        # The same request_id on b is a new request there, not a replay of a's.
        appended = await b.append(session_id, [user("for b")], request_id="r1")
        assert not appended.replayed
        # b's append, after a's, reaches the watch (it could have seen a's): the first it gets.
        await asyncio.wait_for(watcher, 10)
        assert seen_on_b == ["for b"]

        got_a, got_b = await a.get_session(session_id), await b.get_session(session_id)
        assert (got_a.title, got_a.message_count) == ("on a", 2)
        assert (got_b.title, got_b.message_count) == ("on b", 1)
        assert [s.title async for s in a.iter_sessions(uid)] == ["on a"]
        assert [s.title async for s in b.iter_sessions(uid)] == ["on b"]

        # Every key the service wrote carries its prefix; nothing landed under the bare names.
        written_a = await keys_named(raw, f"{prefix_a}*", valkey_cluster)
        space_a = KeySpace(prefix_a)
        assert {
            space_a.chat(session_id),
            space_a.meta(session_id),
            space_a.user_index(uid),
            space_a.usage(uid),
        } <= written_a
        assert space_a.page_token_secret() in written_a
        session_keys = await keys_named(raw, f"*{{{session_id}}}", valkey_cluster)
        assert session_keys
        assert all(k.startswith((prefix_a, prefix_b)) for k in session_keys)

        await a.delete_session(session_id)
        assert (await b.get_session(session_id)).title == "on b"


@pytest.mark.parametrize("prefix", ["{tag}:", "has space", "x" * 65, "glob*"])
def test_a_prefix_that_could_change_slots_or_match_patterns_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        Settings(key_prefix=prefix)
