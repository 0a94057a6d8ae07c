"""The one table from domain errors to gRPC status codes, with google.rpc rich details, and the
one place that says which code an exception ends a call with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from chatsession_server.errors import (
    ChatSessionError,
    InvalidArgument,
    PermissionDenied,
    PreconditionFailed,
    QuotaExceeded,
    SessionAlreadyExists,
    SessionNotFound,
    ShuttingDown,
    StoreFull,
    StoreTimeout,
    StoreUnavailable,
    Unauthenticated,
)

SESSION_RESOURCE = "chatsession.v1.Session"

# The status travels in trailers, and clients refuse trailers over 16 KiB (gRPC core also starts
# dropping them at random above 8 KiB). The message goes out percent-encoded (up to 3x) and again
# inside the base64 details (4/3x), so keep the whole error to about 6 KiB on the wire however
# many fields were bad or however long the names they echo.
MAX_STATUS_MESSAGE_BYTES = 512
MAX_SHOWN_VIOLATIONS = 20
MAX_VIOLATION_TEXT_BYTES = 256
MAX_BAD_REQUEST_BYTES = 3 * 1024


def _clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, marked with an ellipsis when cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode(errors="ignore") + "…"


def _bad_request(e: ChatSessionError) -> list[Message]:
    assert isinstance(e, InvalidArgument)
    bad = error_details_pb2.BadRequest()
    for shown, v in enumerate(e.violations):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_clip(v.field, MAX_VIOLATION_TEXT_BYTES),
            description=_clip(v.description, MAX_VIOLATION_TEXT_BYTES),
        )
        if shown == MAX_SHOWN_VIOLATIONS or bad.ByteSize() + violation.ByteSize() > MAX_BAD_REQUEST_BYTES:
            more = len(e.violations) - shown + e.omitted
            bad.field_violations.add(description=_more(more, e.omitted))
            break
        bad.field_violations.append(violation)
    else:
        if e.omitted:
            bad.field_violations.add(description=_more(e.omitted, e.omitted))
    return [bad]


def _more(count: int, omitted: int) -> str:
    # Validation stops once it has found enough (`omitted` > 0): the true count may be higher.
    return f"and {'at least ' if omitted else ''}{count} more violations not shown"


def _resource(e: ChatSessionError) -> list[Message]:
    assert isinstance(e, SessionNotFound | SessionAlreadyExists)
    return [error_details_pb2.ResourceInfo(resource_type=SESSION_RESOURCE, resource_name=e.session_id)]


def _precondition(e: ChatSessionError) -> list[Message]:
    assert isinstance(e, PreconditionFailed)
    violation = error_details_pb2.PreconditionFailure.Violation(
        type=e.kind,
        subject=_clip(e.subject, MAX_VIOLATION_TEXT_BYTES),
        description=_clip(e.description, MAX_VIOLATION_TEXT_BYTES),
    )
    return [error_details_pb2.PreconditionFailure(violations=[violation])]


def _quota(e: ChatSessionError) -> list[Message]:
    assert isinstance(e, QuotaExceeded)
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=_clip(e.subject, MAX_VIOLATION_TEXT_BYTES),
        description=_clip(e.description, MAX_VIOLATION_TEXT_BYTES),
        quota_id=e.limit,
        quota_value=e.value,
    )
    return [error_details_pb2.QuotaFailure(violations=[violation])]


def _retry_soon(e: ChatSessionError) -> list[Message]:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(200)
    return [info]


def _none(e: ChatSessionError) -> list[Message]:
    return []


ERROR_TABLE: dict[type[ChatSessionError], tuple[int, Callable[[ChatSessionError], list[Message]]]] = {
    InvalidArgument: (code_pb2.INVALID_ARGUMENT, _bad_request),
    SessionNotFound: (code_pb2.NOT_FOUND, _resource),
    SessionAlreadyExists: (code_pb2.ALREADY_EXISTS, _resource),
    PreconditionFailed: (code_pb2.FAILED_PRECONDITION, _precondition),
    QuotaExceeded: (code_pb2.RESOURCE_EXHAUSTED, _quota),
    StoreUnavailable: (code_pb2.UNAVAILABLE, _retry_soon),
    ShuttingDown: (code_pb2.UNAVAILABLE, _retry_soon),
    StoreTimeout: (code_pb2.DEADLINE_EXCEEDED, _none),
    StoreFull: (code_pb2.RESOURCE_EXHAUSTED, _none),
    Unauthenticated: (code_pb2.UNAUTHENTICATED, _none),
    PermissionDenied: (code_pb2.PERMISSION_DENIED, _none),
}


def to_grpc_status(error: ChatSessionError) -> grpc.Status:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            code, details = ERROR_TABLE[cls]
            break
    else:
        code, details = code_pb2.INTERNAL, _none
    status = status_pb2.Status(code=code, message=_clip(str(error), MAX_STATUS_MESSAGE_BYTES))
    for detail in details(error):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    grpc_status: grpc.Status = rpc_status.to_status(status)
    return grpc_status


def code_of(exc: BaseException, context: aio.ServicerContext[Any, Any], *, mapped: bool) -> grpc.StatusCode:
    """The code a call ends with when `exc` ends it: an abort's own; CANCELLED for a cancelled
    call (or a stream closed under it). Anything else depends on where `exc` is met. `mapped`: met
    outside the error mapping (interceptors.ErrorMappingInterceptor), which makes every error it
    sees an abort, so what escapes it gets grpc.aio's answer, UNKNOWN. Not `mapped`: met inside
    it, where a ChatSessionError is still to become its code from the table, and anything else
    INTERNAL."""
    if isinstance(exc, aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if mapped:
        return grpc.StatusCode.UNKNOWN
    if isinstance(exc, ChatSessionError):
        return to_grpc_status(exc).code  # the whole status: only on errors, and only when tracing
    return grpc.StatusCode.INTERNAL
