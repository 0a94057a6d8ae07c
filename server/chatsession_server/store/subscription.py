"""Subscription: one watcher's bounded inbox of feed events."""

from __future__ import annotations

import asyncio
from collections import deque

from chatsession_server.domain import Behind, Closing, Deleted, FeedEvent


class Subscription:
    """A full inbox collapses into a single `Behind`: the watcher then re-reads from the LIST,
    so a slow consumer costs neither memory nor other watchers.

    Most watchers sit idle for minutes, so an idle one holds no queue, task or timer: only a
    future while it waits, and a deadline that the feed's sweep checks (asyncio.Event plus
    wait_for cost about 3 KiB more per watcher, and a timer per wait on every delivery)."""

    __slots__ = ("_deadline", "_events", "_limit", "_waiter", "session_id")

    def __init__(self, session_id: str, limit: int) -> None:
        self.session_id = session_id
        self._limit = limit
        self._events: deque[FeedEvent] | None = None  # made on the first event, dropped when drained
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # loop time at which a waiting next() gives up

    def offer(self, event: FeedEvent) -> None:
        events = self._events
        if events is None:
            events = self._events = deque()
        if isinstance(event, Deleted | Closing):
            events.clear()
        elif len(events) >= self._limit:
            events.clear()
            event = Behind()
        events.append(event)
        _wake(self._waiter)

    def expire(self, now: float) -> None:
        """The feed's sweep: a waiting next() past its deadline returns None."""
        if now >= self._deadline:
            _wake(self._waiter)

    async def next(self, timeout: float) -> FeedEvent | None:
        """The next event, or None after `timeout` seconds without one (give or take the feed's
        sweep interval)."""
        if not self._events:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + timeout
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._events:
                return None
        events = self._events
        event = events.popleft()
        if not events:
            self._events = None
        return event


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
