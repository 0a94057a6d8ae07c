"""A trim keeps a pinned prompt stored before the MAX_PINNED cap, however long (found in the third
review).

New prompts are capped at 16 messages, but a session stored before the cap may have pinned
thousands. Lua's unpack takes at most ~8000 values: a single LPUSH of the prompt after the LTRIM
used to fail and lose the prompt; it is now put back in slices.
"""

from __future__ import annotations

import contextlib
from typing import Any

from chatsession_server.app import RunningServer
from chatsession_server.domain import NewMessage, NewSession, Role
from tests.helpers import meta

PINNED = 8_100


async def test_a_trim_keeps_a_legacy_prompt_of_any_length(server: RunningServer, raw: Any, uid: str) -> None:
    store = server.store
    session_id = f"{uid}-legacy"
    await store.create(
        NewSession(session_id, uid, model="", title="", labels={}, ttl_seconds=600, max_messages=PINNED + 2)
    )
    for _ in range(PINNED // 900 + 1):
        await store.append(session_id, [NewMessage(Role.SYSTEM, "s") for _ in range(900)])
    await raw.hset(f"meta:{{{session_id}}}", {"pinned": str(PINNED)})  # as the code before the cap stored it
    # Today this append fails (a Lua error: INTERNAL through gRPC); what matters is what it left.
    with contextlib.suppress(Exception):
        await store.append(session_id, [NewMessage(Role.USER, "u") for _ in range(5)])
    assert (await meta(raw, session_id))["pinned"] == str(PINNED)
    assert await raw.llen(f"chat:{{{session_id}}}") == PINNED + 2, "the pinned prompt was trimmed away"
