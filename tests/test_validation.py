"""Every class of bad input: INVALID_ARGUMENT naming the field, and nothing written to Valkey."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from glide import GlideClient

from chatsession_client import InvalidArgumentError, SessionClient, assistant, message, system, tool, user
from tests.helpers import raises, stored_messages, violated_fields


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def _nan_payload_message() -> Any:
    """What a client that does not check could send: the Python client refuses NaN itself."""
    m = user("x")
    m.payload.number_value = float("nan")
    return m


BAD_APPENDS: list[tuple[str, Callable[[], list[Any]], dict[str, Any], str]] = [
    ("no messages", lambda: [], {}, "messages"),
    ("unspecified role", lambda: [message(0, "x")], {}, "messages[0].role"),
    ("unknown role", lambda: [message(9, "x")], {}, "messages[0].role"),
    ("empty content", lambda: [user("ok"), user("")], {}, "messages[1].content"),
    ("oversized content", lambda: [user("x" * 1025)], {}, "messages[0].content"),
    ("oversized multibyte", lambda: [user("é" * 600)], {}, "messages[0].content"),
    ("negative tokens", lambda: [user("x", tokens=-1)], {}, "messages[0].tokens"),
    (
        "tool_calls on a user",
        lambda: [user("x", tool_calls=[("c", "f", "{}")])],
        {},
        "messages[0].tool_calls",
    ),
    ("tool_call_id on user", lambda: [user("x", tool_call_id="c")], {}, "messages[0].tool_call_id"),
    (
        "nameless tool call",
        lambda: [assistant("", tool_calls=[("c", "", "{}")])],
        {},
        "messages[0].tool_calls[0].name",
    ),
    (
        "too many metadata",
        lambda: [user("x", metadata={str(i): "v" for i in range(65)})],
        {},
        "messages[0].metadata",
    ),
    ("payload too deep", lambda: [user("x"), user("y", payload=_nested(25))], {}, "messages[1].payload"),
    ("payload NaN", lambda: [_nan_payload_message()], {}, "messages[0].payload"),
    (
        "time far ahead",
        lambda: [user("x"), user("y", created_at=time.time() + 86_400)],
        {},
        "messages[1].created_at",
    ),
    ("time before 1970", lambda: [user("x", created_at=-1.0)], {}, "messages[0].created_at"),
    ("bad request_id", lambda: [user("x")], {"request_id": "has space"}, "request_id"),
    ("negative expected seq", lambda: [user("x")], {"expected_last_seq": -1}, "expected_last_seq"),
]


@pytest.mark.parametrize(
    ("case", "messages", "kwargs", "field"), BAD_APPENDS, ids=[c[0] for c in BAD_APPENDS]
)
async def test_bad_append_is_rejected_and_writes_nothing(
    client: SessionClient,
    raw: GlideClient,
    uid: str,
    case: str,
    messages: Callable[[], list[Any]],
    kwargs: dict[str, Any],
    field: str,
) -> None:
    s = await client.create_session(uid, max_messages=2)
    await client.append(s.session_id, [system("prompt")])
    before_meta = await raw.hgetall(f"meta:{{{s.session_id}}}")
    before_list = await stored_messages(raw, s.session_id)
    before_reqs = await raw.hgetall(f"reqs:{{{s.session_id}}}")
    err = await raises(InvalidArgumentError, client.append(s.session_id, messages(), **kwargs))
    assert field in violated_fields(err), err
    assert await raw.hgetall(f"meta:{{{s.session_id}}}") == before_meta
    assert await stored_messages(raw, s.session_id) == before_list
    assert await raw.hgetall(f"reqs:{{{s.session_id}}}") == before_reqs


@pytest.mark.parametrize(
    "bad_id",
    ["", "has space", "brace{x}", "x" * 129, "star*x", "back\\slash", "ünï"],
    ids=["empty", "space", "brace", "long", "star", "backslash", "unicode"],
)
async def test_bad_session_ids(client: SessionClient, raw: GlideClient, uid: str, bad_id: str) -> None:
    for call in (
        client.get_session(bad_id),
        client.append(bad_id, [user("x")]),
        client.list_messages(bad_id),
        client.delete_session(bad_id),
    ):
        err = await raises(InvalidArgumentError, call)
        assert violated_fields(err) == {"session_id"}
    assert await raw.exists([f"chat:{{{bad_id}}}", f"meta:{{{bad_id}}}"]) == 0
    good = await client.create_session(uid)  # the same read sees a session's keys
    await client.append(good.session_id, [user("x")])
    assert await raw.exists([f"chat:{{{good.session_id}}}", f"meta:{{{good.session_id}}}"]) == 2


async def test_all_violations_reported_at_once(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    err = await raises(
        InvalidArgumentError, client.append(s.session_id, [message(0, ""), tool("x", tokens=-3)])
    )
    assert violated_fields(err) >= {"messages[0].role", "messages[0].content", "messages[1].tokens"}


async def test_list_messages_bad_ranges(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid)
    err = await raises(InvalidArgumentError, client.list_messages(s.session_id, page_size=-1))
    assert violated_fields(err) == {"page_size"}
    err = await raises(InvalidArgumentError, client.list_messages(s.session_id, after_seq=-1, before_seq=0))
    assert violated_fields(err) == {"after_seq", "before_seq"}


async def test_errors_carry_no_stack_trace(client: SessionClient, uid: str) -> None:
    err = await raises(InvalidArgumentError, client.append(f"{uid}", [user("")]))
    assert "Traceback" not in err.message
    assert "File " not in err.message
