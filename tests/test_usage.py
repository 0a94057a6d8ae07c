"""GetUserUsage through a real server and Valkey (both passes): counted with every create and
append, per model and per UTC day (the day the message was appended), never twice for a replay,
kept after sessions go, readable for a user of many models, kept apart under --key-prefix; in a
cluster, a failed second step is made up later. Side effects checked with a raw client."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from glide import GlideClient

from chatsession_client import (
    NO_RETRY,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SessionClient,
    system,
    user,
)
from chatsession_server.app import RunningServer
from chatsession_server.errors import StoreUnavailable
from chatsession_server.settings import Settings
from chatsession_server.store import codec
from chatsession_server.store.keys import KeySpace
from chatsession_server.store.lua import owner_scripts
from chatsession_server.store.owner_index import SecondStepOwnerIndex
from tests.helpers import eventually, grpcurl, keys_named, raises, serving, violated_fields

DAY = 86_400
JAN_10 = float(calendar.timegm((2026, 1, 10, 12, 0, 0)))


def counts(c: Any) -> tuple[int, int, int]:
    return (c.messages, c.tokens, c.sessions)


async def usage_of(client: SessionClient, user_id: str) -> dict[str, Any]:
    reply = await client.get_user_usage(user_id)
    return {
        "total": counts(reply.total),
        "models": {m.model: counts(m.usage) for m in reply.models},
        "days": {d.day: counts(d.usage) for d in reply.days},
    }


@contextlib.contextmanager
def clock(monkeypatch: pytest.MonkeyPatch, server: RunningServer, now: list[float]) -> Iterator[None]:
    """The store's clock reads now[0]: a test moves it across UTC days."""
    monkeypatch.setattr(server.store, "_clock", lambda: now[0])
    if isinstance(server.store._owner_index, SecondStepOwnerIndex):  # its step reads the clock too
        monkeypatch.setattr(server.store._owner_index, "_clock", lambda: now[0])
    yield


async def test_usage_counts_appends_and_creates_per_model_and_per_day(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    now = [JAN_10]
    with clock(monkeypatch, server, now):
        s = await client.create_session(uid, model="m1")
        await client.append(s.session_id, [user("a", tokens=3), user("b", tokens=4)])
        now[0] += DAY
        await client.update_session(s.session_id, model="m2")  # counted under the model of the time
        await client.append(s.session_id, [user("c", tokens=5)])
        await client.create_session(uid, model="m2")
        await client.create_session(uid)
    assert await usage_of(client, uid) == {
        "total": (3, 12, 3),
        "models": {"": (0, 0, 1), "m1": (2, 7, 1), "m2": (1, 5, 1)},
        "days": {"2026-01-10": (2, 7, 1), "2026-01-11": (1, 5, 2)},
    }
    fields = await raw.hgetall(f"usage:{{{uid}}}")
    assert fields[b"total:tokens"] == b"12"
    assert fields[b"model:messages:m1"] == b"2"
    assert fields[b"day:sessions:2026-01-11"] == b"2"
    assert await raw.ttl(f"usage:{{{uid}}}") == -1  # no expiry


async def test_days_older_than_90_are_dropped(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    now = [JAN_10]
    with clock(monkeypatch, server, now):
        s = await client.create_session(uid)
        await client.append(s.session_id, [user("old", tokens=1)])
        now[0] += 89 * DAY  # 2026-04-09: Jan 10 is the 90th day back, still kept
        assert set((await usage_of(client, uid))["days"]) == {"2026-01-10"}
        now[0] += DAY  # 2026-04-10: gone from the reply at once...
        assert (await usage_of(client, uid))["days"] == {}
        assert await raw.hget(f"usage:{{{uid}}}", "day:messages:2026-01-10") == b"1"
        await client.append(s.session_id, [user("new", tokens=2)])  # ...and from Valkey at the next write
    assert await raw.hget(f"usage:{{{uid}}}", "day:messages:2026-01-10") is None
    assert await usage_of(client, uid) == {
        "total": (2, 3, 1),
        "models": {"": (2, 3, 1)},
        "days": {"2026-04-10": (1, 2, 0)},
    }


async def test_a_replayed_append_or_create_is_counted_once(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-s", request_id="c1")
    await client.create_session(uid, session_id=f"{uid}-s", request_id="c1")
    first = await client.append(s.session_id, [user("hi", tokens=7)], request_id="a1")
    again = await client.append(s.session_id, [user("hi", tokens=7)], request_id="a1")
    assert again.replayed
    assert first.messages[0].seq == again.messages[0].seq
    assert (await usage_of(client, uid))["total"] == (1, 7, 1)


async def test_usage_outlives_deletion_and_expiry(client: SessionClient, raw: GlideClient, uid: str) -> None:
    deleted = await client.create_session(uid)
    await client.append(deleted.session_id, [user("one", tokens=1)])
    expiring = await client.create_session(uid)
    await client.append(expiring.session_id, [user("two", tokens=2), user("three", tokens=3)])
    await client.delete_session(deleted.session_id)
    assert await raw.exists([f"meta:{{{expiring.session_id}}}"]) == 1
    for name in ("chat", "meta", "reqs"):
        await raw.pexpire(f"{name}:{{{expiring.session_id}}}", 1)

    async def expired() -> bool:
        return await raw.exists([f"meta:{{{expiring.session_id}}}"]) == 0

    await eventually(expired)
    assert (await usage_of(client, uid))["total"] == (3, 6, 2)


async def test_concurrent_appends_are_each_counted_once(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    await asyncio.gather(*(client.append(s.session_id, [user(f"m{i}", tokens=i)]) for i in range(50)))
    assert (await usage_of(client, uid))["total"] == (50, sum(range(50)), 1)


async def test_a_fork_counts_as_a_session_but_not_its_copied_messages(
    client: SessionClient, uid: str
) -> None:
    s = await client.create_session(uid, model="m")
    await client.append(s.session_id, [user("a", tokens=2), user("b", tokens=3)])
    fork = (await client.fork_session(s.session_id)).session
    assert (await usage_of(client, uid))["total"] == (2, 5, 2)
    await client.append(fork.session_id, [user("c", tokens=4)])
    usage = await usage_of(client, uid)
    assert usage["total"] == (3, 9, 2)
    assert usage["models"] == {"m": (3, 9, 2)}
    assert list(usage["days"].values()) == [(3, 9, 2)]


async def test_a_user_without_usage_reads_zeros(client: SessionClient, uid: str) -> None:
    assert await usage_of(client, uid) == {"total": (0, 0, 0), "models": {}, "days": {}}


@pytest.mark.parametrize("user_id", ["", "a b", "x" * 129, "{u}"])
async def test_a_bad_user_id_is_invalid_argument(client: SessionClient, user_id: str) -> None:
    error = await raises(InvalidArgumentError, client.get_user_usage(user_id))
    assert violated_fields(error) == {"user_id"}


ALICE_TOKEN = "alice-token-" + uuid.uuid4().hex
ALL_TOKEN = "every-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("usage-auth") / "tokens"
    path.write_text(f"{ALICE_TOKEN} alice-usage\n{ALL_TOKEN} *\n")
    return path


@pytest.fixture(scope="module")
async def auth_target(settings: Settings, valkey_url: str, tokens_file: Path) -> AsyncIterator[str]:
    async with serving(settings, valkey_url, auth_tokens_file=str(tokens_file)) as running:
        yield f"127.0.0.1:{running.port}"


async def test_another_users_usage_is_permission_denied(auth_target: str) -> None:
    async with SessionClient(auth_target, token=ALICE_TOKEN, retry=NO_RETRY) as alice:
        await alice.get_user_usage("alice-usage")
        await raises(PermissionDeniedError, alice.get_user_usage("bob-usage"))
    async with SessionClient(auth_target, token=ALL_TOKEN, retry=NO_RETRY) as service:
        await service.get_user_usage("bob-usage")


@pytest.mark.cluster_only
async def test_cluster_a_failed_usage_step_is_made_up_by_the_next_append_or_the_retry(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    store = server.store
    original = store._scripts.run
    failing = [True]

    async def run(which: Any, keys_: Any, args: Any) -> Any:
        if which is owner_scripts.USAGE_SYNC and failing[0]:
            raise StoreUnavailable("injected: the user's node is unreachable")
        return await original(which, keys_, args)

    monkeypatch.setattr(store._scripts, "run", run)
    s = await client.create_session(uid, model="m")  # acknowledged, not yet counted
    await client.append(s.session_id, [user("a", tokens=2)], request_id="r1")  # the same
    assert (await usage_of(client, uid))["total"] == (0, 0, 0)
    failing[0] = False
    # The retry of the append (a replay) makes up for both steps, once.
    replay = await client.append(s.session_id, [user("a", tokens=2)], request_id="r1")
    assert replay.replayed
    assert (await usage_of(client, uid))["total"] == (1, 2, 1)
    await client.append(s.session_id, [user("a", tokens=2)], request_id="r1")
    assert (await usage_of(client, uid))["total"] == (1, 2, 1)
    # A step that fails is made up by the session's next append.
    failing[0] = True
    await client.append(s.session_id, [user("b", tokens=3)])
    failing[0] = False
    await client.append(s.session_id, [user("c", tokens=4)])
    assert (await usage_of(client, uid))["total"] == (3, 9, 1)


async def test_forking_another_users_session_is_not_found_and_writes_nothing(
    auth_target: str, raw: GlideClient, uid: str
) -> None:
    async with SessionClient(auth_target, token=ALL_TOKEN, retry=NO_RETRY) as service:
        await service.create_session("bob-usage", session_id=f"{uid}-bob")
        await service.append(f"{uid}-bob", [user("private")])
    async with SessionClient(auth_target, token=ALICE_TOKEN, retry=NO_RETRY) as alice:
        stolen = f"alice-usage/{uid}-stolen"  # an id alice may choose: the source decides
        await raises(NotFoundError, alice.fork_session(f"{uid}-bob", new_session_id=stolen))
    assert await raw.exists([f"meta:{{{stolen}}}", f"chat:{{{stolen}}}"]) == 0
    # The same read sees the fork its owner's caller may make.
    async with SessionClient(auth_target, token=ALL_TOKEN, retry=NO_RETRY) as service:
        await service.fork_session(f"{uid}-bob", new_session_id=f"{uid}-copy")
    assert await raw.exists([f"meta:{{{uid}-copy}}", f"chat:{{{uid}-copy}}"]) == 2


async def test_the_readme_grpcurl_recipe(target: str, client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid, model="gpt-4o")
    await client.append(s.session_id, [user("hi", tokens=2)])
    code, out = await grpcurl(
        "-plaintext", "-d", json.dumps({"user_id": uid}), target, "chatsession.v1.SessionService/GetUserUsage"
    )
    assert code == 0, out
    usage = json.loads(out)
    assert usage["total"] == {"messages": "1", "tokens": "2", "sessions": "1"}
    assert usage["models"] == [{"model": "gpt-4o", "usage": usage["total"]}]
    assert [d["usage"] for d in usage["days"]] == [usage["total"]]


@pytest.mark.cluster_only
async def test_cluster_a_session_whose_sync_record_was_dropped_is_not_counted_again(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    now = [JAN_10]
    with clock(monkeypatch, server, now):
        old = await client.create_session(uid)
        await client.append(old.session_id, [user("a", tokens=1)])
        # Past the longest TTL without a step, its record goes with the next prune (a day's first step).
        now[0] += 31 * DAY
        await client.create_session(uid)
        assert await raw.hget(f"usage_seen:{{{uid}}}", old.session_id) is None
        # Kept alive meanwhile (as updates of its TTL could): its next append counts only itself.
        await client.append(old.session_id, [user("b", tokens=2)])
    assert (await usage_of(client, uid))["total"] == (2, 3, 2)


async def test_models_past_the_cap_are_counted_under_other_and_totals_stay_exact(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    for i in range(codec.USAGE_MAX_MODELS + 2):
        await client.create_session(uid, model=f"m{i:03d}")
    s = await client.create_session(uid, model="m000")  # a model counted already keeps its place
    await client.append(s.session_id, [user("a", tokens=2)])
    usage = await usage_of(client, uid)
    assert usage["total"] == (1, 2, codec.USAGE_MAX_MODELS + 3)
    assert len(usage["models"]) == codec.USAGE_MAX_MODELS + 1
    assert usage["models"]["m000"] == (1, 2, 2)
    assert usage["models"][codec.USAGE_OTHER_MODEL] == (0, 0, 2)
    assert f"m{codec.USAGE_MAX_MODELS:03d}" not in usage["models"]
    fields = await raw.hkeys(f"usage:{{{uid}}}")
    stored_models = {f.split(b":", 2)[2] for f in fields if f.startswith(b"model:")}
    assert len(stored_models) == codec.USAGE_MAX_MODELS + 1


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
    written = await keys_named(raw, f"*{uid}*", valkey_cluster)
    space = KeySpace(prefix)
    expected = {space.chat(f"{uid}-f"), space.meta(f"{uid}-f"), space.usage(uid), space.user_index(uid)}
    if valkey_cluster:
        expected.add(space.usage_seen(uid))
    assert expected <= written
    assert all(key.startswith(prefix) for key in written), sorted(written)
    # The deployment without a prefix sees none of it.
    assert (await client.get_user_usage(uid)).total.sessions == 0
