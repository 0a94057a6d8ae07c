"""The watch quota's place is given back exactly once, however a watch stream ends (issue 16: the
quota holds its place in an object, not an async generator, so nothing finalizes it for free)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from chatsession_server.api.quotas import WatchQuota
from chatsession_server.errors import QuotaExceeded

METHOD = "/chatsession.v1.SessionService/WatchMessages"


class Peer:
    """The one thing the quota asks of a call's context."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


def quota_stream(produce: Any) -> tuple[WatchQuota, Any]:
    quota = WatchQuota(METHOD, max_watchers=1, max_per_connection=1)
    return quota, quota.wrap(grpc.unary_stream_rpc_method_handler(produce), METHOD).unary_stream


async def events(request: Any, context: Any) -> AsyncIterator[str]:
    yield "one"
    if request == "fail":
        raise RuntimeError("the store broke")
    await asyncio.Event().wait()  # idle


async def test_a_stream_that_ends_by_error_gives_its_place_back() -> None:
    quota, stream = quota_stream(events)
    watch = stream("fail", Peer())
    assert quota.watchers == 1
    assert await anext(watch) == "one"
    with pytest.raises(RuntimeError):
        await anext(watch)
    assert quota.watchers == 0
    await watch.aclose()  # and only once
    assert quota.watchers == 0


async def test_a_closed_stream_gives_its_place_back_and_a_second_is_refused_meanwhile() -> None:
    quota, stream = quota_stream(events)
    watch = stream("idle", Peer())
    assert await anext(watch) == "one"
    with pytest.raises(QuotaExceeded):
        stream("idle", Peer())
    await watch.aclose()
    await watch.aclose()
    assert quota.watchers == 0
    again = stream("idle", Peer())  # the place is free again
    await again.aclose()


async def test_a_dropped_stream_gives_its_place_back_on_the_loop() -> None:
    quota, stream = quota_stream(events)
    watch = stream("idle", Peer())
    assert await anext(watch) == "one"
    del watch
    gc.collect()
    await asyncio.sleep(0)  # the release was scheduled on the loop
    await asyncio.sleep(0)
    assert quota.watchers == 0
