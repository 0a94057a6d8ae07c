"""How many Valkey round trips an append costs, counted by Valkey itself (INFO commandstats).

commandstats counts the commands a script runs too, so a round trip of its own shows as a command
the script does not run (SCRIPT LOAD, EXISTS, MULTI/EXEC, WAIT, GET, ...): one AppendMessages must
add exactly one EVALSHA, and otherwise only commands the APPEND script runs inside it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from glide import AllPrimaries, GlideClusterClient

from chatsession_client import SessionClient, user
from chatsession_server.store.lua.owner_scripts import USAGE_SYNC
from chatsession_server.store.lua.session_scripts import APPEND


async def command_counts(raw: Any) -> dict[str, int]:
    """Calls of every command Valkey (every primary) has run, scripts' calls included."""
    if isinstance(raw, GlideClusterClient):
        per_node: Any = await raw.custom_command(["INFO", "commandstats"], route=AllPrimaries())
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in per_node.values()]
    else:
        info = await raw.custom_command(["INFO", "commandstats"])
        texts = [info.decode() if isinstance(info, bytes) else str(info)]
    counts: dict[str, int] = {}
    for text in texts:
        for name, calls in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", text):
            counts[name] = counts.get(name, 0) + int(calls)
    return counts


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
