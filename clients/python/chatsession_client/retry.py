"""Retries with exponential backoff, jitter and an overall deadline."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from chatsession_client.errors import ChatSessionError

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """Which failures to retry and for how long. Every call this client makes is safe to repeat:
    appends and creates carry a request_id, the rest are reads or set values."""

    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    deadline: float = 30.0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
    )

    async def run(self, attempt: Callable[[float | None], Awaitable[T]], per_call_timeout: float | None) -> T:
        """Call `attempt(timeout)` until it succeeds, fails with a non-retryable code, or time is up."""
        end = time.monotonic() + self.deadline
        backoff = self.initial_backoff
        while True:
            remaining = end - time.monotonic()
            timeout = (
                per_call_timeout if per_call_timeout is None else max(min(per_call_timeout, remaining), 0.001)
            )
            try:
                return await attempt(timeout)
            except ChatSessionError as exc:
                sleep = random.uniform(0, backoff)
                if exc.code not in self.codes or time.monotonic() + sleep >= end:
                    raise
            await asyncio.sleep(sleep)
            backoff = min(backoff * self.multiplier, self.max_backoff)


NO_RETRY = Retry(codes=frozenset())
"""Fail on the first error (tests and callers with their own retry policy use this)."""
