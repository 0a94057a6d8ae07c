"""Retries with exponential backoff, jitter, the server's RetryInfo and an overall deadline.

Only the decisions live here (whether to retry, how long to wait, the next attempt's timeout);
each client does the waiting its own way (asyncio.sleep or time.sleep)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

from chatsession_client.errors import ChatSessionError


@dataclass(frozen=True)
class Retry:
    """Which failures to retry and for how long. Every call this client makes is safe to repeat:
    appends and creates carry a request_id (the same one on every attempt), the rest are reads
    or set values."""

    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    deadline: float = 30.0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
    )

    def start(self, now: float) -> Backoff:
        """The retry state of one call begun at `now` (a monotonic clock reading)."""
        return Backoff(self, now)


class Backoff:
    """Where one call (or one watch, since its last event) stands in its retry policy."""

    def __init__(self, policy: Retry, now: float) -> None:
        self._policy = policy
        self.restart(now)

    def restart(self, now: float) -> None:
        """Begin afresh: a watch that received an event has made progress."""
        self._end = now + self._policy.deadline
        self._backoff = self._policy.initial_backoff

    def timeout(self, per_call_timeout: float | None, now: float) -> float | None:
        """The next attempt's timeout: the per-call timeout, cut to what is left of the deadline."""
        if per_call_timeout is None:
            return None
        return max(min(per_call_timeout, self._end - now), 0.001)

    def next_sleep(self, error: ChatSessionError, now: float) -> float | None:
        """Seconds to wait before retrying after `error`, or None to give up (a code the policy
        does not retry, or no time left). Full jitter up to the current backoff, and never less
        than the server's RetryInfo asked for."""
        if error.code not in self._policy.codes:
            return None
        sleep = random.uniform(0, self._backoff)
        if error.retry_delay is not None:
            sleep = max(sleep, error.retry_delay)
        if now + sleep >= self._end:
            return None
        self._backoff = min(self._backoff * self._policy.multiplier, self._policy.max_backoff)
        return sleep


NO_RETRY = Retry(codes=frozenset())
"""Fail on the first error (tests and callers with their own retry policy use this)."""
