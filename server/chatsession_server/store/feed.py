"""SessionFeed: the process's one pub/sub connection, fanned out to its local watchers.

Appends ("M<first> <last> <owner>[\n<messages>]"), compactions ("C<first> <last> <owner>
<rewrite>"), clears ("X<last seq> <owner> <rewrite>"), truncations ("T<after seq> <last seq> <owner>
<rewrite>") and deletes ("D") publish on `watch:{<id>}`
(see lua/session_scripts.py; the leading letter is codec.PublishKind, for the scripts and
`_parse` alike); in a cluster with SPUBLISH, and the feed subscribes with SSUBSCRIBE: a sharded
channel lives on the node of its session's slot, so a publish reaches only that node's
subscribers instead of every node of the cluster. The feed subscribes a session's channel when
its first local watcher arrives and unsubscribes when the last leaves (in batches, see
channel_sync.py). An append's publish carries its messages (up to
session_store.INLINE_PUBLISH_BYTES), so Valkey sends them once to the process, which parses them
once and hands the same objects to every watcher of the session. Pub/sub is not trusted to be
complete: each watcher keeps a cursor and re-reads the LIST whenever an event cannot be trusted
to follow on (a gap, an append only announced, events its inbox dropped, a publish lost while
Valkey was away), and the session's watchers reading at one cursor share the read (read_shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from glide import (
    GlideClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    PubSubMsg,
)

from chatsession_server.domain import (
    Appended,
    Behind,
    Cleared,
    Closing,
    Compacted,
    Deleted,
    FeedEvent,
    StoredMessage,
    Truncated,
)
from chatsession_server.errors import ChatSessionError
from chatsession_server.logs import loggable
from chatsession_server.ports import FeedSubscription
from chatsession_server.store import codec, keys
from chatsession_server.store.channel_sync import ChannelSync, PubSubControl, Sharded
from chatsession_server.store.subscription import Subscription
from chatsession_server.store.valkey import (
    AnyClient,
    AnyConfig,
    ValkeyConnection,
    create_client,
    reads_for_watchers,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_APPENDED = codec.PublishKind.APPENDED.encode()
_DELETED = codec.PublishKind.DELETED.encode()
_COMPACTED = codec.PublishKind.COMPACTED.encode()
_CLEARED = codec.PublishKind.CLEARED.encode()
_TRUNCATED = codec.PublishKind.TRUNCATED.encode()
_MESSAGE_COUNT = codec.MetaField.MESSAGE_COUNT.value


class _Channel:
    __slots__ = ("heard_at", "last_seq", "reads", "session_id", "watchers")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id  # its watchers' subscriptions share this string
        # A list, each watcher knowing its place: 8 bytes a watcher where a set takes 30 to 200.
        self.watchers: list[Subscription] = []
        self.last_seq = 0  # newest seq this process has heard of
        self.heard_at = float("-inf")  # loop time of the last publish heard on the channel
        self.reads: dict[Hashable, asyncio.Future[Any]] | None = None  # see read_shared; None: none yet

    def add(self, subscription: Subscription) -> None:
        subscription.place = len(self.watchers)
        self.watchers.append(subscription)

    def remove(self, subscription: Subscription) -> None:
        """Takes it out in O(1): the last watcher moves to its place."""
        place, watchers = subscription.place, self.watchers
        if not 0 <= place < len(watchers) or watchers[place] is not subscription:
            return  # not here (left already)
        last = watchers.pop()
        if last is not subscription:
            watchers[place] = last
            last.place = place
        subscription.place = -1


class SessionFeed:
    def __init__(
        self,
        pubsub: AnyClient,
        commands: ValkeyConnection,
        *,
        buffer_bytes: int,
        poll_seconds: float,
        sweep_seconds: float,
        key_space: keys.KeySpace,
    ) -> None:
        self._keys = key_space
        self._pubsub = pubsub
        control: PubSubControl = Sharded(pubsub) if isinstance(pubsub, GlideClusterClient) else pubsub
        self._sync = ChannelSync(control, lambda: [self._keys.watch_channel(s) for s in self._channels])
        self._commands = commands
        self._buffer_bytes = buffer_bytes
        self._poll_seconds = poll_seconds
        self._sweep_seconds = sweep_seconds
        self._channels: dict[str, _Channel] = {}
        self._polled_at = float("-inf")  # loop time of the last poll
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self.resyncs = 0  # times the poll sent a session's watchers back to the LIST (telemetry reads it)

    @classmethod
    async def start(
        cls,
        base: AnyConfig,
        commands: ValkeyConnection,
        *,
        buffer_bytes: int,
        poll_seconds: float,
        sweep_seconds: float,
        key_space: keys.KeySpace,
    ) -> SessionFeed:
        """Open the pub/sub connection (inside the running loop); start the poller and the sweep
        that wakes idle watchers every `sweep_seconds` (their heartbeat timers, shared)."""
        holder: list[SessionFeed] = []

        def on_message(msg: PubSubMsg, context: Any) -> None:
            holder[0]._dispatch(msg)

        if isinstance(base, GlideClusterClientConfiguration):
            base.pubsub_subscriptions = GlideClusterClientConfiguration.PubSubSubscriptions(
                channels_and_patterns={}, callback=on_message, context=None
            )
        else:
            base.pubsub_subscriptions = GlideClientConfiguration.PubSubSubscriptions(
                channels_and_patterns={}, callback=on_message, context=None
            )
        client = await create_client(base)
        feed = cls(
            client,
            commands,
            buffer_bytes=buffer_bytes,
            poll_seconds=poll_seconds,
            sweep_seconds=sweep_seconds,
            key_space=key_space,
        )
        holder.append(feed)
        feed._tasks = [
            asyncio.create_task(feed._poll_forever(), name="chatsession-watch-poll"),
            asyncio.create_task(feed._sweep_forever(), name="chatsession-watch-sweep"),
        ]
        return feed

    @property
    def watcher_count(self) -> int:
        return sum(len(c.watchers) for c in self._channels.values())

    @property
    def subscriptions(self) -> int:
        """Sessions watched here, one pub/sub channel each."""
        return len(self._channels)

    async def join(self, session_id: str) -> Subscription:
        """Register a watcher; returns once this process is subscribed to the session's channel."""
        if self._closed:
            return self._closing_subscription(session_id)
        channel = self._channels.get(session_id)
        if channel is None:
            channel = self._channels[session_id] = _Channel(session_id)
        subscription = Subscription(channel.session_id, self._buffer_bytes)
        channel.add(subscription)
        try:
            await self._sync.subscribed(self._keys.watch_channel(session_id))
        except BaseException:
            await self.leave(subscription)
            raise
        return subscription

    async def leave(self, subscription: FeedSubscription) -> None:
        if not isinstance(subscription, Subscription):
            return
        subscription.wake()  # a wait() pending on it ends: nothing more will come
        session_id = subscription.session_id
        channel = self._channels.get(session_id)
        if channel is None:
            return
        channel.remove(subscription)
        if not channel.watchers:
            del self._channels[session_id]
            if not self._closed:
                self._sync.changed()  # the next round unsubscribes

    async def read(self, fetch: Callable[[], Awaitable[T]]) -> T:
        """A watcher's read of Valkey: however it fails or however long it takes, it never marks
        Valkey unreachable for the process's other calls (see valkey.reads_for_watchers)."""
        with reads_for_watchers():
            return await fetch()

    async def read_shared(
        self, subscription: FeedSubscription, key: Hashable, fetch: Callable[[], Awaitable[T]]
    ) -> T:
        """`fetch()` once for every watcher of `subscription`'s session in this process that asks
        with an equal `key` while it runs: the watchers of a session that fall back to the LIST
        at one cursor cost Valkey one read, not one each. A read as `read()` makes it; each
        sharer gets its result or its error, and a sharer that gives up (cancelled) leaves it
        running for the others."""
        channel = self._channels.get(subscription.session_id)
        if channel is None or not isinstance(subscription, Subscription) or subscription.place < 0:
            return await self.read(fetch)  # not in the feed (any more): nobody to share with
        reads = channel.reads
        if reads is None:
            reads = channel.reads = {}
        shared = reads.get(key)
        if shared is None:
            shared = reads[key] = asyncio.ensure_future(self.read(fetch))

            def done(future: asyncio.Future[Any], reads: dict[Hashable, asyncio.Future[Any]] = reads) -> None:
                if reads.get(key) is future:
                    del reads[key]
                if not future.cancelled():
                    future.exception()  # retrieved: every sharer may have given up

            shared.add_done_callback(done)
        result: T = await asyncio.shield(shared)
        return result

    def _closing_subscription(self, session_id: str) -> Subscription:
        subscription = Subscription(session_id, 1)
        subscription.offer(Closing())
        return subscription

    def _dispatch(self, msg: PubSubMsg) -> None:
        """GLIDE's callback, on the loop thread: parse once, hand the same event to every watcher."""
        channel_name = msg.channel.decode() if isinstance(msg.channel, bytes) else str(msg.channel)
        channel = self._channels.get(self._keys.session_of_channel(channel_name))
        if channel is None or not channel.watchers:
            return
        channel.heard_at = asyncio.get_running_loop().time()
        payload = msg.message if isinstance(msg.message, bytes) else str(msg.message).encode()
        try:
            event = _parse(payload)
        except (ValueError, KeyError) as exc:
            log.warning("unreadable watch publish on %s: %s", loggable(channel_name), exc)
            event = Behind()
        if isinstance(event, Appended):
            channel.last_seq = max(channel.last_seq, event.last_seq)
        # What the event holds, as a watcher's inbox counts it: about its publish's size.
        size = len(payload)
        for subscription in channel.watchers:
            subscription.offer(event, size)

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self._sweep_seconds)
            now = loop.time()
            for channel in list(self._channels.values()):
                for subscription in channel.watchers:
                    subscription.expire(now)

    async def _poll_forever(self) -> None:
        """Catch what pub/sub cannot promise: publishes lost while Valkey was away, and expiry."""
        while not self._closed:
            await asyncio.sleep(self._poll_seconds)
            with contextlib.suppress(ChatSessionError), reads_for_watchers():
                await self.poll_once()

    async def poll_once(self) -> None:
        """Reads message_count of every watched session pub/sub has not heard from since the
        previous poll: a session it has heard from was appended to (or deleted) meanwhile, so it
        has not expired, and the next poll checks it unless it is heard from again (each append
        restarts its clock). So an idle session is checked on every poll and a busy one on at
        most every other poll, and 10,000 busy watched sessions no longer cost 10,000 HGETs a poll."""
        heard_since, self._polled_at = self._polled_at, asyncio.get_running_loop().time()
        session_ids = [s for s, channel in self._channels.items() if channel.heard_at <= heard_since]
        if not session_ids:
            return
        batch = self._commands.batch(atomic=False)
        for session_id in session_ids:
            batch.hget(self._keys.meta(session_id), _MESSAGE_COUNT)
        counts = await self._commands.run(batch)
        for session_id, count in zip(session_ids, counts, strict=True):
            channel = self._channels.get(session_id)
            if channel is None:
                continue
            if count is None:
                event: FeedEvent = Deleted()
            elif int(count) > channel.last_seq:
                # Counted when this process had heard of the session's appends: a publish was missed.
                self.resyncs += channel.last_seq > 0
                channel.last_seq = int(count)
                event = Behind(int(count))
            else:
                continue
            for subscription in channel.watchers:
                subscription.offer(event)

    async def close(self) -> None:
        """End every watch (they report UNAVAILABLE) and drop the pub/sub connection."""
        self._closed = True
        for channel in self._channels.values():
            for subscription in channel.watchers:
                subscription.offer(Closing())
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._sync.close()
        with contextlib.suppress(Exception):
            await self._pubsub.close()


def _parse(payload: bytes) -> FeedEvent:
    if payload == _DELETED:
        return Deleted()
    # A publish without its rewrite number (from a server before it existed) is announced as ever.
    if payload.startswith(_COMPACTED):
        first_seq, last_seq, user, *rewrite = payload[1:].split(b" ")
        return Compacted(int(first_seq), int(last_seq), user.decode(), int(rewrite[0]) if rewrite else None)
    if payload.startswith(_CLEARED):
        last_seq, user, *rewrite = payload[1:].split(b" ")
        return Cleared(int(last_seq), user.decode(), int(rewrite[0]) if rewrite else None)
    if payload.startswith(_TRUNCATED):
        after_seq, last_seq, user, number = payload[1:].split(b" ")
        return Truncated(int(after_seq), int(last_seq), user.decode(), int(number))
    if not payload.startswith(_APPENDED):
        raise ValueError(f"unknown event {payload[:16]!r}")
    head, _, body = payload.partition(b"\n")
    first, last, *owner = head[1:].split(b" ")
    messages: tuple[StoredMessage, ...] | None = None
    if body:
        messages = tuple(codec.message_from_obj(obj) for obj in json.loads(body))
    return Appended(int(first), int(last), messages, owner[0].decode() if owner else None)
