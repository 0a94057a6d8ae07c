"""chatsession as a LangChain chat message history (`pip install 'chatsession-client[langchain]'`).

    from langchain_core.runnables.history import RunnableWithMessageHistory
    from chatsession_client import SyncSessionClient
    from chatsession_client.langchain import ChatsessionChatMessageHistory

    client = SyncSessionClient("localhost:50051")  # one channel for every history
    chain = RunnableWithMessageHistory(
        prompt | model,
        lambda session_id: ChatsessionChatMessageHistory(session_id, user_id="alice", sync_client=client),
        input_messages_key="question",
        history_messages_key="history",
    )

`ChatsessionChatMessageHistory` implements `langchain_core.chat_history.BaseChatMessageHistory`,
blocking (`messages`, `add_messages`, `clear`) and asyncio (`aget_messages`, `aadd_messages`,
`aclear`) without threads in between. Each message is stored as LangChain serializes it
(`message_to_dict`: its type, content, id, name, additional_kwargs, response_metadata, tool calls,
usage_metadata, chunk fields) in its chatsession message's `payload`, and comes back equal, of
the same class (an `AIMessageChunk` stays one). Role, content, tool calls and tokens are derived
for the service's own use (windows, token budgets, usage, grpcurl, other clients): see
`message_of`.

Errors are chatsession_client's: `ChatSessionError` subclasses (`InvalidArgumentError` naming
the refused field, `PermissionDeniedError`, `UnavailableError` after the client's retries, ...);
a message whose fields are not JSON (bytes, objects in `additional_kwargs`) raises `TypeError`
or `ValueError` before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.messages.tool import ToolCall

from chatsession_client import _adapters
from chatsession_client._calls import Message, message
from chatsession_client._payload import payload_of
from chatsession_client.client import SessionClient
from chatsession_client.sync import SyncSessionClient

__all__ = ["ChatsessionChatMessageHistory", "message_of", "stored_message"]

TokenCounter = Callable[[BaseMessage], int]
MAX_NAME_LENGTH = 256  # Message.name's limit: a longer name stays in the payload only
_CHAT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "ai": "assistant",
               "system": "system", "developer": "system", "tool": "tool", "function": "tool"}  # fmt: skip


class ChatsessionChatMessageHistory(BaseChatMessageHistory):
    """A LangChain chat history kept by a chatsession server.

    `session_id` names the chatsession session; it is created on the first `add_messages` for
    `user_id` (with `title`, `model`, `labels`, `ttl_seconds` and `max_messages` as in
    CreateSession: 0 for the server's defaults, -1 for a session that never expires or keeps
    every message), and reads of a session not yet created find it empty.

    Connects to `target` with `token` (the caller's bearer token) and `client_options` (the
    other keyword arguments of `chatsession_client.SessionClient`: `tls`, `root_certificates`,
    `timeout`, `retry`, ...): a blocking channel for the blocking methods, an asyncio one per
    event loop for the async ones, each opened on first use. Or uses `client` (a SessionClient)
    and `sync_client` (a SyncSessionClient) shared by many histories (then `close()` and
    `aclose()` leave them open). `count_tokens` gives a message's tokens for the service's
    budgets (default: an AI message's `usage_metadata["output_tokens"]`, else about 4
    characters a token of its text and tool call arguments).
    """

    def __init__(
        self,
        session_id: str,
        *,
        user_id: str,
        target: str = "localhost:50051",
        token: str | None = None,
        client: SessionClient | None = None,
        sync_client: SyncSessionClient | None = None,
        title: str = "",
        model: str = "",
        labels: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
        max_messages: int = 0,
        count_tokens: TokenCounter | None = None,
        **client_options: Any,
    ) -> None:
        self.session_id = session_id
        creation = _adapters.Creation(
            user_id, title, model, dict(labels or {}), ttl_seconds=ttl_seconds, max_messages=max_messages
        )
        connection = _adapters.Connection(target, token, client_options)
        self._async = _adapters.AsyncHistory(session_id, creation, connection, client)
        self._sync = _adapters.SyncHistory(session_id, creation, connection, sync_client)
        self._count_tokens = count_tokens

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Every stored message, oldest first."""
        return [stored_message(m) for m in self._sync.all()]

    async def aget_messages(self) -> list[BaseMessage]:
        return [stored_message(m) for m in await self._async.newest(None)]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append `messages` in order, in one call (all of them or none)."""
        self._sync.append([message_of(m, self._count_tokens) for m in messages])

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        converted = [message_of(m, self._count_tokens) for m in messages]
        await _adapters.finish_despite_cancel(self._async.append(converted))

    def clear(self) -> None:
        """Remove every message (the chatsession session, its counters and usage stay)."""
        self._sync.clear()

    async def aclear(self) -> None:
        await _adapters.finish_despite_cancel(self._async.clear())

    def close(self) -> None:
        """Close the blocking channel this history opened (not a `sync_client` it was given)."""
        self._sync.close()

    async def aclose(self) -> None:
        """Close the asyncio channel this history opened (not a `client` it was given)."""
        await self._async.close()


def message_of(m: BaseMessage, count_tokens: TokenCounter | None = None) -> Message:
    """The chatsession message that stores `m` (LangChain's `message_to_dict(m)` in its payload):
    its role (human: user, ai: assistant, system, tool and function: tool, a ChatMessage's own
    role when it is one of those), its content's text (text blocks joined by newlines,
    `[image]` for a block without text), an AI message's tool calls (id, name, JSON arguments),
    a tool message's `tool_call_id`, its name, and its tokens."""
    role = _role(m)
    text = m.content if isinstance(m.content, str) else _adapters.json_text(m.content)
    tool_calls: list[tuple[str, str, str]] = []
    if isinstance(m, AIMessage):
        tool_calls = [
            (call.get("id") or "", call["name"][:MAX_NAME_LENGTH] or "tool", json.dumps(call["args"]))
            for call in m.tool_calls
        ]
    role_name = "assistant" if tool_calls else role
    if not text and not tool_calls:
        text = f"[{m.type}]"
    if count_tokens is not None:
        tokens = count_tokens(m)
    elif isinstance(m, AIMessage) and m.usage_metadata:
        tokens = m.usage_metadata["output_tokens"]
    else:
        tokens = _adapters.estimate_tokens(text, *(arguments for _, _, arguments in tool_calls))
    name = m.name if m.name and len(m.name) <= MAX_NAME_LENGTH else ""
    return message(
        role_name,
        text,
        tokens=tokens,
        name=name,
        tool_calls=tool_calls,
        tool_call_id=m.tool_call_id if isinstance(m, ToolMessage) else "",
        payload=message_to_dict(m),
    )


def stored_message(m: Message) -> BaseMessage:
    """The LangChain message a stored message is: its payload as `message_of` stored it, or for a
    message another client appended (no payload) the message of its role, with its content,
    name, tool calls (arguments that are not a JSON object are kept under "arguments") and
    tool call id."""
    stored = payload_of(m)
    if isinstance(stored, dict) and "type" in stored and "data" in stored:
        return messages_from_dict([stored])[0]
    role = _adapters.ROLE_NAMES.get(m.role, "user")
    name = m.name or None
    if role == "system":
        return SystemMessage(m.content, name=name)
    if role == "tool":
        return ToolMessage(m.content, tool_call_id=m.tool_call_id, name=name)
    if role == "assistant":
        calls = [ToolCall(name=c.name, args=_arguments(c.arguments), id=c.id or None) for c in m.tool_calls]
        return AIMessage(m.content, tool_calls=calls, name=name)
    return HumanMessage(m.content, name=name)


def _role(m: BaseMessage) -> str:
    if isinstance(m, HumanMessage):
        return "user"
    if isinstance(m, AIMessage):
        return "assistant"
    if isinstance(m, SystemMessage):
        return "system"
    if isinstance(m, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(m, ChatMessage):
        return _CHAT_ROLES.get(m.role.lower(), "user")
    return _CHAT_ROLES.get(m.type.lower().removesuffix("messagechunk"), "user")


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}
