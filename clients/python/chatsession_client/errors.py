"""One exception class per gRPC status code, carrying the server's google.rpc details.

Shared by the async and the blocking client: `from_rpc_error` is the one table from a failed
call to an exception."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """A bad request field (google.rpc.BadRequest)."""

    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    """Why the session's state forbids the call (google.rpc.PreconditionFailure). `type` is a
    stable tag, such as LAST_SEQ_MISMATCH; the typed subclasses of FailedPreconditionError
    match on it."""

    type: str
    subject: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """The limit a call went past (google.rpc.QuotaFailure): `quota_id` is the server setting's
    name (max_sessions_per_user), `quota_value` its value, `subject` what it counts against."""

    subject: str
    description: str
    quota_id: str
    quota_value: int


@dataclass(frozen=True)
class ResourceInfo:
    """The resource a NOT_FOUND or ALREADY_EXISTS is about (google.rpc.ResourceInfo)."""

    resource_type: str
    resource_name: str
    owner: str
    description: str


class ChatSessionError(Exception):
    """An RPC failed. `code` is the gRPC status; the other attributes hold the status details
    the server sent (empty when it sent none)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        precondition_violations: tuple[PreconditionViolation, ...] = (),
        quota_violations: tuple[QuotaViolation, ...] = (),
        resource: ResourceInfo | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field_violations = field_violations
        self.precondition_violations = precondition_violations
        self.quota_violations = quota_violations
        self.resource = resource
        self.retry_delay = retry_delay
        """Seconds the server asked callers to wait before retrying (google.rpc.RetryInfo)."""

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
    violation_type = ""
    """The PreconditionFailure violation type a subclass stands for."""


class SeqMismatchError(FailedPreconditionError):
    """`expected_last_seq` was not the session's last seq: someone else appended meanwhile."""

    violation_type = "LAST_SEQ_MISMATCH"


class RequestIdReusedError(FailedPreconditionError):
    """The `request_id` of an append, a compaction, a clear or a truncation was already used for
    another request in this session (the four share one record per request_id)."""

    violation_type = "REQUEST_ID_REUSED"


class AfterSeqAheadError(FailedPreconditionError):
    """A watch's or a truncation's `after_seq` is beyond the session's last seq (was the session
    re-created?)."""

    violation_type = "AFTER_SEQ_AHEAD"


class AfterSeqTrimmedError(FailedPreconditionError):
    """TruncateMessages: `after_seq` was trimmed by the window or replaced by a compaction, so the
    history cannot be taken back to it (the description says which seqs can)."""

    violation_type = "AFTER_SEQ_TRIMMED"


class RemovedTooLargeError(FailedPreconditionError):
    """TruncateMessages with return_removed: the removed messages would not fit a reply (1000
    messages, about 3 MiB); nothing was removed. Truncate in steps or without return_removed."""

    violation_type = "REMOVED_TOO_LARGE"


class PoppedMessageLostError(ChatSessionError):
    """pop_message: an earlier attempt of this very call popped the message but its answer was
    lost, and the retry (the same request_id) can only say that it was done: the message is gone.
    Raised by the client, not sent by the server."""

    code = grpc.StatusCode.ABORTED


class ContextOverBudgetError(FailedPreconditionError):
    """GetContext: the pinned system prompt and the summary alone take more than `max_tokens`."""

    violation_type = "CONTEXT_OVER_BUDGET"


class ContextTooLargeError(FailedPreconditionError):
    """GetContext: the pinned system prompt and the summary alone are more bytes than a reply
    holds; read them with list_messages."""

    violation_type = "CONTEXT_TOO_LARGE"


class UpToSeqAheadError(FailedPreconditionError):
    """CompactMessages: `up_to_seq` is beyond the session's last seq."""

    violation_type = "UP_TO_SEQ_AHEAD"


class UpToSeqInPromptError(FailedPreconditionError):
    """CompactMessages: `up_to_seq` is within the pinned system prompt, which is never compacted."""

    violation_type = "UP_TO_SEQ_IN_PROMPT"


class AlreadyCompactedError(FailedPreconditionError):
    """CompactMessages: `up_to_seq` is below the last seq an earlier compaction replaced."""

    violation_type = "ALREADY_COMPACTED"


class SummaryClearedError(FailedPreconditionError):
    """CompactMessages: a retry of a compaction whose summary a clear has removed since."""

    violation_type = "SUMMARY_CLEARED"


class AtSeqBeyondLastError(FailedPreconditionError):
    """ForkSession: `at_seq` is beyond the source session's last seq."""

    violation_type = "AT_SEQ_BEYOND_LAST"


class AtSeqTrimmedError(FailedPreconditionError):
    """ForkSession: `at_seq` was trimmed by the window or replaced by a compaction."""

    violation_type = "AT_SEQ_TRIMMED"


class LabelsFullError(FailedPreconditionError):
    """ForkSession: the fork, with its `forked_from` label, would have more labels than the
    server allows; remove a label from the source first."""

    violation_type = "LABELS_FULL"


class StateFullError(FailedPreconditionError):
    """UpdateState or an append's state_delta: the state would hold more keys or bytes than the
    server allows (--max-state-keys, --max-state-bytes); nothing was changed (nor appended)."""

    violation_type = "STATE_FULL"


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


class CallCancelledError(ChatSessionError):
    """The call was cancelled (gRPC CANCELLED); not asyncio.CancelledError."""

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
        CallCancelledError,
        InternalError,
        UnimplementedError,
    )
}

_BY_PRECONDITION: dict[str, type[FailedPreconditionError]] = {
    cls.violation_type: cls
    for cls in (
        SeqMismatchError,
        RequestIdReusedError,
        AfterSeqAheadError,
        AfterSeqTrimmedError,
        RemovedTooLargeError,
        ContextOverBudgetError,
        ContextTooLargeError,
        UpToSeqAheadError,
        UpToSeqInPromptError,
        AlreadyCompactedError,
        SummaryClearedError,
        AtSeqBeyondLastError,
        AtSeqTrimmedError,
        LabelsFullError,
        StateFullError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> ChatSessionError:
    """The matching exception for a failed call (grpc or grpc.aio), with its details unpacked."""
    if not isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return ChatSessionError(str(error))
    fields: list[FieldViolation] = []
    preconditions: list[PreconditionViolation] = []
    quotas: list[QuotaViolation] = []
    resource: ResourceInfo | None = None
    retry_delay: float | None = None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            preconditions.extend(
                PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations
            )
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            quotas.extend(
                QuotaViolation(v.subject, v.description, v.quota_id, v.quota_value) for v in quota.violations
            )
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            resource = ResourceInfo(info.resource_type, info.resource_name, info.owner, info.description)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
    code = error.code()
    cls = _BY_CODE.get(code, ChatSessionError)
    if cls is FailedPreconditionError and len(preconditions) == 1:
        cls = _BY_PRECONDITION.get(preconditions[0].type, FailedPreconditionError)
    exc = cls(
        error.details() or "",
        field_violations=tuple(fields),
        precondition_violations=tuple(preconditions),
        quota_violations=tuple(quotas),
        resource=resource,
        retry_delay=retry_delay,
    )
    if cls is ChatSessionError:
        exc.code = code
    return exc
