"""Cross-cutting server behaviour: domain errors become statuses here, not in each handler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from chatsession_server.api.pacing import WritePacer
from chatsession_server.api.status import to_grpc_status
from chatsession_server.errors import ChatSessionError, FieldViolation, InvalidArgument
from chatsession_server.logs import loggable

log = logging.getLogger(__name__)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
Wrap: TypeAlias = Callable[[Any], Any]
"""What an interceptor does to one part of a handler: the part in (a behaviour, typed as sync by
grpc's stubs though it is a coroutine or an async iterator; a deserializer), its replacement out."""


class WrappingInterceptor(aio.ServerInterceptor):
    """Replaces the handler of each method it `applies` to with `wrap(handler, method)`.

    gRPC asks for a handler on every call; each is wrapped once, not once per call (an idle watch
    stream would otherwise keep its own copy of the wrapper alive). Keyed by method and checked by
    identity, so interceptors after this one still run every time."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def applies(self, method: str, handler: Handler) -> bool:
        raise NotImplementedError

    def wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError

    @staticmethod
    def rebuilt(
        handler: Handler,
        *,
        unary: Wrap | None = None,
        stream: Wrap | None = None,
        request_deserializer: Wrap | None = None,
    ) -> Handler:
        """`handler` with its behaviour passed through `unary` (a unary call, or a call refused
        before its request is read: auth's refusal, a client stream it never reads) or `stream` (a
        server stream), its request deserializer through `request_deserializer` if given, its
        response serializer kept; `handler` itself when its kind has no wrapper (bidirectional
        streams never do). The wrappers run once per method, in `wrap`: what they return is what
        every call runs."""
        deserialize = handler.request_deserializer
        if request_deserializer is not None:
            deserialize = request_deserializer(deserialize)
        if handler.unary_unary and unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                unary(handler.unary_unary),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary and unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                unary(handler.stream_unary),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                stream(handler.unary_stream),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self.applies(method, handler):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class ErrorMappingInterceptor(WrappingInterceptor):
    """Maps ChatSessionError to its status; anything unexpected becomes a bare INTERNAL (logged
    here with its traceback, never sent to the caller). Writes a stream's replies, each once
    `pacer` gives it its turn (api/pacing.py)."""

    def __init__(self, service_prefix: str, pacer: WritePacer) -> None:
        super().__init__()
        self._prefix = service_prefix
        self._pacer = pacer

    def applies(self, method: str, handler: Handler) -> bool:
        return method.startswith(self._prefix)

    def wrap(self, handler: Handler, method: str) -> Handler:
        return self.rebuilt(
            handler,
            unary=lambda respond: _wrap_unary(respond, method),
            stream=lambda produce: _wrap_stream(produce, method, self._pacer),
            request_deserializer=_tolerant,
        )


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a request whose bytes do not parse. A deserializer that raised would reach
    grpc.aio's generic path (UNKNOWN and a traceback per call); the handler wrapper turns this into
    INVALID_ARGUMENT instead."""

    reason: str


class UndecodableRequest(InvalidArgument):
    """The request is not a valid protobuf message: there is no single field to name."""

    def __init__(self, method: str, reason: str) -> None:
        super().__init__([FieldViolation("", reason)])
        self.args = (f"the request to {method} does not parse: {reason}",)


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:  # says which message type and what broke, never the bytes
            return _Undecodable(str(exc))

    return parse


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        log.debug("%s: request does not parse (%s)", method, loggable(request.reason))
        raise UndecodableRequest(method, request.reason)


async def _abort_for(exc: BaseException, context: aio.ServicerContext[Any, Any], method: str) -> None:
    if isinstance(exc, ChatSessionError):
        await context.abort_with_status(to_grpc_status(exc))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


# The handlers are the servicer's coroutines; grpc's stubs type them as sync callables.
def _wrap_unary(behaviour: Any, method: str) -> Any:
    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            _check_decoded(request, method)
            return await behaviour(request, context)
        except (asyncio.CancelledError, aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return unary


def _wrap_stream(behaviour: Any, method: str, pacer: WritePacer) -> Any:
    # A coroutine that writes, not a generator that yields: one frame less per open stream.
    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        try:
            _check_decoded(request, method)
            items = behaviour(request, context)
            try:
                async for item in items:
                    # A reply serialized once for many watchers is bytes; other replies are small.
                    turn = pacer.turn(len(item) if isinstance(item, bytes) else 0)
                    if turn is not None:
                        await turn
                    try:
                        await context.write(item)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # grpc.aio gave up on the call: the client has gone
                        log.debug("%s: stream ended by the client (%s)", method, type(exc).__name__)
                        return
                    # An idle stream does not hold its last reply (a protobuf, with an arena of its own).
                    del item
            finally:
                # The generator's cleanup (a watcher leaving its feed) runs now, not at GC; by
                # hand, as contextlib.aclosing would be one more object per open stream.
                await items.aclose()
        except (asyncio.CancelledError, aio.AbortError):
            raise
        except Exception as exc:
            if context.cancelled() or context.done():
                return  # the client has gone (a write failed under it): nobody to tell
            await _abort_for(exc, context, method)

    return stream
