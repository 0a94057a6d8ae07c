"""ListSessions paging and its byte cut (found in the second review: a lagging row past a page's end
was repaired over the cursor and skipped, the quota counted only one byte-cut page, and the cut
counted characters, not bytes)."""

from __future__ import annotations

from typing import Any

import pytest

from chatsession_client import NO_RETRY, SessionClient, user
from chatsession_client.errors import ResourceExhaustedError
from chatsession_server.app import RunningServer
from chatsession_server.errors import StoreUnavailable
from chatsession_server.settings import Settings
from tests.helpers import serving


def big_labels(char: str) -> dict[str, str]:
    """The most a session may carry: 64 labels of a 128-character key and a 1024-character value."""
    return {f"{i:03d}" + char * 125: char * 1024 for i in range(64)}


@pytest.mark.cluster_only
async def test_a_lagging_row_past_the_page_end_is_listed_on_a_later_page(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    lagging = await client.create_session(uid, session_id=f"{uid}-1")
    await client.create_session(uid, session_id=f"{uid}-2")
    await client.create_session(uid, session_id=f"{uid}-3")

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    # An append whose index step fails: acknowledged, its session's score lags (README).
    monkeypatch.setattr(server.store._owner_index, "touch", broken)
    await client.append(lagging.session_id, [user("stored; the index step failed")])
    monkeypatch.undo()
    # No other activity: paging two by two must list all three.
    listed = [s.session_id async for s in client.iter_sessions(uid, page_size=2)]
    assert sorted(listed) == [f"{uid}-1", f"{uid}-2", f"{uid}-3"], listed


async def test_the_session_quota_holds_for_sessions_with_large_labels(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    limit = 45  # a page of these sessions is cut by bytes after 42
    async with (
        serving(settings, valkey_url, max_sessions_per_user=limit) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client,
    ):
        labels = big_labels("k")
        for i in range(limit):
            await client.create_session(uid, session_id=f"{uid}-{i}", labels=labels)
        with pytest.raises(ResourceExhaustedError):
            await client.create_session(uid, session_id=f"{uid}-over", labels=labels)


async def test_quota_still_refuses_small_sessions(settings: Settings, valkey_url: str, uid: str) -> None:
    """The control of the test above: the same limit holds for sessions without labels."""
    async with (
        serving(settings, valkey_url, max_sessions_per_user=3) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client,
    ):
        for i in range(3):
            await client.create_session(uid, session_id=f"{uid}-{i}")
        with pytest.raises(ResourceExhaustedError):
            await client.create_session(uid, session_id=f"{uid}-over")


async def test_a_list_sessions_page_fits_a_default_client_with_non_ascii_labels(
    client: SessionClient, uid: str
) -> None:
    labels = big_labels("\N{GRINNING FACE}")  # 4 bytes in UTF-8, 1 character
    for i in range(15):
        await client.create_session(uid, session_id=f"{uid}-{i}", labels=labels)
    # The client's default receive limit is 4 MiB; the server promises pages below 3 MiB.
    listed = [s.session_id async for s in client.iter_sessions(uid, page_size=100)]
    assert len(listed) == 15
