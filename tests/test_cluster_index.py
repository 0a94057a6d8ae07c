"""Cluster: the owner's index is a second step. A failure between the two steps never hides a
live session from its owner's listing and never lists one that does not exist, and a late second
step never removes the entry of a session created since, whatever the servers' clocks.

Each test makes one step fail inside the real server (the store's own call raises, as a lost
connection would), with real Valkey underneath, and checks the keys with a raw client."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from glide import GlideClient, UpdateOptions

from chatsession_client import AlreadyExistsError, SessionClient, UnavailableError, user
from chatsession_server.app import RunningServer
from chatsession_server.domain import NewSession
from chatsession_server.errors import StoreUnavailable
from chatsession_server.store import owner_index
from chatsession_server.store.lua import session_scripts
from chatsession_server.store.owner_index import SecondStepOwnerIndex
from chatsession_server.store.session_store import SessionStore
from tests.helpers import meta, raises

pytestmark = pytest.mark.cluster_only


def fail_script(monkeypatch: pytest.MonkeyPatch, store: SessionStore, script: Any) -> None:
    original = store._scripts.call

    async def run(which: Any, keys_: Any, args: Any) -> Any:
        if which is script:
            raise StoreUnavailable("injected: the connection to the node was lost")
        return await original(which, keys_, args)

    monkeypatch.setattr(store._scripts, "call", run)


def fail_index_step(monkeypatch: pytest.MonkeyPatch, store: SessionStore, name: str) -> None:
    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    monkeypatch.setattr(store._owner_index, name, broken)


def hold_unindex(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer
) -> tuple[SecondStepOwnerIndex, list[tuple[str, str, str, str]]]:
    """The server's owner index, and the arguments of its deletes' index steps, held back (not
    run) for the test to run late."""
    index_steps = server.store._owner_index
    assert isinstance(index_steps, SecondStepOwnerIndex)
    held: list[tuple[str, str, str, str]] = []

    async def hold(user_id: str, session_id: str, last_active: str, app: str = "") -> None:
        held.append((user_id, session_id, last_active, app))

    monkeypatch.setattr(index_steps, "unindex", hold)
    return index_steps, held


async def listed(client: SessionClient, user_id: str) -> list[str]:
    return [s.session_id async for s in client.iter_sessions(user_id)]


async def age(raw: GlideClient, index: str, session_id: str, seconds: float) -> None:
    """Make an index entry look `seconds` older, as time passing would."""
    score = await raw.zscore(index, session_id)
    assert score is not None
    await raw.zadd(index, {session_id: score - seconds}, update_condition=UpdateOptions.LESS_THAN)


async def test_a_create_cut_off_after_its_index_step_is_never_listed_and_its_entry_goes(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    index = f"user_sessions:{{{uid}}}"
    fail_script(monkeypatch, server.store, session_scripts.CREATE)
    await raises(UnavailableError, client.create_session(uid, session_id=f"{uid}-a", request_id="r1"))
    assert await raw.zscore(index, f"{uid}-a") is not None  # the first step happened...
    assert await raw.exists([f"meta:{{{uid}-a}}"]) == 0  # ...the second did not
    assert await listed(client, uid) == []
    assert await raw.zscore(index, f"{uid}-a") is not None  # too recent to prune: a create may be under way
    await age(raw, index, f"{uid}-a", 3600)
    assert await listed(client, uid) == []
    assert await raw.zscore(index, f"{uid}-a") is None
    # The retry (same request_id) completes the create, and the session is listed.
    monkeypatch.undo()
    s = await client.create_session(uid, session_id=f"{uid}-a", request_id="r1")
    assert await listed(client, uid) == [s.session_id]
    assert await raw.exists([f"meta:{{{uid}-a}}"]) == 1  # the read that saw no meta sees it now


async def test_a_create_whose_index_step_outlasts_the_gap_is_not_sent_and_its_retry_completes(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    index = f"user_sessions:{{{uid}}}"
    # The index step takes longer than the gap allows (as a slow WAIT for a replica would).
    monkeypatch.setattr(owner_index, "CREATE_STEP_GAP_SECONDS", 0.05)
    enter = server.store._owner_index.enter  # type: ignore[attr-defined]

    async def slow_enter(*args: Any) -> str:
        await asyncio.sleep(0.1)  # not a wait for a state: the slow step itself
        return await enter(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(server.store._owner_index, "enter", slow_enter)
    error = await raises(UnavailableError, client.create_session(uid, session_id=f"{uid}-a", request_id="r1"))
    assert "took too long; retry with the same request_id" in str(error)
    assert await raw.zscore(index, f"{uid}-a") is not None  # the index step happened...
    assert await raw.exists([f"meta:{{{uid}-a}}"]) == 0  # ...the session step was never sent
    monkeypatch.undo()
    await client.create_session(uid, session_id=f"{uid}-a", request_id="r1")
    assert await raw.exists([f"meta:{{{uid}-a}}"]) == 1  # the read that saw no meta sees it now
    assert await listed(client, uid) == [f"{uid}-a"]


async def test_a_create_whose_index_step_fails_creates_nothing(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    fail_index_step(monkeypatch, server.store, "enter")
    await raises(UnavailableError, client.create_session(uid, session_id=f"{uid}-b"))
    assert await raw.exists([f"meta:{{{uid}-b}}", f"user_sessions:{{{uid}}}"]) == 0
    monkeypatch.undo()  # the same read sees both keys of a create whose steps all run
    await client.create_session(uid, session_id=f"{uid}-b")
    assert await raw.exists([f"meta:{{{uid}-b}}", f"user_sessions:{{{uid}}}"]) == 2


async def test_an_append_whose_index_step_fails_is_acknowledged_and_the_listing_repairs_the_score(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    index = f"user_sessions:{{{uid}}}"
    older = await client.create_session(uid, session_id=f"{uid}-old")
    newer = await client.create_session(uid, session_id=f"{uid}-new")
    fail_index_step(monkeypatch, server.store, "touch")
    appended = await client.append(older.session_id, [user("still stored")])
    assert [m.seq for m in appended.messages] == [1]
    last_active = float((await meta(raw, older.session_id))["last_active"])
    assert (await raw.zscore(index, older.session_id) or 0) < last_active  # the score lags
    monkeypatch.undo()
    # Listed all the same (in the lagging order), and the listing raises the score.
    assert await listed(client, uid) == [newer.session_id, older.session_id]
    assert await raw.zscore(index, older.session_id) == last_active
    assert await listed(client, uid) == [older.session_id, newer.session_id]


async def test_a_delete_whose_index_step_fails_is_acknowledged_and_its_entry_goes_later(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    index = f"user_sessions:{{{uid}}}"
    s = await client.create_session(uid, session_id=f"{uid}-d")
    assert await raw.exists([f"meta:{{{uid}-d}}"]) == 1
    fail_index_step(monkeypatch, server.store, "unindex")
    await client.delete_session(s.session_id)
    monkeypatch.undo()
    assert await raw.exists([f"meta:{{{uid}-d}}"]) == 0
    assert await raw.zscore(index, s.session_id) is not None
    assert await listed(client, uid) == []
    await age(raw, index, s.session_id, 3600)
    assert await listed(client, uid) == []
    assert await raw.zscore(index, s.session_id) is None


async def test_a_late_index_removal_spares_a_namesake_created_since(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-n")
    index_steps, held = hold_unindex(monkeypatch, server)
    await client.delete_session(s.session_id)
    monkeypatch.undo()
    again = await client.create_session(uid, session_id=f"{uid}-n")
    await index_steps.unindex(*held[0])  # the first delete's second step arrives late
    assert await listed(client, uid) == [again.session_id]


async def test_a_refused_create_leaves_the_index_as_it_was(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    mine = await client.create_session(uid, session_id=f"{uid}-mine")
    before = await raw.zscore(f"user_sessions:{{{uid}}}", mine.session_id)
    await raises(AlreadyExistsError, client.create_session(uid, session_id=f"{uid}-mine"))
    await raises(AlreadyExistsError, client.create_session(f"{uid}-other", session_id=f"{uid}-mine"))
    assert await raw.zscore(f"user_sessions:{{{uid}}}", mine.session_id) == before
    assert await raw.exists([f"user_sessions:{{{uid}}}"]) == 1  # the same read sees an owner's index
    assert await raw.exists([f"user_sessions:{{{uid}-other}}"]) == 0


# --- a late second step and the servers' clocks ----------------------------------------------------
# A late second step (a delete's UNINDEX, a refused create's REVERT_INDEX) never removes the index
# entry of a session created since, whatever the clocks of the servers involved: a create's index
# step raises the score strictly, and undo steps compare against the score it wrote (a re-create
# through a replica whose clock is behind would otherwise leave the score unchanged, and the late
# step then remove a live session's entry). Replica B is a second SessionStore on the same Valkey
# whose clock is 0.5 s behind; the late second step is held and released as above.


def replica_behind(server: RunningServer, seconds: float) -> SessionStore:
    return SessionStore(server.connection, clock=lambda: time.time() - seconds)


def new(uid: str, session_id: str) -> NewSession:
    return NewSession(
        session_id=session_id,
        user_id=uid,
        model="",
        title="",
        labels={},
        ttl_seconds=3600,
        max_messages=-1,
        request_id="",
    )


async def test_a_late_unindex_spares_a_namesake_created_by_a_replica_with_a_slower_clock(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-x")
    await client.append(s.session_id, [user("hi")])
    index_steps, held = hold_unindex(monkeypatch, server)
    await client.delete_session(s.session_id)
    monkeypatch.undo()
    again, _ = await replica_behind(server, 0.5).create(new(uid, s.session_id))  # the user starts over
    await index_steps.unindex(*held[0])  # the delete's second step arrives late
    assert (await client.get_session(again.session_id)).user_id == uid  # live
    assert await listed(client, uid) == [again.session_id]


async def test_a_late_revert_spares_a_session_created_since_by_a_replica_with_a_slower_clock(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    store = server.store
    taken = f"{uid}-y"
    await client.create_session(f"{uid}-bob", session_id=taken)  # bob has the id
    owner_index = store._owner_index
    assert isinstance(owner_index, SecondStepOwnerIndex)
    original = owner_index.revert

    async def late(*args: Any) -> None:
        # Before the refused create undoes its index step: bob deletes his session and the user
        # creates the id through replica B.
        await store.delete(taken)
        await replica_behind(server, 0.5).create(new(uid, taken))
        await original(*args)

    monkeypatch.setattr(owner_index, "revert", late)
    await raises(AlreadyExistsError, client.create_session(uid, session_id=taken))
    monkeypatch.undo()
    assert (await client.get_session(taken)).user_id == uid  # live, the user's
    assert await listed(client, uid) == [taken]


async def test_a_deleted_session_whose_create_was_retried_leaves_no_index_entry(
    client: SessionClient, raw: Any, uid: str
) -> None:
    """The retry's index step (ZADD GT now) is not undone on REPLAYED, so the score ends above
    the session's last_active; UNINDEX then takes the entry for a namesake's and keeps it (a dead
    entry every listing describes for INDEX_PRUNE_GRACE_SECONDS)."""
    index = f"user_sessions:{{{uid}}}"
    s = await client.create_session(uid, session_id=f"{uid}-r", request_id="r1")
    await client.create_session(uid, session_id=s.session_id, request_id="r1")  # a client retry
    assert await raw.zscore(index, s.session_id) is not None
    await client.delete_session(s.session_id)
    assert await raw.zscore(index, s.session_id) is None


async def test_a_late_append_index_step_never_overwrites_a_newer_score(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    # A caller's created_at can move last_active back (an import), so the step sets the score
    # rather than raising it; a step that arrives after a later append's must then not count.
    index = f"user_sessions:{{{uid}}}"
    sid = (await client.create_session(uid)).session_id
    index_steps = server.store._owner_index
    assert isinstance(index_steps, SecondStepOwnerIndex)
    held: list[tuple[Any, ...]] = []
    run_touch = index_steps.touch

    async def hold(*args: Any) -> None:
        held.append(args)

    monkeypatch.setattr(index_steps, "touch", hold)
    await client.append(sid, [user("at the server's time")])
    monkeypatch.setattr(index_steps, "touch", run_touch)
    imported = await client.append(sid, [user("imported", created_at=86_400.0)])
    assert await raw.zscore(index, sid) == 86_400.0  # moved back, as the session's last_active
    await run_touch(*held[0])  # the first append's step, late
    assert await raw.zscore(index, sid) == 86_400.0
    assert (await meta(raw, sid))["last_active"] == "86400.000000"
    assert imported.session.last_active.seconds == 86_400
