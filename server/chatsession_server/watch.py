"""WatchMessages as domain logic: backlog from the LIST, then live events, by seq, exactly once.

The watcher joins the feed BEFORE reading the backlog, so nothing appended in between is missed;
events at or below its cursor are dropped, so nothing is delivered twice; any event it cannot
chain onto its cursor sends it back to the LIST, which is the source of truth.

A compaction's summary met in the LIST is announced as `Compacted` (the range it replaced; the
client reads the summary with GetContext or ListMessages) and moves the cursor to its seq; so is
the compaction's publish, unless the read announced it already. A clear is announced as
`Cleared` and moves the cursor to the tail it left. Either announcement comes from a publish or
a read, so one published while Valkey was unreachable may not be made; the messages never miss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

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


async def watch_session(
    storage: SessionStorage,
    feed: MessageFeed,
    session_id: str,
    after_seq: int | None,
    *,
    heartbeat_seconds: float,
) -> AsyncIterator[WatchEvent]:
    subscription = await feed.join(session_id)
    try:
        session = await storage.get(session_id)
        last_seq = session.message_count
        if after_seq is not None and after_seq > last_seq:
            raise PreconditionFailed(
                "AFTER_SEQ_AHEAD",
                "after_seq",
                f"after_seq {after_seq} is beyond the session's last seq {last_seq} (was it re-created?)",
            )
        cursor = last_seq if after_seq is None else after_seq
        must_read = cursor < last_seq
        yield Heartbeat(cursor)  # live from here: the resume point
        read_compactions: set[tuple[int, int]] = set()  # announced by a read: their publish is not
        while True:
            while must_read:
                page = await storage.list_messages(
                    session_id, MessageQuery(limit=READ_PAGE, after_seq=cursor)
                )
                for message in page.messages:
                    if message.summarizes is not None:
                        read_compactions.add(message.summarizes)
                        yield Compacted(*message.summarizes)
                        cursor = message.seq
                        continue
                    if message.seq > cursor + 1:
                        yield Trimmed(cursor + 1, message.seq - 1)
                    yield message
                    cursor = message.seq
                if not page.has_more:
                    if page.last_seq > cursor:  # everything after the cursor is gone
                        yield Trimmed(cursor + 1, page.last_seq)
                        cursor = page.last_seq
                    must_read = False
            event = await subscription.next(heartbeat_seconds)
            if event is None:
                yield Heartbeat(cursor)
            elif isinstance(event, Appended):
                if event.owner is not None and event.owner != session.user_id:
                    # The session expired and another user's took its id: this watch is over.
                    raise SessionNotFound(session_id)
                if event.last_seq <= cursor:
                    continue
                if event.messages is None or event.first_seq > cursor + 1:
                    must_read = True
                    continue
                for message in event.messages:
                    if message.seq > cursor:
                        yield message
                        cursor = message.seq
            elif isinstance(event, Compacted | Cleared):
                if event.owner is not None and event.owner != session.user_id:
                    raise SessionNotFound(session_id)
                if isinstance(event, Cleared):
                    yield Cleared(event.last_seq)
                    cursor = max(cursor, event.last_seq)
                elif (event.first_seq, event.last_seq) in read_compactions:
                    read_compactions.discard((event.first_seq, event.last_seq))
                else:
                    yield Compacted(event.first_seq, event.last_seq)
                    cursor = max(cursor, event.last_seq)
            elif isinstance(event, Behind):
                must_read = event.last_seq == 0 or event.last_seq > cursor
            elif isinstance(event, Deleted):
                raise SessionNotFound(session_id)
            elif isinstance(event, Closing):
                raise ShuttingDown("server is shutting down: reconnect with after_seq set to your last seq")
    finally:
        await feed.leave(subscription)
