"""Subscription: one watcher's inbox of feed events, bounded in bytes."""

from __future__ import annotations

import asyncio
from collections import deque

from chatsession_server.domain import Behind, Closing, Deleted, FeedEvent

# What an event costs the inbox beyond the messages it carries: its objects and the inbox's entry.
# Counted so that a flood of small events is bounded by the same byte limit as large ones.
EVENT_OVERHEAD = 256


class Subscription:
    """A watcher's inbox holds at most `limit_bytes` of events (counted by the bytes of the
    messages they carry, plus EVENT_OVERHEAD each), except a single event, which always fits.
    When a new event does not fit, the oldest are dropped for it and a `Behind` put in their
    place: the watcher, when it reads again, re-reads from the LIST by seq what it missed, then
    goes on with the newest events it kept. So a watcher that stops reading holds a bounded
    number of bytes, and the events it holds are the feed's own objects, shared with every other
    watcher of the session (a session's stalled watchers all keep its newest events: one copy).

    Most watchers sit idle for minutes, so an idle one holds no queue, task, timer or coroutine:
    only the future it awaits, and a deadline that the feed's sweep checks (asyncio.Event plus
    wait_for cost about 3 KiB more per watcher, and a timer per wait on every delivery)."""

    __slots__ = ("_deadline", "_events", "_held", "_limit", "_waiter", "place", "session_id")

    def __init__(self, session_id: str, limit_bytes: int) -> None:
        self.session_id = session_id
        self.place = -1  # its index in its channel's list of watchers (the feed's), -1 in none
        self._limit = limit_bytes
        # (event, its cost) pairs; made on the first event, dropped when drained.
        self._events: deque[tuple[FeedEvent, int]] | None = None
        self._held = 0  # the costs of the events in the inbox
        self._waiter: asyncio.Future[None] | None = None  # what a wait() returned, while it waits
        self._deadline = 0.0  # loop time at which a wait() gives up

    def offer(self, event: FeedEvent, size: int = 0) -> None:
        """`size`: the bytes of the messages `event` carries (0 for one that carries none)."""
        events = self._events
        if events is None:
            events = self._events = deque()
        cost = size + EVENT_OVERHEAD
        if isinstance(event, Deleted | Closing):
            events.clear()  # the watch ends: nothing before it matters
            self._held = 0
        elif events and self._held + cost > self._limit:
            while events and self._held + cost + EVENT_OVERHEAD > self._limit:
                self._held -= events.popleft()[1]
            if not events or not isinstance(events[0][0], Behind):
                events.appendleft((Behind(), EVENT_OVERHEAD))
                self._held += EVENT_OVERHEAD
        events.append((event, cost))
        self._held += cost
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
        event, cost = events.popleft()
        self._held -= cost
        if not events:
            self._events = None
        return event

    async def next(self, timeout: float) -> FeedEvent | None:
        """The next event, or None after `timeout` seconds without one."""
        await self.wait(timeout)
        return self.take()
