"""Domain errors. The store and the servicer raise these; `api/status.py` maps them to gRPC codes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class ChatSessionError(Exception):
    """Base of every error the service reports to its callers on purpose."""


class InvalidArgument(ChatSessionError):
    """`omitted`: how many more violations the request had beyond those listed."""

    def __init__(self, violations: list[FieldViolation], omitted: int = 0) -> None:
        self.violations = violations
        self.omitted = omitted
        more = f"; and {omitted} more" if omitted else ""
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations) + more)


class SessionNotFound(ChatSessionError):
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} not found (it may have expired)")


class SessionAlreadyExists(ChatSessionError):
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} already exists")


class PreconditionFailed(ChatSessionError):
    """The request is valid but the session's state forbids it; `kind` is a stable machine-readable tag."""

    def __init__(self, kind: str, subject: str, description: str) -> None:
        self.kind = kind
        self.subject = subject
        self.description = description
        super().__init__(description)


class StoreUnavailable(ChatSessionError):
    """Valkey cannot be reached (connection refused or lost). Safe to retry."""


class StoreOverloaded(StoreUnavailable):
    """This server has as many Valkey requests in flight as it allows (--valkey-inflight-limit):
    Valkey is busy, not gone. Safe to retry."""


class WriteNotReplicated(StoreUnavailable):
    """The write is on the primary but fewer replicas than required confirmed it. Retry (with
    the same request_id): a failover could still lose it."""


class StoreFull(ChatSessionError):
    """Valkey refuses writes: it is at its memory limit (maxmemory, noeviction). Nothing was
    written; retrying helps only once memory is freed or added."""


class StoreTimeout(ChatSessionError):
    """Valkey did not answer within the request timeout. The write may or may not have happened."""


class ShuttingDown(ChatSessionError):
    """This server is stopping; the caller should reconnect (to another replica)."""


class Unauthenticated(ChatSessionError):
    """No credentials this server knows: no token, an unknown token, an unmapped certificate."""


class PermissionDenied(ChatSessionError):
    """The caller is known but may not act for the user the request names."""


class QuotaExceeded(ChatSessionError):
    """A usage limit of this server is reached: open watches, live sessions of a user, the bytes
    a session may store (--max-session-bytes), what a fork may copy (--max-fork-bytes,
    --max-fork-messages). `limit` names the setting (a stable tag), `value` its value, `subject`
    what it counts against."""

    def __init__(self, limit: str, value: int, subject: str, description: str) -> None:
        self.limit = limit
        self.value = value
        self.subject = subject
        self.description = description
        super().__init__(description)
