"""CallObserver: times every call to its status, for the RPC metrics and the access log.

One interceptor, the outermost that wraps a call (auth's CertificateGate, before it under mTLS,
only hands it calls), so it sees the code the caller gets (after the error mapping and auth) and
one clock serves both. A stream is one line and one measurement, when it ends.

An access-log line holds the method, code, duration, the request's `session_id` and `request_id`
(ids the caller chose, never message contents), the peer, the users an authenticated caller may
act for (never its token) and the trace id (of the call's span, or of the caller's `traceparent`
when tracing is off).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from chatsession_server.api.auth import CALLER, Grant
from chatsession_server.api.interceptors import Handler, WrappingInterceptor
from chatsession_server.api.status import code_of
from chatsession_server.api.telemetry import TRACE_ID, CallMetrics
from chatsession_server.logs import loggable

ACCESS_LOGGER = "chatsession_server.access"
access_log = logging.getLogger(ACCESS_LOGGER)

Context = aio.ServicerContext[Any, Any]


class CallObserver(WrappingInterceptor):
    def __init__(self, metrics: CallMetrics | None, *, access_log: bool) -> None:
        super().__init__()
        self._metrics = metrics
        self._access_log = access_log

    def applies(self, method: str, handler: Handler) -> bool:
        return True

    def wrap(self, handler: Handler, method: str) -> Handler:
        # grpc's stubs type the behaviours as sync callables; they are coroutines or async generators.
        # A unary call, or a stream written by a coroutine (the error mapping's).
        def timing(behaviour: Any) -> Any:
            async def timed(request: Any, context: Context) -> Any:
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    code = code_of(exc, context, mapped=True)
                    raise
                finally:
                    self._done(method, code, start, request, context)

            return timed

        # A stream that is iterated (health's Watch).
        def timing_iterated(behaviour: Any) -> Any:
            async def generate(request: Any, context: Context) -> AsyncIterator[Any]:
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    async for item in behaviour(request, context):
                        yield item
                except BaseException as exc:
                    code = code_of(exc, context, mapped=True)
                    raise
                finally:
                    self._done(method, code, start, request, context)

            return generate

        written = inspect.iscoroutinefunction(handler.unary_stream)
        # Client streaming (reflection) has no wrapper: neither measured nor logged.
        return self.rebuilt(handler, unary=timing, stream=timing if written else timing_iterated)

    def _done(self, method: str, code: grpc.StatusCode, start: float, request: Any, context: Context) -> None:
        seconds = time.perf_counter() - start
        if self._metrics is not None:
            self._metrics.record(method, code, seconds)
        if self._access_log and access_log.isEnabledFor(logging.INFO):
            _log_call(method, code, seconds, request, context)


def _log_call(method: str, code: grpc.StatusCode, seconds: float, request: Any, context: Context) -> None:
    # getattr: the request may be another service's message, raw bytes (a call refused before
    # parsing) or a stand-in for one that did not parse.
    session_id = getattr(request, "session_id", None)
    if session_id is None:  # UpdateSession names it inside its session
        session_id = getattr(getattr(request, "session", None), "session_id", "")
    request_id = getattr(request, "request_id", "")
    grant = CALLER.get()
    # What the caller chose (even a refused request's ids, or an unknown method's path) is escaped
    # and cut, spaces too: one call is one line of bounded size, and its fields are its own.
    fields = {
        "method": loggable(method, spaces=False),
        "code": code.name,
        "duration_ms": round(seconds * 1000, 3),
        "session_id": loggable(session_id, spaces=False) if session_id else "",
        "request_id": loggable(request_id, spaces=False) if request_id else "",
        "peer": loggable(context.peer(), spaces=False),
        "user": loggable(_users(grant), spaces=False) if grant else "",
        "trace_id": _trace_id(context),
    }
    text = " ".join(f"{key}={value}" for key, value in fields.items() if value != "" and key != "method")
    access_log.info("%s %s", fields["method"], text, extra={"access": fields})


def _users(grant: Grant) -> str:
    return "*" if grant.every_user else ",".join(sorted(grant.users))


_HEX_DIGITS = frozenset("0123456789abcdef")


def _trace_id(context: Context) -> str:
    traced = TRACE_ID.get()
    if traced:
        return f"{traced:032x}"
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":  # version-traceid-parentid-flags (W3C)
            parts = str(value).split("-")
            # 32 hex digits and nothing else: int(_, 16) would also take spaces, '_' and '0x'.
            if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                trace_id = parts[1].lower()
                return trace_id if _HEX_DIGITS.issuperset(trace_id) else ""
    return ""
