"""ChannelSync: keeps the pub/sub connection subscribed to the channels wanted, in batches.

GLIDE checks its whole subscription set on each SUBSCRIBE call, so one call per channel costs
more the more channels are held: 10,000 watchers reconnecting to 10,000 sessions took 19 s that
way. Here every change waits for the next round, and a round subscribes and unsubscribes
everything that changed since the last one in two calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Protocol

from glide import GlideClusterClient

from chatsession_server.errors import ShuttingDown
from chatsession_server.store.valkey import translate_errors

log = logging.getLogger(__name__)

TIMEOUT_MS = 5000
# How long a round waits for more changes. A storm of joins arrives one call at a time, so
# without a pause each round would carry a single channel; 1 ms turns 500 calls into ~60.
COALESCE_SECONDS = 0.001
RETRY_SECONDS = 1.0  # after an UNSUBSCRIBE failed


class PubSubControl(Protocol):
    """What ChannelSync needs of a pub/sub client: a GlideClient as it is, or `Sharded`."""

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None: ...

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None: ...


class Sharded:
    """A cluster client's sharded pub/sub (SSUBSCRIBE: each channel on the node of its slot)."""

    def __init__(self, client: GlideClusterClient) -> None:
        self._client = client

    async def subscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self._client.ssubscribe(channels, timeout_ms=timeout_ms)

    async def unsubscribe(self, channels: set[str], timeout_ms: int) -> None:
        await self._client.sunsubscribe(channels, timeout_ms=timeout_ms)


class ChannelSync:
    def __init__(self, client: PubSubControl, wanted: Callable[[], Collection[str]]) -> None:
        self._client = client
        self._wanted = wanted  # the channel names wanted now, read at the start of each round
        self._subscribed: set[str] = set()
        # A SUBSCRIBE that failed (a timeout, say) may still have taken effect in GLIDE, which
        # keeps retrying what it was asked for: unsubscribe these once nobody wants them.
        self._uncertain: set[str] = set()
        self._removing: frozenset[str] = frozenset()  # being unsubscribed right now
        self._next: asyncio.Future[None] | None = None  # done when a round started later ends
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def subscribed(self, channel: str) -> None:
        """Returns once `channel` is subscribed (it must be wanted); raises what the round raised."""
        while channel not in self._subscribed or channel in self._removing:
            await asyncio.shield(self.changed())

    def changed(self) -> asyncio.Future[None]:
        """The wanted set has changed: a round will run; this future ends with it."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # Failures matter to the joins awaiting them; nobody else needs to retrieve them.
            self._next.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._run(), name="chatsession-channel-sync")
        return self._next

    async def _run(self) -> None:
        while self._next is not None:
            await asyncio.sleep(COALESCE_SECONDS)
            done, self._next = self._next, None
            try:
                await self._round()
            except asyncio.CancelledError:
                done.set_exception(_closing())
                raise
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    async def _round(self) -> None:
        wanted = set(self._wanted())
        to_add = wanted - self._subscribed
        to_remove = (self._subscribed | self._uncertain) - wanted
        # From here until the round ends, a join for one of these must wait for the next round:
        # the channel may be gone by the time it would return.
        self._removing = frozenset(to_remove)
        try:
            if to_add:
                try:
                    with translate_errors():
                        await self._client.subscribe(to_add, timeout_ms=TIMEOUT_MS)
                except BaseException:
                    self._uncertain |= to_add
                    raise
                self._subscribed |= to_add
                self._uncertain -= to_add
            if to_remove:
                await self._unsubscribe(to_remove)
        finally:
            self._removing = frozenset()

    async def _unsubscribe(self, channels: set[str]) -> None:
        try:
            await self._client.unsubscribe(channels, timeout_ms=TIMEOUT_MS)
        except Exception as exc:
            # It may have taken effect even so: a join must subscribe again, and a later round
            # tries once more. Until then publishes for them are only ignored.
            log.warning("unsubscribing %d watch channels failed: %s", len(channels), exc)
            self._subscribed -= channels
            self._uncertain |= channels
            asyncio.get_running_loop().call_later(RETRY_SECONDS, self._retry)
        else:
            self._subscribed -= channels
            self._uncertain -= channels

    def _retry(self) -> None:
        if not self._closed:
            self.changed()

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._next is not None and not self._next.done():
            self._next.set_exception(_closing())


def _closing() -> ShuttingDown:
    return ShuttingDown("server is shutting down: reconnect with after_seq set to your last seq")
