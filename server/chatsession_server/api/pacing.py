"""Stream writes paced per pass of the event loop, so that unary calls keep their turn.

grpc.aio writes a stream's message to its socket inline, on the loop's thread: 300 watchers of a
session woken by one append each start a write in the same pass of the loop, and 300 writes of
200 KB keep the loop from everything else for about 40 ms. A unary call needs three or four
passes (its request, its Valkey reply, its own write), so another user's GetSession waited behind
every watcher's write three or four times over. The pacer lets the writes of one pass start only
up to a budget in bytes; the rest wait, in order, for the next passes. The work is the same; what
changes is that no pass of the loop holds more than one budget of stream writes and the write
that crosses it."""

from __future__ import annotations

import asyncio
from collections import deque

# What a write costs beyond its bytes (a syscall, gRPC's framing, a task step), counted as this
# many bytes: a pass starts a bounded number of even the smallest writes (a heartbeat, a short
# message), yet the 1000 watchers of a session are still written a short message in one pass.
WRITE_OVERHEAD = 512


class WritePacer:
    """Admits stream writes up to `bytes_per_pass` bytes a pass of the loop, the write that
    crosses it included (so always at least one), the rest first come, first served in later
    passes. `turn(size)` returns None when the write
    may start now, else a future to await. One per server (it holds the loop it first ran on)."""

    __slots__ = ("_budget", "_handed", "_loop", "_resetting", "_spent", "_waiting", "paced")

    def __init__(self, bytes_per_pass: int) -> None:
        self._budget = bytes_per_pass
        self._spent = 0  # bytes admitted in the current pass
        self._handed = 0  # bytes of waiting writes handed their turn: they start in the next pass
        self._waiting: deque[tuple[asyncio.Future[None], int]] = deque()
        self._resetting = False  # a _next_pass is scheduled
        self._loop: asyncio.AbstractEventLoop | None = None
        self.paced = 0  # writes that waited for a later pass (telemetry reads it)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def turn(self, size: int) -> asyncio.Future[None] | None:
        size += WRITE_OVERHEAD
        if not self._waiting and self._spent < self._budget:
            self._spent += size
            self._schedule()
            return None
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((future, size))
        self.paced += 1
        self._schedule()
        return future

    def _schedule(self) -> None:
        if not self._resetting:
            self._resetting = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            # Runs in the next pass: callbacks scheduled during a pass wait for the one after it.
            self._loop.call_soon(self._next_pass)

    def _next_pass(self) -> None:
        self._resetting = False
        # The writes handed their turn by the previous call start in this pass (their wake-ups
        # were scheduled before this call): they are this pass's spending.
        self._spent, handed = self._handed, 0
        waiting = self._waiting
        while waiting and handed < self._budget:
            future, size = waiting.popleft()
            if future.done():  # its call was cancelled meanwhile
                continue
            future.set_result(None)  # its write starts in the next pass
            handed += size
        self._handed = handed
        if waiting or handed or self._spent:
            self._schedule()
