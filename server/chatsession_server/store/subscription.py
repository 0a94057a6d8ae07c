"""Subscription: one watcher's bounded inbox of feed events."""

from __future__ import annotations

import asyncio
from collections import deque

from chatsession_server.domain import Behind, Closing, Deleted, FeedEvent


class Subscription:
    """A full inbox collapses into a single `Behind`: the watcher then re-reads from the LIST,
    so a slow consumer never holds up other watchers, and holds at most `limit` events (bounded in
    count: an event may carry the messages of one append).

    Most watchers sit idle for minutes, so an idle one holds no queue, task, timer or coroutine:
    only the future it awaits, and a deadline that the feed's sweep checks (asyncio.Event plus
    wait_for cost about 3 KiB more per watcher, and a timer per wait on every delivery)."""

    __slots__ = ("_deadline", "_events", "_limit", "_waiter", "place", "session_id")

    def __init__(self, session_id: str, limit: int) -> None:
        self.session_id = session_id
        self.place = -1  # its index in its channel's list of watchers (the feed's), -1 in none
        self._limit = limit
        self._events: deque[FeedEvent] | None = None  # made on the first event, dropped when drained
        self._waiter: asyncio.Future[None] | None = None  # what a wait() returned, while it waits
        self._deadline = 0.0  # loop time at which a wait() gives up

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
        self.wake()

    def expire(self, now: float) -> None:
        """The feed's sweep: a wait() past its deadline ends (and take() finds nothing)."""
        if now >= self._deadline:
            self.wake()

    def wake(self) -> None:
        """Ends a pending wait(): an event came, its time is up, or the feed let the watcher go."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wait(self, timeout: float) -> asyncio.Future[None]:
        """Done when take() has an event, or after `timeout` seconds without one (give or take the
        feed's sweep interval). A future, not a coroutine: an idle watch holds no frame for its
        wait. The event stays in the inbox until take(): a waiter cancelled after it woke loses
        nothing."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._events:
            waiter.set_result(None)
        else:
            self._deadline = loop.time() + timeout
            self._waiter = waiter
        return waiter

    def take(self) -> FeedEvent | None:
        """The oldest event in the inbox, or None when it is empty."""
        events = self._events
        if not events:
            return None
        event = events.popleft()
        if not events:
            self._events = None
        return event

    async def next(self, timeout: float) -> FeedEvent | None:
        """The next event, or None after `timeout` seconds without one."""
        await self.wait(timeout)
        return self.take()
