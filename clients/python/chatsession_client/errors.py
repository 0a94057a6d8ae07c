"""One exception class per gRPC status code, carrying the server's google.rpc details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ChatSessionError(Exception):
    """An RPC failed. `code` is the gRPC status; `field_violations` name bad request fields."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        precondition_failures: tuple[tuple[str, str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field_violations = field_violations
        self.precondition_failures = precondition_failures
        """(type, subject, description) of each google.rpc.PreconditionFailure violation."""

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            text += " [" + "; ".join(f"{v.field}: {v.description}" for v in self.field_violations) + "]"
        return text


class InvalidArgumentError(ChatSessionError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ChatSessionError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ChatSessionError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ChatSessionError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(ChatSessionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ChatSessionError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDeniedError(ChatSessionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ChatSessionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(ChatSessionError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CancelledError(ChatSessionError):
    code = grpc.StatusCode.CANCELLED


class InternalError(ChatSessionError):
    code = grpc.StatusCode.INTERNAL


class UnimplementedError(ChatSessionError):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[ChatSessionError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnavailableError,
        DeadlineExceededError,
        PermissionDeniedError,
        UnauthenticatedError,
        ResourceExhaustedError,
        CancelledError,
        InternalError,
        UnimplementedError,
    )
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> ChatSessionError:
    """The matching exception for a failed call, with BadRequest/PreconditionFailure unpacked."""
    violations: list[FieldViolation] = []
    preconditions: list[tuple[str, str, str]] = []
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
                failure = error_details_pb2.PreconditionFailure()
                detail.Unpack(failure)
                preconditions.extend((v.type, v.subject, v.description) for v in failure.violations)
    cls = _BY_CODE.get(error.code(), ChatSessionError)
    exc = cls(
        error.details() or "", field_violations=tuple(violations), precondition_failures=tuple(preconditions)
    )
    if cls is ChatSessionError:
        exc.code = error.code()
    return exc
