"""What the API layer needs from storage, as a Protocol: the servicer depends on this, not on GLIDE."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence
from typing import Protocol, TypeVar

from chatsession_server.domain import (
    AppendResult,
    Compaction,
    CompactResult,
    Context,
    ContextQuery,
    FeedEvent,
    MessagePage,
    MessageQuery,
    NewFork,
    NewMessage,
    NewSession,
    Owned,
    Session,
    SessionCursor,
    SessionPage,
    SessionPatch,
    StateDelta,
    StateScope,
    TruncateResult,
    Truncation,
    UserUsage,
)

T = TypeVar("T")


class SessionStorage(Protocol):
    """`owners`, where taken: the user ids whose sessions the caller may touch (None: anyone's),
    or an `Owners` (those users' sessions of some apps only). A session of another user (or
    app) is SessionNotFound (delete: False), checked in the same atomic step as the operation, so
    no owner can change in between."""

    async def create(self, new: NewSession) -> tuple[Session, bool]: ...

    async def get(
        self,
        session_id: str,
        *,
        owners: Owned = None,
        fields: Collection[str] | None = None,
    ) -> Session:
        """`fields`: read only these (GetSession's read_mask paths); None reads every field."""
        ...

    async def update(self, session_id: str, patch: SessionPatch, *, owners: Owned = None) -> Session: ...

    async def delete(self, session_id: str, *, owners: Owned = None) -> bool: ...

    async def list_sessions(
        self, user_id: str, limit: int, cursor: SessionCursor | None, *, app: str = ""
    ) -> SessionPage: ...

    async def append(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        request_id: str = "",
        expected_last_seq: int | None = None,
        owners: Owned = None,
        state_delta: StateDelta | None = None,
    ) -> AppendResult: ...

    async def list_messages(
        self, session_id: str, query: MessageQuery, *, owners: Owned = None
    ) -> MessagePage: ...

    async def fork(self, fork: NewFork, *, owners: Owned = None) -> tuple[Session, bool]: ...

    async def user_usage(self, user_id: str) -> UserUsage: ...
    async def get_context(self, session_id: str, query: ContextQuery, *, owners: Owned = None) -> Context: ...

    async def compact(
        self, session_id: str, compaction: Compaction, *, owners: Owned = None
    ) -> CompactResult: ...

    async def clear(
        self,
        session_id: str,
        *,
        keep_system_prompt: bool,
        request_id: str = "",
        owners: Owned = None,
    ) -> Session: ...

    async def get_state(
        self, scope: StateScope, keys: Sequence[str] = (), *, owners: Owned = None
    ) -> dict[str, str]:
        """A session's state, a user's or an app's (key -> the value's JSON text); with `keys`,
        those it holds. `owners` is checked for a session's state only."""
        ...

    async def update_state(
        self, scope: StateScope, delta: StateDelta, *, owners: Owned = None
    ) -> dict[str, str]:
        """Applies `delta` atomically; the whole state after it."""
        ...

    async def truncate(
        self, session_id: str, truncation: Truncation, *, owners: Owned = None
    ) -> TruncateResult: ...


class FeedSubscription(Protocol):
    session_id: str

    def wait(self, timeout: float) -> Awaitable[None]:
        """Done when take() has an event, or after `timeout` seconds (then take() gives None)."""
        ...

    def take(self) -> FeedEvent | None: ...

    async def next(self, timeout: float) -> FeedEvent | None:
        """wait() then take()."""
        ...


class MessageFeed(Protocol):
    """Live announcements of appends and deletions, per session (see store/feed.py)."""

    async def join(self, session_id: str) -> FeedSubscription: ...

    async def leave(self, subscription: FeedSubscription) -> None: ...

    async def read(self, fetch: Callable[[], Awaitable[T]]) -> T:
        """A watcher's own read of the store; its failure never marks the store unreachable."""
        ...

    async def read_shared(
        self, subscription: FeedSubscription, key: Hashable, fetch: Callable[[], Awaitable[T]]
    ) -> T:
        """`fetch()` once for all the session's watchers here asking with an equal key meanwhile."""
        ...
