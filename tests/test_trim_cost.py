"""What one window trim costs Valkey (found in the second review: the whole pinned prompt was
re-pushed message by message on every trim, and a tool run walked with one LINDEX per message).

Valkey runs one script at a time, so a script's cost is every other caller's wait. Measured on
this machine (standalone, default --max-session-bytes 64 MiB):
- 700,000 pinned system messages, window 1: every append re-pushes the whole prompt with one
  LPUSH per message, 0.8-1.1 s of Valkey per append, for as long as the caller keeps appending;
- 700,000 tool messages, UpdateSession max_messages=350000: one LINDEX per message of the tool
  run at the window's head, each walking the list: 5.3 s of Valkey in one script (past
  busy-reply-threshold: everyone else gets BUSY), and it cannot be killed, it has written.
The tests count the Valkey commands of one such trim at a small scale, not the time.
"""

from __future__ import annotations

import re
from typing import Any

from glide import AllPrimaries, GlideClusterClient

from chatsession_client import SessionClient, system, tool, user


async def command_calls(raw: Any, command: str) -> int:
    """How many times Valkey (every primary) has run `command`, scripts' calls included."""
    if isinstance(raw, GlideClusterClient):
        per_node: Any = await raw.custom_command(["INFO", "commandstats"], route=AllPrimaries())
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in per_node.values()]
    else:
        info = await raw.custom_command(["INFO", "commandstats"])
        texts = [info.decode() if isinstance(info, bytes) else str(info)]
    return sum(int(m.group(1)) for t in texts if (m := re.search(rf"cmdstat_{command}:calls=(\d+)", t)))


async def test_an_append_to_a_session_with_a_long_pinned_prompt_costs_no_more_than_one_without(
    client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=1)
    for _ in range(2):
        await client.append(s.session_id, [system("x")] * 1000)  # all pinned: system before the rest
    await client.append(s.session_id, [user("first")])
    before = await command_calls(raw, "lpush")
    await client.append(s.session_id, [user("second")])  # trims "first"
    pushed = await command_calls(raw, "lpush") - before
    assert pushed < 100, f"one append ran LPUSH {pushed} times"


async def test_a_trim_past_a_long_tool_run_reads_the_list_in_bulk(
    client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=-1)
    for _ in range(3):
        await client.append(s.session_id, [tool("x")] * 1000)
    before = await command_calls(raw, "lindex")
    await client.update_session(s.session_id, max_messages=1500)
    walked = await command_calls(raw, "lindex") - before
    assert walked < 100, f"one trim ran LINDEX {walked} times"
