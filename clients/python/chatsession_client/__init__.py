"""Async Python client for chatsession.v1.SessionService."""

from chatsession_client.client import (
    Message,
    Session,
    SessionClient,
    assistant,
    message,
    system,
    tool,
    user,
)
from chatsession_client.errors import (
    AlreadyExistsError,
    ChatSessionError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from chatsession_client.retry import NO_RETRY, Retry

__all__ = [
    "NO_RETRY",
    "AlreadyExistsError",
    "ChatSessionError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "Message",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Retry",
    "Session",
    "SessionClient",
    "UnauthenticatedError",
    "UnavailableError",
    "assistant",
    "message",
    "system",
    "tool",
    "user",
]
