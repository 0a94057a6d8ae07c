"""Subscription: one watcher's bounded inbox of feed events."""

from __future__ import annotations

import asyncio
from collections import deque

from chatsession_server.domain import Behind, Closing, Deleted, FeedEvent


class Subscription:
    """A full inbox collapses into a single `Behind`: the watcher then re-reads from the LIST,
    so a slow consumer costs neither memory nor other watchers.

    Most watchers sit idle for minutes, so an idle one holds no queue, task, timer or coroutine:
    only the future it awaits, and a deadline that the feed's sweep checks (asyncio.Event plus
    wait_for cost about 3 KiB more per watcher, and a timer per wait on every delivery)."""

    __slots__ = ("_deadline", "_events", "_limit", "_waiter", "place", "session_id")

    def __init__(self, session_id: str, limit: int) -> None:
        self.session_id = session_id
        self.place = -1  # its index in its channel's list of watchers (the feed's), -1 in none
        self._limit = limit
        self._events: deque[FeedEvent] | None = None  # made on the first event, dropped when drained
        # The future a waiting next() returned, resolved with the event; set only while the
        # inbox is empty.
        self._waiter: asyncio.Future[FeedEvent | None] | None = None
        self._deadline = 0.0  # loop time at which a waiting next() gives up

    def offer(self, event: FeedEvent) -> None:
        if self._answer(event):
            return
        events = self._events
        if events is None:
            events = self._events = deque()
        if isinstance(event, Deleted | Closing):
            events.clear()
        elif len(events) >= self._limit:
            events.clear()
            event = Behind()
        events.append(event)

    def expire(self, now: float) -> None:
        """The feed's sweep: a waiting next() past its deadline returns None."""
        if now >= self._deadline:
            self._answer(None)

    def next(self, timeout: float) -> asyncio.Future[FeedEvent | None]:
        """The next event, or None after `timeout` seconds without one (give or take the feed's
        sweep interval). A future, not a coroutine: an idle watch holds no frame for its wait."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[FeedEvent | None] = loop.create_future()
        events = self._events
        if events:
            answer.set_result(events.popleft())
            if not events:
                self._events = None
        else:
            self._deadline = loop.time() + timeout
            self._waiter = answer
        return answer

    def _answer(self, event: FeedEvent | None) -> bool:
        """Hands `event` to a waiting next(); False if none is waiting (one cancelled is not)."""
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return False
        waiter.set_result(event)
        return True
