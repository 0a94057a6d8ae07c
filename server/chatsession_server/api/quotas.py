"""Quotas: how much of one server its callers may hold (README "Quotas").

`WatchQuota` counts open WatchMessages streams, per process and per client connection, in one
place: an interceptor that admits a stream before the watch subscribes anything and lets it go
in a `finally` (a stream that ends, fails, or is cancelled by its client). `SessionQuota` is the
servicer's storage with a limit on each user's live sessions, checked at create.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc import aio

from chatsession_server.api.interceptors import Handler, WrappingInterceptor
from chatsession_server.api.storage_layer import StorageLayer
from chatsession_server.domain import (
    NewFork,
    NewSession,
    Owned,
    Session,
)
from chatsession_server.errors import QuotaExceeded, SessionNotFound
from chatsession_server.ports import SessionStorage


class WatchQuota(WrappingInterceptor):
    """Refuses a WatchMessages stream (RESOURCE_EXHAUSTED) beyond `max_watchers` open in this
    server or `max_per_connection` open on the caller's connection (`context.peer()`, the remote
    address and port of one HTTP/2 connection).

    The counts belong to this object, not the module: servers sharing a process count apart.
    grpc.aio runs every call on one event loop and the check and the increment have no await
    between them, so no lock is needed.
    """

    def __init__(self, watch_method: str, *, max_watchers: int, max_per_connection: int) -> None:
        super().__init__()
        self._method = watch_method
        self._max = max_watchers
        self._max_per_connection = max_per_connection
        self._open = 0
        self._open_by_peer: dict[str, int] = {}

    @property
    def watchers(self) -> int:
        """WatchMessages streams open now."""
        return self._open

    def _admit(self, peer: str) -> None:
        if self._open >= self._max:
            raise QuotaExceeded(
                "max_watchers",
                self._max,
                "server",
                f"this server holds {self._open} WatchMessages streams, its limit (--max-watchers): "
                "retry later or on another replica",
            )
        held = self._open_by_peer.get(peer, 0)
        if held >= self._max_per_connection:
            raise QuotaExceeded(
                "max_watchers_per_connection",
                self._max_per_connection,
                f"connection {peer}",
                f"this connection holds {held} WatchMessages streams, the limit per connection "
                "(--max-watchers-per-connection): close some or open another connection",
            )
        self._open += 1
        self._open_by_peer[peer] = held + 1

    def _release(self, peer: str) -> None:
        self._open -= 1
        held = self._open_by_peer[peer] - 1
        if held:
            self._open_by_peer[peer] = held
        else:  # a connection's entry goes with its last stream: no growth with connections seen
            del self._open_by_peer[peer]

    def applies(self, method: str, handler: Handler) -> bool:
        # Not a stream: the stand-in that answers UNAVAILABLE while the server waits for Valkey.
        return method == self._method and handler.unary_stream is not None

    def wrap(self, handler: Handler, method: str) -> Handler:
        return self.rebuilt(handler, stream=self._admitted_stream)

    def _admitted_stream(self, produce: Any) -> Any:
        # `produce` makes the stream's async iterator; grpc's stubs type it as sync.
        def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> _Admitted:
            peer = context.peer()
            self._admit(peer)  # raises before the watch below has joined the feed
            try:
                return _Admitted(produce(request, context), self, peer)
            except BaseException:
                self._release(peer)
                raise

        return stream


class _Admitted:
    """A watch stream holding its place in the quota, which it gives back once, when it ends or
    is closed. An object, not an async generator: an idle stream holds no generator frame here
    (about 0.35 KiB less per idle watcher)."""

    __slots__ = ("_items", "_loop", "_peer", "_quota")

    def __init__(self, items: Any, quota: WatchQuota, peer: str) -> None:
        self._items = items
        self._quota: WatchQuota | None = quota  # None once the place is given back
        self._peer = peer
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> _Admitted:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._items.__anext__()
        except BaseException:  # the end, an error or a cancellation: the place goes back now
            await self.aclose()
            raise

    async def aclose(self) -> None:
        quota, self._quota = self._quota, None
        if quota is None:
            return
        try:
            await self._items.aclose()
        finally:
            quota._release(self._peer)

    def __del__(self) -> None:
        # Dropped without aclose(): give the place back on the loop (the collector may run in
        # another thread), as asyncio finalizes an async generator.
        quota = self._quota
        if quota is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self._loop.call_soon_threadsafe(quota._release, self._peer)


class SessionQuota(StorageLayer):
    """The store with at most `max_sessions_per_user` live sessions per user, checked at create.

    A soft limit: the count (a listing of up to that many of the user's sessions) and the create
    are two steps, so creates racing for a user's last free place can each succeed and overshoot
    by their number. A create of a session that already exists (a retry with its request_id)
    always reaches the store, which replays it or says ALREADY_EXISTS, as without a limit.
    """

    def __init__(self, store: SessionStorage, max_sessions_per_user: int) -> None:
        super().__init__(store)
        self._max = max_sessions_per_user

    async def create(self, new: NewSession) -> tuple[Session, bool]:
        await self._check(new.user_id, new.session_id)
        return await self._inner.create(new)

    async def fork(self, fork: NewFork, *, owners: Owned = None) -> tuple[Session, bool]:
        """A fork is a new session of the source's owner: it counts as a create. With the source
        gone, the store decides: a retry gets the fork its first attempt made, else NOT_FOUND."""
        try:
            source = await self._inner.get(fork.source_id, owners=owners)
        except SessionNotFound:
            return await self._inner.fork(fork, owners=owners)
        await self._check(source.user_id, fork.session_id)
        return await self._inner.fork(fork, owners=owners)

    async def _check(self, user_id: str, session_id: str) -> None:
        if await self._live_sessions(user_id) >= self._max and not await self._exists(session_id):
            raise QuotaExceeded(
                "max_sessions_per_user",
                self._max,
                f"user {user_id}",
                f"user {user_id!r} has {self._max} live sessions, the limit per user "
                "(--max-sessions-per-user): delete some first",
            )

    async def _live_sessions(self, user_id: str) -> int:
        """The user's live sessions, counted up to the limit (a page may stop short of it: pages
        are cut by bytes too)."""
        counted, cursor = 0, None
        while True:
            page = await self._inner.list_sessions(user_id, self._max - counted, cursor)
            counted += len(page.sessions)
            cursor = page.next_cursor
            if counted >= self._max or cursor is None:
                return counted

    async def _exists(self, session_id: str) -> bool:
        try:
            await self._inner.get(session_id)
        except SessionNotFound:
            return False
        return True
