"""What a ListMessages page reads inside Valkey: about what it returns (found in the second review:
the script read the whole page by count before cutting it by bytes).

Measured on this machine (standalone): a session of 255 messages of 250 KB (64 MiB, the default
--max-session-bytes), ListMessages after_seq=0 page_size=1000 returns 12 messages (3 MiB) in
0.137 s of Valkey and leaves 61 MB in its Lua heap; page_size=12 returns the same in 0.013 s. The
script reads the whole page by count, then cuts it by bytes: 10x the Valkey time and memory of
what it returns, for any caller that asks for big pages (the watch's backlog reads 200 at a time).
"""

from __future__ import annotations

import re
from typing import Any

from glide import GlideClusterClient, SlotKeyRoute, SlotType

from chatsession_server.app import RunningServer
from chatsession_server.domain import MessageQuery, NewMessage, NewSession, Role


async def lua_memory(raw: Any, key: str) -> int:
    if isinstance(raw, GlideClusterClient):
        info: Any = await raw.custom_command(["INFO", "memory"], route=SlotKeyRoute(SlotType.PRIMARY, key))
    else:
        info = await raw.custom_command(["INFO", "memory"])
    text = info.decode() if isinstance(info, bytes) else str(info)
    match = re.search(r"used_memory_lua:(\d+)", text)
    assert match is not None
    return int(match.group(1))


async def test_a_page_of_big_messages_reads_about_what_it_returns(
    server: RunningServer, raw: Any, uid: str
) -> None:
    store = server.store
    session_id = f"{uid}-big"
    await store.create(
        NewSession(session_id, uid, model="", title="", labels={}, ttl_seconds=600, max_messages=-1)
    )
    for _ in range(8):  # 80 messages of 250 KB: 20 MB
        await store.append(session_id, [NewMessage(Role.USER, "x" * 250_000) for _ in range(10)])
    chat = f"chat:{{{session_id}}}"
    # A fresh Lua heap (GLIDE loads the scripts again): what it holds next is this page's read.
    if isinstance(raw, GlideClusterClient):
        await raw.custom_command(["SCRIPT", "FLUSH"], route=SlotKeyRoute(SlotType.PRIMARY, chat))
    else:
        await raw.custom_command(["SCRIPT", "FLUSH"])
    before = await lua_memory(raw, chat)
    page = await store.list_messages(session_id, MessageQuery(limit=1000, after_seq=0))
    assert len(page.messages) == 12
    assert page.has_more
    grown = await lua_memory(raw, chat) - before
    assert grown < 8_000_000, f"a 3 MiB page grew Valkey's Lua heap by {grown // 1_000_000} MB"
