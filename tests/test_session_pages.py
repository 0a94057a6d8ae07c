"""A ListSessions page cut by bytes holds at most page_size sessions (found in the third review).

After index rows of expired sessions the read doubles (3, 6, 12, ...), so one read can bring far
more live rows than the page needs; when the byte cut fired among them, the page used to return
all of them, not the first page_size.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from chatsession_client import SessionClient
from chatsession_server.store import keys


@pytest.mark.standalone_only  # the row counts below assume expired rows are pruned as read
async def test_a_page_cut_by_bytes_holds_at_most_page_size(client: SessionClient, raw: Any, uid: str) -> None:
    # 16 live sessions of ~270 KB each (64 labels of 1024 four-byte characters): 4 MB in all.
    labels = {f"k{i:02d}": "\U0001f600" * 1024 for i in range(64)}
    for i in range(16):
        await client.create_session(uid, session_id=f"{uid}-live{i:02d}", labels=labels)
    # 10 index rows of sessions that no longer exist, newer than every live one: the first two
    # reads (3 and 7 rows) meet only them, the third reads 13 rows, all live.
    future = time.time() + 1000
    await raw.zadd(keys.KeySpace().user_index(uid), {f"{uid}-gone{i:02d}": future - i for i in range(10)})
    page = await client.list_sessions(uid, page_size=2)
    assert len(page.sessions) <= 2, f"page_size=2 returned {len(page.sessions)} sessions"
