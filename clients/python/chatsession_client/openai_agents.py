"""chatsession as the session memory of the OpenAI Agents SDK
(`pip install 'chatsession-client[openai-agents]'`).

    from agents import Agent, Runner
    from chatsession_client.openai_agents import ChatsessionSession

    session = ChatsessionSession("conversation-123", target="localhost:50051", user_id="alice")
    result = await Runner.run(agent, "Hello", session=session)

`ChatsessionSession` implements `agents.memory.Session` as the SDK's own `SQLiteSession` and
`RedisSession` do: `get_items(limit)` returns the newest `limit` items oldest first (every item
when `limit` and `session_settings.limit` are None, none for 0), `add_items` appends in one call
(an empty list does nothing), `pop_item` removes and returns the newest item (None on an empty or
missing session), `clear_session` empties it. A write that the caller cancels is finished first
and the cancellation raised after it, as theirs do.

Each item (a Responses API input item: a message, `function_call`, `function_call_output`,
`reasoning`, ...) is stored as given in its message's `payload` and comes back equal. The
message's role, content, tool calls and tokens are derived from it for the service's own use
(windows, token budgets, usage, grpcurl, other clients): see `item_message`.

Errors are chatsession_client's: `ChatSessionError` subclasses (`InvalidArgumentError` naming
the refused field, `PermissionDeniedError`, `UnavailableError` after the client's retries, ...);
an item that is not JSON raises `TypeError` or `ValueError` before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

from agents.items import TResponseInputItem
from agents.memory.session_settings import SessionSettings, coerce_session_settings, resolve_session_limit

from chatsession_client import _adapters
from chatsession_client._calls import Message, message
from chatsession_client._payload import payload_of
from chatsession_client.client import SessionClient

__all__ = ["ChatsessionSession", "item_message", "message_items"]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}

TokenCounter = Callable[[TResponseInputItem], int]


class ChatsessionSession:
    """An Agents SDK session kept by a chatsession server.

    `session_id` names the chatsession session; it is created on the first `add_items` for
    `user_id` (with `title`, `model`, `labels`, `ttl_seconds` and `max_messages` as in
    CreateSession: 0 for the server's defaults, -1 for a session that never expires or keeps
    every message), and reads of a session not yet created find it empty.

    Connects to `target` with `token` (the caller's bearer token) and `client_options` (the
    other keyword arguments of `chatsession_client.SessionClient`: `tls`, `root_certificates`,
    `timeout`, `retry`, ...), or uses `client`, a SessionClient shared by many sessions (then
    `close()` leaves it open). `session_settings` (or a dict of its fields) gives the default
    `limit` of `get_items`. `count_tokens` gives an item's tokens for the service's budgets
    (default: about 4 characters a token of the item's text and arguments).
    """

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        *,
        user_id: str,
        target: str = "localhost:50051",
        token: str | None = None,
        client: SessionClient | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        title: str = "",
        model: str = "",
        labels: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
        max_messages: int = 0,
        count_tokens: TokenCounter | None = None,
        **client_options: Any,
    ) -> None:
        self.session_id = session_id
        self.session_settings = (
            coerce_session_settings(session_settings) if session_settings is not None else SessionSettings()
        )
        creation = _adapters.Creation(
            user_id, title, model, dict(labels or {}), ttl_seconds=ttl_seconds, max_messages=max_messages
        )
        connection = _adapters.Connection(target, token, client_options)
        self._history = _adapters.AsyncHistory(session_id, creation, connection, client)
        self._count_tokens = count_tokens

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The newest `limit` items (default `session_settings.limit`; None: all), oldest first."""
        resolved = resolve_session_limit(limit, self.session_settings)
        items = [item for m in await self._history.newest(resolved) for item in message_items(m)]
        # A message another client appended may stand for several items (an assistant message
        # with tool calls): the limit counts items.
        return items if resolved is None else items[-resolved:] if resolved > 0 else []

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append `items` in order, in one call (all of them or none)."""
        messages = [item_message(item, self._count_tokens) for item in items]
        await _adapters.finish_despite_cancel(self._history.append(messages))

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove the newest item and return it; None when the session has none."""
        popped = await _adapters.finish_despite_cancel(self._history.pop())
        if popped is None:
            return None
        items = message_items(popped)
        return items[-1] if items else None

    async def clear_session(self) -> None:
        """Remove every item (the chatsession session, its counters and usage stay)."""
        await _adapters.finish_despite_cancel(self._history.clear())

    async def close(self) -> None:
        """Close the connection this session opened (not a `client` it was given)."""
        await self._history.close()


def item_message(item: TResponseInputItem, count_tokens: TokenCounter | None = None) -> Message:
    """The chatsession message that stores `item` (in its payload, unchanged):

    - a message (`{"role": ..., "content": ...}`, typed "message" or not): its role (developer
      is system), the text of its content (its text parts joined by newlines, `[input_image]`
      for a part without text);
    - a `*_call` item with a `call_id` (`function_call`, `computer_call`, `custom_tool_call`,
      ...): an assistant message with one tool call (the call id, the name or the type, the
      arguments or the input);
    - a `*_call_output` item with a `call_id`: a tool message answering that call, its output's text;
    - anything else (`reasoning`, `web_search_call`, `mcp_*`, ...): an assistant message with the
      item's text (a reasoning summary) or `[<type>]`.
    """
    fields = cast("Mapping[str, Any]", item)
    if not isinstance(fields, Mapping):
        raise TypeError(f"a session item is a dict, not {type(item).__name__}")
    kind = fields.get("type")
    kind_name = kind if isinstance(kind, str) else "message"
    role = fields.get("role")
    call_id = fields.get("call_id")
    tool_calls: list[tuple[str, str, str]] = []
    tool_call_id = ""
    if kind_name == "message" and role in _ROLES:
        chat_role, text = _ROLES[role], _text(fields.get("content"))
    elif isinstance(call_id, str) and kind_name.endswith("_call_output"):
        chat_role, text, tool_call_id = "tool", _text(fields.get("output")), call_id
    elif isinstance(call_id, str) and kind_name.endswith("_call"):
        chat_role, text = "assistant", ""
        name = fields.get("name")
        arguments = fields.get("arguments", fields.get("input", ""))
        tool_calls.append((
            call_id,
            name if isinstance(name, str) and name else kind_name,
            arguments if isinstance(arguments, str) else json.dumps(arguments),
        ))  # fmt: skip
    else:
        chat_role, text = "assistant", _text(fields.get("summary") or fields.get("content"))
    if not text and not tool_calls:
        text = f"[{kind_name}]"
    tokens = (
        count_tokens(item)
        if count_tokens is not None
        else _adapters.estimate_tokens(text, *(arguments for _, _, arguments in tool_calls))
    )
    return message(
        chat_role,
        text,
        tokens=tokens,
        tool_calls=tool_calls,
        tool_call_id=tool_call_id,
        payload=_plain(fields),
    )


def message_items(m: Message) -> list[TResponseInputItem]:
    """The items a stored message stands for: its payload as stored by `item_message`; for a
    message another client appended (no payload), the Responses input items of its role, content,
    tool calls (one `function_call` each) and tool call id (a `function_call_output`)."""
    stored = payload_of(m)
    if isinstance(stored, dict):
        return [cast(TResponseInputItem, stored)]
    role = _adapters.ROLE_NAMES.get(m.role, "user")
    if role == "tool":
        return [
            cast(
                TResponseInputItem,
                {"type": "function_call_output", "call_id": m.tool_call_id, "output": m.content},
            )
        ]
    items: list[TResponseInputItem] = []
    if m.content or not m.tool_calls:
        items.append(cast(TResponseInputItem, {"role": role, "content": m.content}))
    for call in m.tool_calls:
        items.append(
            cast(
                TResponseInputItem,
                {"type": "function_call", "call_id": call.id, "name": call.name, "arguments": call.arguments},
            )
        )
    return items


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _adapters.json_text(value)
    return ""


def _plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The item as a plain dict (a TypedDict is one already; a Mapping of another kind is copied)."""
    return fields if isinstance(fields, dict) else dict(fields)
