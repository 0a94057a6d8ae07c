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
missed (nothing tells it from one it saw). Announcements come from publishes and reads, so one
published while Valkey was unreachable may not be made; the messages never miss.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from chatsession_server.domain import (
    Appended,
    Behind,
    Cleared,
    Closing,
    Compacted,
    Deleted,
    Heartbeat,
    MessageQuery,
    Trimmed,
    WatchEvent,
)
from chatsession_server.errors import PreconditionFailed, SessionNotFound, ShuttingDown
from chatsession_server.ports import MessageFeed, SessionStorage

READ_PAGE = 200

T = TypeVar("T")


async def watch_session(
    storage: SessionStorage,
    feed: MessageFeed,
    session_id: str,
    after_seq: int | None,
    *,
    heartbeat_seconds: float,
    present: Callable[[WatchEvent], T],
) -> AsyncIterator[T]:
    """The session's events, each as `present` makes it (the servicer's protobuf: so no second
    generator per watch sits between this one and the stream)."""
    subscription = await feed.join(session_id)
    session_id = subscription.session_id  # the feed's copy, one for all the session's watchers
    try:
        session = await storage.get(session_id)
        # Only these two: the whole session (its title, labels...) is not held by each idle watch,
        # and the owner's name once for all its watches.
        owner, last_seq = sys.intern(session.user_id), session.message_count
        del session
        if after_seq is not None and after_seq > last_seq:
            raise PreconditionFailed(
                "AFTER_SEQ_AHEAD",
                "after_seq",
                f"after_seq {after_seq} is beyond the session's last seq {last_seq} (was it re-created?)",
            )
        cursor = last_seq if after_seq is None else after_seq
        # A resumed watch reads even at the tail: it may have missed a clear there.
        resumed = after_seq is not None and after_seq > 0
        must_read = cursor < last_seq or resumed
        first_read = True
        yield present(Heartbeat(cursor))  # live from here: the resume point
        # The newest rewrite (see the module docstring) of each kind announced, or read past: a
        # publish numbered at or below it is not announced (again).
        compaction_seen = clear_seen = 0
        while True:
            while must_read:
                page = await storage.list_messages(
                    session_id, MessageQuery(limit=READ_PAGE, after_seq=cursor)
                )
                cleared_to = 0
                if first_read:
                    first_read = False
                    clear_seen = page.rewrites  # this read shows every clear so far
                    if resumed and cursor <= page.cleared_at_seq:
                        yield present(Cleared(page.cleared_at_seq))
                        cleared_to = page.cleared_at_seq
                for message in page.messages:
                    if message.seq > cleared_to:  # past the kept prompt: the clear emptied the rest
                        cursor = max(cursor, cleared_to)
                    if message.summarizes is not None:
                        compaction_seen = max(compaction_seen, page.rewrites)
                        yield present(Compacted(*message.summarizes))
                        cursor = message.seq
                        continue
                    if message.seq > cursor + 1:
                        yield present(Trimmed(cursor + 1, message.seq - 1))
                    yield present(message)
                    cursor = message.seq
                cursor = max(cursor, cleared_to)
                if not page.has_more:
                    if page.last_seq > cursor:  # everything after the cursor is gone
                        yield present(Trimmed(cursor + 1, page.last_seq))
                        cursor = page.last_seq
                    must_read = False
            event = await subscription.next(heartbeat_seconds)
            if event is None:
                yield present(Heartbeat(cursor))
            elif isinstance(event, Appended):
                if event.owner is not None and event.owner != owner:
                    # The session expired and another user's took its id: this watch is over.
                    raise SessionNotFound(session_id)
                if event.last_seq <= cursor:
                    continue
                if event.messages is None or event.first_seq > cursor + 1:
                    must_read = True
                    continue
                for message in event.messages:
                    if message.seq > cursor:
                        yield present(message)
                        cursor = message.seq
            elif isinstance(event, Compacted | Cleared):
                if event.owner is not None and event.owner != owner:
                    raise SessionNotFound(session_id)
                seen = clear_seen if isinstance(event, Cleared) else compaction_seen
                if event.rewrite is not None and event.rewrite <= seen:
                    continue  # announced, or older than what a read showed
                if isinstance(event, Cleared):
                    clear_seen = event.rewrite or clear_seen
                    yield present(Cleared(event.last_seq))
                else:
                    compaction_seen = event.rewrite or compaction_seen
                    yield present(Compacted(event.first_seq, event.last_seq))
                cursor = max(cursor, event.last_seq)
            elif isinstance(event, Behind):
                must_read = event.last_seq == 0 or event.last_seq > cursor
            elif isinstance(event, Deleted):
                raise SessionNotFound(session_id)
            elif isinstance(event, Closing):
                raise ShuttingDown("server is shutting down: reconnect with after_seq set to your last seq")
    finally:
        await feed.leave(subscription)
