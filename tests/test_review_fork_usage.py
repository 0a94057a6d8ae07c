"""Review of ForkSession and GetUserUsage (issue 15): defects found, each proven against the real
Valkey (both passes unless marked) and marked xfail(strict) until the lead fixes it; at the end, a
check that passes (--key-prefix with fork and usage)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from glide import GlideClient

from chatsession_client import (
    NO_RETRY,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SessionClient,
    system,
    user,
)
from chatsession_server.app import RunningServer
from chatsession_server.settings import Settings
from chatsession_server.store.keys import KeySpace
from tests.helpers import raises, serving, session_keys_exist
from tests.test_key_prefix import _keys_named

TTL = 1234
DAY = 86_400


async def compacted_source(client: SessionClient, raw: GlideClient, session_id: str, uid: str) -> None:
    """A session as a compaction of seqs 2-3 leaves it (the stored form test_fork.compact writes):
    the prompt (seq 1), the summary (seq 3) in `summary:{id}`, then seq 4."""
    await client.create_session(uid, session_id=session_id, ttl_seconds=TTL)
    await client.append(session_id, [system("Be brief.", tokens=1)])
    await client.append(session_id, [user("a", tokens=2), user("b", tokens=3), user("c", tokens=4)])
    chat = f"chat:{{{session_id}}}"
    kept = [item for item in await raw.lrange(chat, 0, -1) if json.loads(item)["seq"] not in (2, 3)]
    await raw.delete([chat])
    await raw.rpush(chat, kept)
    await raw.expire(chat, TTL)
    summary = {"seq": 3, "role": "system", "content": "a and b", "tokens": 5, "summarizes": [2, 3]}
    await raw.set(f"summary:{{{session_id}}}", json.dumps(summary, separators=(",", ":")))
    await raw.expire(f"summary:{{{session_id}}}", TTL)


# --- labels ---------------------------------------------------------------------------------------


async def test_a_fork_of_a_session_with_the_most_labels_can_still_be_updated(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    labels = {f"k{i}": "v" for i in range(64)}
    await client.create_session(uid, session_id=f"{uid}-src", labels=labels)
    try:
        fork = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")).session
    except (FailedPreconditionError, InvalidArgumentError):
        # Refusing the fork clearly is a fix too, if it wrote nothing.
        assert await session_keys_exist(raw, f"{uid}-f") == 0
        return
    assert fork.labels["forked_from"] == f"{uid}-src"
    renamed = await client.update_session(f"{uid}-f", title="renamed")
    assert renamed.title == "renamed"


# --- the quota layer --------------------------------------------------------------------------------


async def test_with_a_session_limit_a_retry_still_returns_the_fork_after_the_source_is_gone(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_sessions_per_user=10) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as limited,
    ):
        await limited.create_session(uid, session_id=f"{uid}-src")
        await limited.append(f"{uid}-src", [user("hi")])
        first = await limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
        await limited.delete_session(f"{uid}-src")
        late = await limited.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
        assert late.replayed
        assert late.session.created_at == first.session.created_at


# --- a copied summary's lifetime ------------------------------------------------------------------


async def test_a_forks_summary_lives_as_long_as_the_fork(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await compacted_source(client, raw, f"{uid}-src", uid)
    fork = (await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")).session
    assert fork.message_count == 3  # prompt, summary, "c"
    summary_key = f"summary:{{{uid}-f}}"
    # As if 1134 s passed: every key of the fork has 100 s left; an append restarts the clock.
    for key in (f"chat:{{{uid}-f}}", f"meta:{{{uid}-f}}", summary_key):
        await raw.expire(key, 100)
    await client.append(f"{uid}-f", [user("d")])
    assert await raw.ttl(f"meta:{{{uid}-f}}") > 1000
    assert await raw.ttl(summary_key) > 1000
    # A longer TTL asked by an update applies to the summary too.
    await client.update_session(f"{uid}-f", ttl_seconds=5000)
    assert await raw.ttl(summary_key) > 4000


async def test_deleting_a_fork_removes_its_summary(client: SessionClient, raw: GlideClient, uid: str) -> None:
    await compacted_source(client, raw, f"{uid}-src", uid)
    await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f")
    assert await raw.exists([f"summary:{{{uid}-f}}"]) == 1
    await client.delete_session(f"{uid}-f")
    # A namesake created afterwards by another user, then forked: its fork must not carry the old
    # summary (another user's conversation, in its stored form).
    await client.create_session(f"{uid}-other", session_id=f"{uid}-f")
    await client.append(f"{uid}-f", [user("fresh", tokens=1)])
    again = (await client.fork_session(f"{uid}-f", new_session_id=f"{uid}-g")).session
    assert (again.message_count, again.token_count) == (1, 1)
    assert await raw.exists([f"summary:{{{uid}-f}}", f"summary:{{{uid}-g}}"]) == 0


# --- request_id across RPCs ----------------------------------------------------------------------


async def test_a_create_with_a_forks_request_id_is_not_a_replay_of_the_fork(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await client.create_session(uid, session_id=f"{uid}-src", title="source")
    await client.append(f"{uid}-src", [user("hi")])
    await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
    await raises(
        AlreadyExistsError, client.create_session(uid, session_id=f"{uid}-f", title="new", request_id="r1")
    )


# --- GetUserUsage's reply -----------------------------------------------------------------------


async def test_the_usage_of_a_user_of_many_models_stays_readable(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    # What 20000 CreateSession calls, each with another model name, leave in the HASH (seeded raw:
    # making them through the API would take minutes).
    models = {f"model:sessions:{i:06d}{'m' * 250}": "1" for i in range(20_000)}
    await raw.hset(f"usage:{{{uid}}}", models)
    await raw.hset(f"usage:{{{uid}}}", {"total:sessions": "20000"})
    reply = await client.get_user_usage(uid)
    assert reply.total.sessions == 20_000


# --- the cluster's second step -------------------------------------------------------------------


@pytest.mark.cluster_only
async def test_cluster_a_message_is_counted_on_the_utc_day_it_was_appended(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    s = await client.create_session(uid)
    # Just before the last UTC midnight (within the 90 days a reading shows), then just after it.
    midnight = time.time() // DAY * DAY
    readings = [midnight - 0.1, midnight + 0.1]  # the append's own reading, then every later one

    def clock() -> float:
        return readings.pop(0) if len(readings) > 1 else readings[0]

    monkeypatch.setattr(server.store, "_clock", clock)
    monkeypatch.setattr(server.store._owner_index, "_clock", clock)  # the usage step's readings
    appended = await client.append(s.session_id, [user("late", tokens=2)])
    monkeypatch.undo()
    assert appended.messages[0].created_at.seconds == int(midnight) - 1
    the_day_before = time.strftime("%Y-%m-%d", time.gmtime(midnight - 1))
    days = {d.day: (d.usage.messages, d.usage.tokens) for d in (await client.get_user_usage(uid)).days}
    assert days.get(the_day_before) == (1, 2), days


# --- a fork of a session at --max-session-bytes ---------------------------------------------------

MESSAGES_AT_THE_CAP = 780_000
"""Small messages (~84 bytes stored) filling the default --max-session-bytes (64 MiB) of a session
without a window: what 780 appends of 1000 leave."""


async def test_a_session_at_the_size_cap_can_be_forked_without_blocking_valkey(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, valkey_timeout_ms=500) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY, timeout=60) as client,
    ):
        await client.create_session(uid, session_id=f"{uid}-src", max_messages=-1)
        # Seeded raw, in the stored form the append script writes (780 appends take a minute).
        chat = f"chat:{{{uid}-src}}"
        stored = 0
        for first in range(1, MESSAGES_AT_THE_CAP + 1, 10_000):
            items = [
                f'{{"seq":{seq},"role":"user","content":"y","tokens":1,"created_at":1764000000.5}}'
                for seq in range(first, first + 10_000)
            ]
            stored += sum(len(item) for item in items)
            await raw.rpush(chat, items)
        await raw.hset(
            f"meta:{{{uid}-src}}",
            {
                "message_count": str(MESSAGES_AT_THE_CAP),
                "token_count": str(MESSAGES_AT_THE_CAP),
                "stored_bytes": str(stored),
            },
        )
        assert stored <= settings.max_session_bytes
        try:
            fork = await client.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
            assert fork.session.message_count == MESSAGES_AT_THE_CAP
        except (FailedPreconditionError, ResourceExhaustedError):
            pass  # refusing a fork this big, clearly and at once, is a fix too
        finally:
            await raw.delete([chat, f"chat:{{{uid}-f}}"])


# --- checked and sound: --key-prefix with fork and usage ---------------------------------------------


async def test_fork_and_usage_keys_carry_the_prefix_and_stay_apart(
    settings: Settings, valkey_url: str, raw: Any, valkey_cluster: bool, client: SessionClient, uid: str
) -> None:
    prefix = f"{uid}p:"
    async with (
        serving(settings, valkey_url, key_prefix=prefix) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as prefixed,
    ):
        await prefixed.create_session(uid, session_id=f"{uid}-src", model="m")
        await prefixed.append(f"{uid}-src", [system("s", tokens=1), user("u", tokens=2)])
        await prefixed.fork_session(f"{uid}-src", new_session_id=f"{uid}-f", request_id="r1")
        await prefixed.append(f"{uid}-f", [user("v", tokens=3)])
        usage = await prefixed.get_user_usage(uid)
        assert (usage.total.messages, usage.total.tokens, usage.total.sessions) == (3, 6, 2)
    written = await _keys_named(raw, f"*{uid}*", valkey_cluster)
    space = KeySpace(prefix)
    expected = {space.chat(f"{uid}-f"), space.meta(f"{uid}-f"), space.usage(uid), space.user_index(uid)}
    if valkey_cluster:
        expected.add(space.usage_seen(uid))
    assert expected <= written
    assert all(key.startswith(prefix) for key in written), sorted(written)
    # The deployment without a prefix sees none of it.
    assert (await client.get_user_usage(uid)).total.sessions == 0
