"""Cluster: paging through ListSessions lists every live session even when a score is repaired
between two reads of one page (found in review: list_sessions walked the index by offset, the
repaired row left the range, every later row moved up by one, and the next read skipped one;
it now goes on from the last row read).

Needs a row whose index step failed (B: its score lags its last_active) followed by a dead
entry that is too young to prune (a create cut off after its index step), so the page takes
a second read. A concurrent append (ZADD GT) between the two reads does the same, in both modes."""

from __future__ import annotations

from typing import Any

import pytest

from chatsession_client import SessionClient, UnavailableError, user
from chatsession_server.app import RunningServer
from chatsession_server.errors import StoreUnavailable
from chatsession_server.store.lua import session_scripts
from tests.helpers import raises

pytestmark = pytest.mark.cluster_only


async def test_paging_lists_every_live_session_when_a_score_is_repaired_mid_page(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    store = server.store
    skipped = await client.create_session(uid, session_id=f"{uid}-s")
    original_run = store._scripts.call

    async def cut_off(which: Any, keys_: Any, args: Any) -> Any:
        if which is session_scripts.CREATE:
            raise StoreUnavailable("injected: the connection to the node was lost")
        return await original_run(which, keys_, args)

    monkeypatch.setattr(store._scripts, "call", cut_off)  # a create cut off after its index step
    await raises(UnavailableError, client.create_session(uid, session_id=f"{uid}-dead"))
    monkeypatch.undo()
    lagging = await client.create_session(uid, session_id=f"{uid}-b")
    await client.create_session(uid, session_id=f"{uid}-a")
    await client.create_session(uid, session_id=f"{uid}-a2")

    first = await client.list_sessions(uid, page_size=2)
    seen = [s.session_id for s in first.sessions]

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    monkeypatch.setattr(store._owner_index, "touch", broken)
    await client.append(lagging.session_id, [user("index step fails: the score lags")])
    monkeypatch.undo()
    token = first.next_page_token
    while token:
        page = await client.list_sessions(uid, page_size=2, page_token=token)
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
    assert skipped.session_id in seen, seen
