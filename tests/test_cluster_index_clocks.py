"""Cluster: a late second step (a delete's UNINDEX, a refused create's REVERT_INDEX) never removes
the index entry of a session created since, whatever the clocks of the servers involved (found in
review: a re-create through a replica whose clock was behind left the score unchanged, and the
late step then removed a live session's entry). A create's index step raises the score strictly
and undo steps compare against the score it wrote.

Replica B is a second SessionStore on the same Valkey whose clock is 0.5 s behind; the late
second step is held and released the way tests/test_cluster_index.py does it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from chatsession_client import AlreadyExistsError, SessionClient, user
from chatsession_server.app import RunningServer
from chatsession_server.domain import NewSession
from chatsession_server.store.owner_index import SecondStepOwnerIndex
from chatsession_server.store.session_store import SessionStore
from tests.helpers import raises

pytestmark = pytest.mark.cluster_only


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


async def listed(client: SessionClient, user_id: str) -> list[str]:
    return [s.session_id async for s in client.iter_sessions(user_id)]


async def test_a_late_unindex_spares_a_namesake_created_by_a_replica_with_a_slower_clock(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    owner_index = server.store._owner_index
    assert isinstance(owner_index, SecondStepOwnerIndex)
    held: list[tuple[str, str, str]] = []

    async def hold(user_id: str, session_id: str, last_active: str) -> None:
        held.append((user_id, session_id, last_active))

    s = await client.create_session(uid, session_id=f"{uid}-x")
    await client.append(s.session_id, [user("hi")])
    monkeypatch.setattr(owner_index, "unindex", hold)
    await client.delete_session(s.session_id)
    monkeypatch.undo()
    again, _ = await replica_behind(server, 0.5).create(new(uid, s.session_id))  # the user starts over
    await owner_index.unindex(*held[0])  # the delete's second step arrives late
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
    await client.delete_session(s.session_id)
    assert await raw.zscore(index, s.session_id) is None
