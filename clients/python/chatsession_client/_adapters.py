"""What the framework adapters (chatsession_client.openai_agents, chatsession_client.langchain)
share: one chatsession session seen as a framework's history, created on first write, read newest
first or whole, popped and cleared, through SessionClient (async) or SyncSessionClient (blocking).

The framework's own object travels in each message's `payload`, stored and returned as given;
the message's role, content, tool calls and tokens are filled from it, so the service's windows,
budgets, usage, grpcurl and other clients see the conversation too."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chatsession.v1 import session_pb2
from chatsession_client._calls import Message
from chatsession_client.client import SessionClient
from chatsession_client.errors import AlreadyExistsError, NotFoundError
from chatsession_client.sync import SyncSessionClient

T = TypeVar("T")

# A stored message's role by name (as chatsession_client.message takes it).
ROLE_NAMES = {
    session_pb2.ROLE_SYSTEM: "system",
    session_pb2.ROLE_USER: "user",
    session_pb2.ROLE_ASSISTANT: "assistant",
    session_pb2.ROLE_TOOL: "tool",
}
# The most messages one ListMessages page holds (a larger page_size is cut to it by the server).
PAGE = 1000
# The rule of thumb for English text and code with OpenAI's and most tokenizers: about 4
# characters a token. Used when the framework object carries no count of its own.
CHARS_PER_TOKEN = 4


def estimate_tokens(*texts: str) -> int:
    """About how many tokens `texts` take in a prompt (4 characters a token, at least 1)."""
    return max(1, math.ceil(sum(len(t) for t in texts) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class Creation:
    """How the session is created on first write (CreateSession's fields; 0 and "" mean the
    server's defaults, -1 a session that never expires / keeps every message)."""

    user_id: str
    title: str = ""
    model: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ttl_seconds: int = 0
    max_messages: int = 0

    def options(self) -> dict[str, Any]:
        """create_session's keyword arguments but the user's."""
        return {
            "title": self.title,
            "model": self.model,
            "labels": self.labels,
            "ttl_seconds": self.ttl_seconds,
            "max_messages": self.max_messages,
        }


@dataclass(frozen=True)
class Connection:
    """Where the adapter's own clients connect: SessionClient's / SyncSessionClient's arguments."""

    target: str
    token: str | None
    options: Mapping[str, Any]


async def finish_despite_cancel(write: Awaitable[T]) -> T:
    """Await `write` to its end even when the caller is cancelled meanwhile, then re-raise the
    cancellation: a cancelled add/pop/clear has either happened or not, and the caller learns
    which by reading, as with the Agents SDK's own stores (SQLiteSession, RedisSession)."""
    task = asyncio.ensure_future(write)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # marked as seen: the caller hears of its cancellation instead
        raise cancelled
    return task.result()


class LoopClients:
    """The SessionClient given, or one of its own per event loop that asks (a grpc.aio channel
    belongs to the loop it was made on); a loop that is gone takes its client (and the channel)
    with it."""

    def __init__(self, connection: Connection, given: SessionClient | None) -> None:
        self._connection = connection
        self._given = given
        self._own: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SessionClient] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> SessionClient:
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        own = self._own.get(loop)
        if own is None:
            c = self._connection
            own = self._own[loop] = SessionClient(c.target, token=c.token, **c.options)
        return own

    async def close(self) -> None:
        """Close the running loop's own client (one given stays open: its owner closes it)."""
        own = self._own.pop(asyncio.get_running_loop(), None)
        if own is not None:
            await own.close()


class AsyncHistory:
    """One session through a SessionClient: the client given, or one of its own per event loop
    (a grpc.aio channel belongs to the loop it was made on, and `Runner.run_sync` or
    `asyncio.run` per request give each call a loop of its own)."""

    def __init__(
        self, session_id: str, creation: Creation, connection: Connection, client: SessionClient | None
    ) -> None:
        self.session_id = session_id
        self._creation = creation
        self._clients = LoopClients(connection, client)

    def client(self) -> SessionClient:
        return self._clients.get()

    async def close(self) -> None:
        """Close the client this history made for the running loop (a client it was given stays
        open: its owner closes it)."""
        await self._clients.close()

    async def append(self, messages: Sequence[Message]) -> None:
        """Append in one AppendMessages; the session is created first when it does not exist
        (a creator that loses the race finds it made, which is as good)."""
        if not messages:
            return
        client = self.client()
        # One id for both attempts: the first is refused whole (NOT_FOUND) or stored once.
        request_id = uuid.uuid4().hex
        try:
            await client.append(self.session_id, messages, request_id=request_id)
            return
        except NotFoundError:
            pass
        creation = self._creation
        with contextlib.suppress(AlreadyExistsError):
            await client.create_session(creation.user_id, session_id=self.session_id, **creation.options())
        await client.append(self.session_id, messages, request_id=request_id)

    async def newest(self, limit: int | None) -> list[Message]:
        """The newest `limit` stored messages, oldest first (every one when None; none for 0 or
        less); none when the session does not exist."""
        if limit is not None and limit <= 0:
            return []
        client = self.client()
        try:
            if limit is None:
                return [m async for m in _all(client, self.session_id)]
            page = await client.list_messages(self.session_id, page_size=min(limit, PAGE))
            found = list(page.messages)
            while len(found) < limit and page.has_more and found:
                page = await client.list_messages(
                    self.session_id, page_size=min(limit - len(found), PAGE), before_seq=found[0].seq
                )
                found[:0] = page.messages
            return found
        except NotFoundError:
            return []

    async def pop(self) -> Message | None:
        """Remove the newest message and return it (one TruncateMessages); None when there is none."""
        try:
            return await self.client().pop_message(self.session_id)
        except NotFoundError:
            return None

    async def clear(self) -> None:
        """Empty the history; the session (its metadata, counters and usage) stays."""
        with contextlib.suppress(NotFoundError):
            await self.client().clear_messages(self.session_id)


async def _all(client: SessionClient, session_id: str) -> AsyncIterator[Message]:
    async for m in client.iter_messages(session_id, page_size=PAGE):
        yield m


class SyncHistory:
    """The blocking twin of AsyncHistory, over one SyncSessionClient (shared between threads)."""

    def __init__(
        self, session_id: str, creation: Creation, connection: Connection, client: SyncSessionClient | None
    ) -> None:
        self.session_id = session_id
        self._creation = creation
        self._connection = connection
        self._given = client
        self._own: SyncSessionClient | None = None

    def client(self) -> SyncSessionClient:
        if self._given is not None:
            return self._given
        if self._own is None:
            c = self._connection
            self._own = SyncSessionClient(c.target, token=c.token, **c.options)
        return self._own

    def close(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            own.close()

    def append(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        client = self.client()
        request_id = uuid.uuid4().hex
        try:
            client.append(self.session_id, messages, request_id=request_id)
            return
        except NotFoundError:
            pass
        creation = self._creation
        with contextlib.suppress(AlreadyExistsError):
            client.create_session(creation.user_id, session_id=self.session_id, **creation.options())
        client.append(self.session_id, messages, request_id=request_id)

    def all(self) -> list[Message]:
        try:
            return list(self.client().iter_messages(self.session_id, page_size=PAGE))
        except NotFoundError:
            return []

    def clear(self) -> None:
        with contextlib.suppress(NotFoundError):
            self.client().clear_messages(self.session_id)


def json_text(parts: Iterable[Any]) -> str:
    """The text of a framework's content parts (dicts with a "text" or "refusal", or strings),
    joined by newlines; a part with neither stands as `[<its type>]`."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, Mapping):
            text = part.get("text", part.get("refusal"))
            out.append(text if isinstance(text, str) else f"[{part.get('type', 'part')}]")
    return "\n".join(out)
