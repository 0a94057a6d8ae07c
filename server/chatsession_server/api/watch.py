"""WatchMessages as domain logic: backlog from the LIST, then live events, by seq, exactly once.

The watcher joins the feed BEFORE reading the backlog, so nothing appended in between is missed;
events at or below its cursor are dropped, so nothing is delivered twice; any event it cannot
chain onto its cursor sends it back to the LIST, which is the source of truth.

A compaction's summary met in the LIST is announced as `Compacted` (the range it replaced; the
client reads the summary with GetContext or ListMessages) and moves the cursor to its seq; so is
the compaction's publish, unless a read announced that compaction or a newer one already (each
compaction and clear carries the session's count of them, its `rewrite`, which the LIST returns
too). A clear is announced as `Cleared` and moves the cursor to the tail it left. A watch resumed
with after_seq at or before the seq of the session's last clear is told of it first (at most
once: one resumed right at that seq may have seen it already); one resumed before a summary's
seq meets the summary in its read, but one resumed past it is not told of a compaction it
missed (nothing tells it from one it saw). A truncation is announced as `Truncated` from its
publish; a read passes the holes it left in the window silently (unlike the seqs the window
trimmed), but a watch resumed within the seqs the latest truncation removed (and those of earlier
ones it reached into) is told of it first, as of a clear. A watch that later reads past a clear, a
truncation or a compaction it was not told of (its event dropped from a full inbox) is told of it
then, once, before the messages after it: a compaction from the session's record of the latest
one (its range takes in the earlier ones), while its summary is stored and at or below the
cursor (one after it is met in the read); a compaction whose summary a clear or truncation
removed since is not told. What the session held when the watch began (as its first read shows
it, or as it joined for a watch from the tail, whose first read may come only when its inbox
overflows) is not told by a later read. Announcements come from publishes and reads, so one
published while Valkey was unreachable may not be made; the messages never miss.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from chatsession_server.domain import (
    Appended,
    Behind,
    Cleared,
    Closing,
    Compacted,
    Deleted,
    FeedEvent,
    Heartbeat,
    MessagePage,
    MessageQuery,
    Trimmed,
    Truncated,
    WatchEvent,
)
from chatsession_server.errors import PreconditionFailed, SessionNotFound, ShuttingDown
from chatsession_server.ports import FeedSubscription, MessageFeed, SessionStorage

READ_PAGE = 200

T = TypeVar("T")


class Watch(Generic[T]):
    """A session's events, each as `present` makes it (the servicer's protobuf): the servicer
    returns this iterator as it is, with no converting one of its own around it. What iterates it
    is the interceptors' own stream wrappers (the watch quota's always; auth's and tracing's when
    they are on), then the error mapping's coroutine, which writes each event to the call.

    An async iterator whose state is these fields, not a generator's frame: an idle watch holds
    this object and the coroutine of the __anext__ waiting on its subscription (a generator held
    about 0.3 KiB more: a bigger frame, its asend object, the event loop's weak reference to it).
    End it with aclose(), which leaves the feed; as with a generator, an error ends it too, and
    one dropped unclosed leaves the feed from its loop."""

    __slots__ = (
        "_after_seq",
        "_baseline",
        "_clear_seen",
        "_cleared_at",
        "_compaction_seen",
        "_cursor",
        "_feed",
        "_first_read",
        "_heartbeat_seconds",
        "_loop",
        "_must_read",
        "_owner",
        "_page_bytes",
        "_present",
        "_ready",
        "_resumed",
        "_session_id",
        "_storage",
        "_subscription",
        "_truncation_seen",
    )

    def __init__(
        self,
        storage: SessionStorage,
        feed: MessageFeed,
        session_id: str,
        after_seq: int | None,
        *,
        heartbeat_seconds: float,
        present: Callable[[WatchEvent], T],
        page_bytes: int | None = None,
    ) -> None:
        self._storage = storage
        self._feed: MessageFeed | None = feed  # None once closed
        self._session_id = session_id
        self._after_seq = after_seq
        self._heartbeat_seconds = heartbeat_seconds
        self._present = present
        self._page_bytes = page_bytes  # a read's page stops short of it (None: the store's bound)
        self._subscription: FeedSubscription | None = None  # joined on the first __anext__
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it joined on
        self._owner = ""
        self._cursor = 0  # the seq of the last message delivered (or read past)
        self._resumed = False
        self._must_read = False  # the next events come from the LIST, not the feed
        self._first_read = True
        # The newest rewrite (see the module docstring) of each kind announced, or read past: a
        # publish numbered at or below it is not announced (again).
        self._compaction_seen = self._clear_seen = self._truncation_seen = 0
        # The session's rewrites as this watch began (its first read, or its start at the tail):
        # a later read tells of no compaction or truncation numbered at or below it, one made
        # before the watch (a watch resumed past a summary is not told of it) or whose publish,
        # in the inbox, tells of it.
        self._baseline = 0
        self._cleared_at = 0  # the session's cleared_at_seq as of the last clear this watch knows of
        self._ready: deque[WatchEvent] | None = None  # events to deliver, in order; None when none

    def __aiter__(self) -> Watch[T]:
        return self

    async def __anext__(self) -> T:
        try:
            while not self._ready:
                feed, subscription = self._feed, self._subscription
                if feed is None:
                    raise StopAsyncIteration  # closed (or ended by an error): as a generator would
                if subscription is None:
                    await self._start(feed)
                elif self._must_read:
                    await self._read(feed, subscription)
                else:
                    await subscription.wait(self._heartbeat_seconds)
                    if self._feed is not None:
                        self._take(subscription.take())
                if self._feed is None:
                    raise StopAsyncIteration  # aclose() while this waited
        except BaseException as exc:
            if not isinstance(exc, StopAsyncIteration):
                await self.aclose()  # ended by it: leaves the feed, and a next call ends at once
            raise
        event = self._ready.popleft()
        if not self._ready:
            self._ready = None
        return self._present(event)

    async def aclose(self) -> None:
        """Leaves the feed; an __anext__ waiting meanwhile ends (StopAsyncIteration)."""
        feed, self._feed = self._feed, None
        self._ready = None
        if feed is not None and self._subscription is not None:
            await feed.leave(self._subscription)

    def __del__(self) -> None:
        # Dropped without aclose(): leave the feed from the loop, as asyncio finalizes an async
        # generator (its aclose() scheduled on the loop it ran on).
        feed, subscription, loop = self._feed, self._subscription, self._loop
        if feed is None or subscription is None or loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile: nothing to leave
            loop.call_soon_threadsafe(_leave_later, loop, feed, subscription)

    def _emit(self, event: WatchEvent) -> None:
        if self._ready is None:
            self._ready = deque()
        self._ready.append(event)

    async def _start(self, feed: MessageFeed) -> None:
        subscription = await feed.join(self._session_id)
        if self._feed is None:  # aclose() while joining: nobody is left to leave for it
            await feed.leave(subscription)
            raise StopAsyncIteration
        self._subscription = subscription
        self._loop = asyncio.get_running_loop()
        self._session_id = subscription.session_id  # the feed's copy, one for all its watchers
        session = await feed.read(lambda: self._storage.get(self._session_id))
        # Only these two: the whole session (its title, labels...) is not held by each idle watch.
        # Not sys.intern'ed: interned strings are immortal on Python 3.12, one per user ever seen.
        self._owner, last_seq = session.user_id, session.message_count
        after_seq = self._after_seq
        if after_seq is not None and after_seq > last_seq:
            raise PreconditionFailed(
                "AFTER_SEQ_AHEAD",
                "after_seq",
                f"after_seq {after_seq} is beyond the session's last seq {last_seq} (was it re-created?)",
            )
        self._cursor = last_seq if after_seq is None else after_seq
        # A resumed watch reads even at the tail: it may have missed a clear there.
        self._resumed = after_seq is not None and after_seq > 0
        self._must_read = self._cursor < last_seq or self._resumed
        if not self._must_read:
            # From the tail: the session as it joined is the baseline a first read would be (its
            # first read may come only when its inbox overflows, after what it must be told of).
            self._first_read = False
            self._baseline, self._cleared_at = session.rewrites, session.cleared_at_seq
        self._emit(Heartbeat(self._cursor))  # live from here: the resume point

    async def _read(self, feed: MessageFeed, subscription: FeedSubscription) -> None:
        """A page of the LIST after the cursor; the last one ends the read. One read serves every
        watcher of the session in this process at the same cursor (they fall back together when
        a large append is only announced): the page is shared, never changed. It is read as the
        session's owner's, so a namesake of another user's is not found (the watch ends)."""
        cursor, owners = self._cursor, (self._owner,)
        query = MessageQuery(limit=READ_PAGE, after_seq=cursor, max_bytes=self._page_bytes)
        page = await feed.read_shared(
            subscription,
            (query, self._owner),
            lambda: self._storage.list_messages(self._session_id, query, owners=owners),
        )
        cleared_to = 0
        if self._first_read:
            self._first_read = False
            # This read shows every clear and truncation so far, and the latest compaction.
            self._clear_seen = self._truncation_seen = self._baseline = page.rewrites
            self._cleared_at = page.cleared_at_seq
            if self._resumed and cursor <= page.cleared_at_seq:
                self._emit(Cleared(page.cleared_at_seq))
                cleared_to = page.cleared_at_seq
            elif self._resumed and page.truncated and page.truncated[0] < cursor <= page.truncated[1]:
                self._emit(Truncated(*page.truncated))
        else:
            # A clear, truncation or compaction this watch was not told of (its event dropped from
            # a full inbox, or still queued behind this read): told now, before the messages after
            # it, and its event (numbered at or below what this read shows) not again.
            compaction = None
            if (
                page.compacted
                and page.compaction_rewrite > max(self._compaction_seen, self._baseline)
                and page.compacted[1] <= cursor  # (one after the cursor: its summary is in the read)
            ):
                compaction = Compacted(*page.compacted)
            if page.cleared_at_seq > self._cleared_at:
                self._cleared_at = page.cleared_at_seq
                self._clear_seen = max(self._clear_seen, page.rewrites)
                # A compaction before the clear lost its summary to it: its event, queued behind
                # this read, is not told after the clear (one since is the record above).
                self._compaction_seen = max(self._compaction_seen, page.rewrites)
                if cursor <= page.cleared_at_seq:
                    self._emit(Cleared(page.cleared_at_seq))
                    cleared_to = page.cleared_at_seq
            truncation = None
            if page.truncated and page.truncation_rewrite > max(self._truncation_seen, self._baseline):
                self._truncation_seen = page.truncation_rewrite
                if page.truncated[0] < cursor:
                    truncation = Truncated(*page.truncated)
                    cursor = max(cursor, page.truncated[1])
            # (A clear deletes the compaction record, so the record's is after it; a truncation and
            # a compaction are told in the order they were made.)
            if compaction is not None:
                self._compaction_seen = max(self._compaction_seen, page.compaction_rewrite)
                if truncation is not None and page.truncation_rewrite < page.compaction_rewrite:
                    self._emit(truncation)
                    truncation = None
                self._emit(compaction)
            if truncation is not None:
                self._emit(truncation)
        for message in page.messages:
            if message.seq > cleared_to:  # past the kept prompt: the clear emptied the rest
                cursor = max(cursor, cleared_to)
            if message.summarizes is not None:
                self._compaction_seen = max(self._compaction_seen, page.rewrites)
                self._emit(Compacted(*message.summarizes))
                cursor = message.seq
                continue
            if message.seq > cursor + 1 and cursor + 1 < page.window_start_seq:
                # (Above the window's start, a gap is what a truncation removed: announced apart.)
                _emit_trimmed(self, page, cursor + 1, min(message.seq, page.window_start_seq) - 1)
            self._emit(message)
            cursor = message.seq
        cursor = max(cursor, cleared_to)
        if not page.has_more:
            if page.last_seq > cursor:  # everything after the cursor is gone
                if cursor + 1 < page.window_start_seq:
                    _emit_trimmed(self, page, cursor + 1, min(page.last_seq, page.window_start_seq - 1))
                cursor = page.last_seq
            self._must_read = False
        self._cursor = cursor

    def _take(self, event: FeedEvent | None) -> None:
        """A feed event (None: the heartbeat interval passed without one)."""
        cursor = self._cursor
        if event is None:
            self._emit(Heartbeat(cursor))
        elif isinstance(event, Appended):
            if event.owner is not None and event.owner != self._owner:
                # The session expired and another user's took its id: this watch is over.
                raise SessionNotFound(self._session_id)
            if event.last_seq <= cursor:
                return
            if event.messages is None or event.first_seq > cursor + 1:
                self._must_read = True
                return
            for message in event.messages:
                if message.seq > cursor:
                    self._emit(message)
                    cursor = message.seq
            self._cursor = cursor
        elif isinstance(event, Compacted | Cleared):
            if event.owner is not None and event.owner != self._owner:
                raise SessionNotFound(self._session_id)
            seen = self._clear_seen if isinstance(event, Cleared) else self._compaction_seen
            if event.rewrite is not None and event.rewrite <= seen:
                return  # announced, or older than what a read showed
            if isinstance(event, Cleared):
                self._clear_seen = event.rewrite or self._clear_seen
                self._cleared_at = max(self._cleared_at, event.last_seq)
                self._emit(Cleared(event.last_seq))
            else:
                self._compaction_seen = event.rewrite or self._compaction_seen
                self._emit(Compacted(event.first_seq, event.last_seq))
            self._cursor = max(cursor, event.last_seq)
        elif isinstance(event, Truncated):
            if event.owner is not None and event.owner != self._owner:
                raise SessionNotFound(self._session_id)
            if event.rewrite is not None and event.rewrite <= self._truncation_seen:
                return  # older than what a read showed
            self._truncation_seen = event.rewrite or self._truncation_seen
            self._emit(Truncated(event.after_seq, event.last_seq))
            if cursor > event.after_seq:  # the removed seqs it has not had will not come
                self._cursor = max(cursor, event.last_seq)
        elif isinstance(event, Behind):
            self._must_read = event.last_seq == 0 or event.last_seq > cursor
        elif isinstance(event, Deleted):
            raise SessionNotFound(self._session_id)
        elif isinstance(event, Closing):
            raise ShuttingDown("server is shutting down: reconnect with after_seq set to your last seq")


def _emit_trimmed(watch: Watch[T], page: MessagePage, first_seq: int, last_seq: int) -> None:
    """Trimmed(first_seq, last_seq), unless the latest truncations removed those seqs (a cut back
    to the prompt leaves no window to start them above): passed silently, as a hole is."""
    cut = page.truncated
    if cut is None or not cut[0] < first_seq <= last_seq <= cut[1]:
        watch._emit(Trimmed(first_seq, last_seq))


def _leave_later(loop: asyncio.AbstractEventLoop, feed: MessageFeed, subscription: FeedSubscription) -> None:
    loop.create_task(feed.leave(subscription))
