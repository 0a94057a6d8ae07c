"""What message operations cost Valkey, counted by Valkey itself: the round trips of an append, the
commands of a window trim, the Lua memory of a ListMessages page.

Round trips (INFO commandstats): commandstats counts the commands a script runs too, so a round
trip of its own shows as a command the script does not run (SCRIPT LOAD, EXISTS, MULTI/EXEC, WAIT,
GET, ...): one AppendMessages must add exactly one EVALSHA, and otherwise only commands the APPEND
script runs inside it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from glide import GlideClusterClient, SlotKeyRoute, SlotType

from chatsession_client import SessionClient, system, tool, user
from chatsession_server.app import RunningServer
from chatsession_server.domain import MessageQuery, NewMessage, NewSession, Role
from chatsession_server.store.lua.owner_scripts import USAGE_SYNC
from chatsession_server.store.lua.session_scripts import APPEND
from tests.helpers import command_counts


async def commands_of(raw: Any, step: Any) -> dict[str, int]:
    """The commands Valkey ran while `step` was awaited (but our own INFO)."""
    before = await command_counts(raw)
    await step
    after = await command_counts(raw)
    spent = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
    spent.pop("info", None)
    return spent


APPEND_SCRIPT_COMMANDS = {name.lower() for name in re.findall(r"redis\.call\('(\w+)'", APPEND.source)}
APPEND_SCRIPT_COMMANDS |= {"publish", "spublish"}  # called by the name it is given
# Whether anyone follows the channel (the messages go inside the publish only then).
APPEND_SCRIPT_COMMANDS |= {"pubsub|numsub", "pubsub|shardnumsub"}


@pytest.mark.standalone_only
async def test_an_append_is_one_evalsha_and_nothing_outside_its_script(
    client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("warm: the script is loaded once, not per call")])
    spent = await commands_of(raw, client.append(s.session_id, [user("hello", tokens=3)]))
    assert spent.pop("evalsha") == 1
    assert set(spent) <= APPEND_SCRIPT_COMMANDS, set(spent) - APPEND_SCRIPT_COMMANDS
    assert spent["zadd"] == 1  # the owner's index, kept inside the script on standalone Valkey


@pytest.mark.cluster_only
async def test_in_a_cluster_an_append_is_its_script_and_one_index_and_usage_step(
    client: SessionClient, raw: Any, uid: str
) -> None:
    """The owner's index and usage live in another slot: a second round trip, the USAGE_SYNC
    script (see owner_index.py). It is not skipped: every append raises last_active, the
    index's score, and adds to the usage."""
    s = await client.create_session(uid)
    await client.append(s.session_id, [user("warm")])
    spent = await commands_of(raw, client.append(s.session_id, [user("hello", tokens=3)]))
    assert spent.pop("evalsha") == 2  # the append's script, then the index and usage step's
    step_commands = {name.lower() for name in re.findall(r"redis\.call\('(\w+)'", USAGE_SYNC.source)}
    assert spent.pop("zadd") == 1  # the index, in the second step (the append's script skips it)
    assert set(spent) <= APPEND_SCRIPT_COMMANDS | step_commands, spent


@pytest.mark.cluster_only
async def test_in_a_cluster_an_append_to_a_session_of_an_app_adds_one_step_for_the_apps_index(
    client: SessionClient, raw: Any, uid: str
) -> None:
    """The user's index of the app is in the owner's slot (the same step); the app's index is in
    the app's own slot: one more round trip, a ZADD."""
    s = await client.create_session(uid, app=f"{uid}-app")
    await client.append(s.session_id, [user("warm")])
    spent = await commands_of(raw, client.append(s.session_id, [user("hello", tokens=3)]))
    assert spent.pop("evalsha") == 2  # the append's script, then the index and usage step's
    assert spent.pop("zadd") == 3  # the user's index and the user's of the app, then the app's
    step_commands = {name.lower() for name in re.findall(r"redis\.call\('(\w+)'", USAGE_SYNC.source)}
    assert set(spent) <= APPEND_SCRIPT_COMMANDS | step_commands, spent


@pytest.mark.standalone_only
async def test_an_append_to_a_session_of_an_app_is_still_one_evalsha(
    client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid, app=f"{uid}-app")
    await client.append(s.session_id, [user("warm")])
    spent = await commands_of(raw, client.append(s.session_id, [user("hello", tokens=3)]))
    assert spent.pop("evalsha") == 1
    assert spent["zadd"] == 3  # the owner's index, the owner's of the app, the app's: in the script
    assert set(spent) <= APPEND_SCRIPT_COMMANDS, set(spent) - APPEND_SCRIPT_COMMANDS


# What one window trim costs Valkey. Valkey runs one script at a time, so a script's cost is every
# other caller's wait. Measured on this machine (standalone, default --max-session-bytes 64 MiB),
# with the trims these tests rule out:
# - 700,000 pinned system messages, window 1: every append re-pushing the whole prompt with one
#   LPUSH per message, 0.8-1.1 s of Valkey per append, for as long as the caller keeps appending;
# - 700,000 tool messages, UpdateSession max_messages=350000: one LINDEX per message of the tool
#   run at the window's head, each walking the list: 5.3 s of Valkey in one script (past
#   busy-reply-threshold: everyone else gets BUSY), and it cannot be killed, it has written.
# The tests count the Valkey commands of one such trim at a small scale, not the time.


async def test_an_append_to_a_session_with_a_long_pinned_prompt_costs_no_more_than_one_without(
    client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=1)
    for _ in range(2):
        await client.append(s.session_id, [system("x")] * 1000)  # all pinned: system before the rest
    await client.append(s.session_id, [user("first")])
    before = (await command_counts(raw)).get("lpush", 0)
    await client.append(s.session_id, [user("second")])  # trims "first"
    pushed = (await command_counts(raw)).get("lpush", 0) - before
    assert pushed < 100, f"one append ran LPUSH {pushed} times"


async def test_a_trim_past_a_long_tool_run_reads_the_list_in_bulk(
    client: SessionClient, raw: Any, uid: str
) -> None:
    s = await client.create_session(uid, max_messages=-1)
    for _ in range(3):
        await client.append(s.session_id, [tool("x")] * 1000)
    before = (await command_counts(raw)).get("lindex", 0)
    await client.update_session(s.session_id, max_messages=1500)
    walked = (await command_counts(raw)).get("lindex", 0) - before
    assert walked < 100, f"one trim ran LINDEX {walked} times"


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
    """A ListMessages page reads inside Valkey about what it returns: the script cuts the page by
    bytes as it reads, not after reading the whole page by count.

    Measured on this machine (standalone): a session of 255 messages of 250 KB (64 MiB, the
    default --max-session-bytes), ListMessages after_seq=0 page_size=1000 returns 12 messages
    (3 MiB); read by count first, that took 0.137 s of Valkey and left 61 MB in its Lua heap,
    against 0.013 s for page_size=12: 10x the Valkey time and memory of what it returns, for any
    caller that asks for big pages (the watch's backlog reads 200 at a time)."""
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
