"""Cross-cutting server behaviour: domain errors become statuses here, not in each handler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from chatsession_server.api.status import to_grpc_status
from chatsession_server.errors import ChatSessionError

log = logging.getLogger(__name__)


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps ChatSessionError to its status; anything unexpected becomes a bare INTERNAL (logged
    here with its traceback, never sent to the caller)."""

    def __init__(self, service_prefix: str) -> None:
        self._prefix = service_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort_for(exc: BaseException, context: aio.ServicerContext[Any, Any], method: str) -> None:
    if isinstance(exc, ChatSessionError):
        await context.abort_with_status(to_grpc_status(exc))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


# The handlers are the servicer's coroutines; grpc's stubs type them as sync callables.
def _wrap_unary(behaviour: Any, method: str) -> Any:
    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behaviour(request, context)
        except (asyncio.CancelledError, aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return unary


def _wrap_stream(behaviour: Any, method: str) -> Any:
    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, context):
                yield item
        except (asyncio.CancelledError, aio.AbortError, GeneratorExit):
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return stream
