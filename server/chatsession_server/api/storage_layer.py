"""StorageLayer: the base of the storage layers the API puts around the store (authorization in
auth.py, quotas in quotas.py), each overriding only the calls it changes."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from chatsession_server.domain import (
    AppendResult,
    Compaction,
    CompactResult,
    Context,
    ContextQuery,
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
from chatsession_server.ports import SessionStorage


class StorageLayer:
    """A SessionStorage that hands every call to `inner`: a layer (authorization, quotas)
    overrides only the calls it changes."""

    def __init__(self, inner: SessionStorage) -> None:
        self._inner = inner

    async def create(self, new: NewSession) -> tuple[Session, bool]:
        return await self._inner.create(new)

    async def get(
        self,
        session_id: str,
        *,
        owners: Owned = None,
        fields: Collection[str] | None = None,
    ) -> Session:
        return await self._inner.get(session_id, owners=owners, fields=fields)

    async def update(self, session_id: str, patch: SessionPatch, *, owners: Owned = None) -> Session:
        return await self._inner.update(session_id, patch, owners=owners)

    async def delete(self, session_id: str, *, owners: Owned = None) -> bool:
        return await self._inner.delete(session_id, owners=owners)

    async def list_sessions(
        self, user_id: str, limit: int, cursor: SessionCursor | None, *, app: str = ""
    ) -> SessionPage:
        return await self._inner.list_sessions(user_id, limit, cursor, app=app)

    async def append(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        request_id: str = "",
        expected_last_seq: int | None = None,
        owners: Owned = None,
        state_delta: StateDelta | None = None,
    ) -> AppendResult:
        return await self._inner.append(
            session_id,
            messages,
            request_id=request_id,
            expected_last_seq=expected_last_seq,
            owners=owners,
            state_delta=state_delta,
        )

    async def list_messages(
        self, session_id: str, query: MessageQuery, *, owners: Owned = None
    ) -> MessagePage:
        return await self._inner.list_messages(session_id, query, owners=owners)

    async def fork(self, fork: NewFork, *, owners: Owned = None) -> tuple[Session, bool]:
        return await self._inner.fork(fork, owners=owners)

    async def user_usage(self, user_id: str) -> UserUsage:
        return await self._inner.user_usage(user_id)

    async def get_context(self, session_id: str, query: ContextQuery, *, owners: Owned = None) -> Context:
        return await self._inner.get_context(session_id, query, owners=owners)

    async def compact(
        self, session_id: str, compaction: Compaction, *, owners: Owned = None
    ) -> CompactResult:
        return await self._inner.compact(session_id, compaction, owners=owners)

    async def clear(
        self,
        session_id: str,
        *,
        keep_system_prompt: bool,
        request_id: str = "",
        owners: Owned = None,
    ) -> Session:
        return await self._inner.clear(
            session_id, keep_system_prompt=keep_system_prompt, request_id=request_id, owners=owners
        )

    async def get_state(
        self, scope: StateScope, keys: Sequence[str] = (), *, owners: Owned = None
    ) -> dict[str, str]:
        return await self._inner.get_state(scope, keys, owners=owners)

    async def update_state(
        self, scope: StateScope, delta: StateDelta, *, owners: Owned = None
    ) -> dict[str, str]:
        return await self._inner.update_state(scope, delta, owners=owners)

    async def truncate(
        self, session_id: str, truncation: Truncation, *, owners: Owned = None
    ) -> TruncateResult:
        return await self._inner.truncate(session_id, truncation, owners=owners)
