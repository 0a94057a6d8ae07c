"""The domain error a script's refusal stands for: one function per script, from the status its
reply starts with (and the figures that follow it). The error texts are part of the API."""

from __future__ import annotations

from typing import Any

from chatsession_server.domain import FORKED_FROM_LABEL, Compaction, NewFork, Truncation
from chatsession_server.errors import (
    ChatSessionError,
    FieldViolation,
    InvalidArgument,
    PreconditionFailed,
    QuotaExceeded,
    SessionNotFound,
)
from chatsession_server.store.lua.runtime import Status


def request_id_reused(request_id: str) -> PreconditionFailed:
    """An append, compaction, clear or truncation whose request_id this session recorded for another
    request (request_ids of the four share one record per session)."""
    return PreconditionFailed(
        "REQUEST_ID_REUSED",
        "request_id",
        f"request_id {request_id!r} was already used for another request in this session",
    )


def update_refused(status: Status, reply: Any, session_id: str, max_labels: int) -> ChatSessionError:
    if status is Status.TOO_MANY_LABELS:
        return InvalidArgument(
            [
                FieldViolation(
                    "session.labels",
                    f"the session would have {int(reply[1])} labels; the limit is {max_labels}",
                )
            ]
        )
    return SessionNotFound(session_id)


def append_refused(
    status: Status,
    reply: Any,
    *,
    session_id: str,
    request_id: str,
    expected_last_seq: int | None,
    max_session_bytes: int,
) -> ChatSessionError:
    if status is Status.REQUEST_ID_REUSED:
        return request_id_reused(request_id)
    if status is Status.TOO_LARGE:
        return QuotaExceeded(
            "max_session_bytes",
            max_session_bytes,
            f"session {session_id}",
            f"session {session_id!r} stores {int(reply[1])} bytes and this append adds {int(reply[2])}: "
            f"the limit per session is {max_session_bytes} (--max-session-bytes); set a window "
            "(max_messages) or start a new session",
        )
    if status is Status.SEQ_MISMATCH:
        return PreconditionFailed(
            "LAST_SEQ_MISMATCH",
            "expected_last_seq",
            f"the session's last seq is {int(reply[1])}, not {expected_last_seq}",
        )
    return SessionNotFound(session_id)


def fork_read_refused(
    status: Status, reply: Any, fork: NewFork, *, max_fork_bytes: int, max_fork_messages: int
) -> ChatSessionError:
    if status is Status.TOO_LARGE:
        return _fork_too_large(
            fork.source_id, int(reply[1]), int(reply[2]), max_fork_bytes, max_fork_messages
        )
    if status is Status.BEYOND_LAST:
        return PreconditionFailed(
            "AT_SEQ_BEYOND_LAST",
            "at_seq",
            f"session {fork.source_id!r} ends at seq {int(reply[1])}: at_seq {fork.at_seq} is beyond it",
        )
    if status is Status.TRIMMED:
        pinned, base, summary_seq = int(reply[1]), int(reply[2]), int(reply[3])
        at_summary = f", {summary_seq} (the summary)" if summary_seq > 0 else ""
        return PreconditionFailed(
            "AT_SEQ_TRIMMED",
            "at_seq",
            f"seq {fork.at_seq} of session {fork.source_id!r} was trimmed by the window or compacted: "
            f"fork at 0-{pinned} (the prompt){at_summary} or after {base}",
        )
    return SessionNotFound(fork.source_id)


def _fork_too_large(
    source: str, stored_bytes: int, stored_messages: int, max_fork_bytes: int, max_fork_messages: int
) -> QuotaExceeded:
    if max_fork_bytes and stored_bytes > max_fork_bytes:
        limit, value, held = "max_fork_bytes", max_fork_bytes, f"{stored_bytes} bytes"
    else:
        limit, value, held = "max_fork_messages", max_fork_messages, f"{stored_messages} messages"
    flag = "--" + limit.replace("_", "-")
    return QuotaExceeded(
        limit,
        value,
        f"session {source}",
        f"session {source!r} stores {held}, more than a fork may copy ({flag} {value}): "
        "compact it (CompactMessages) first",
    )


def fork_labels_full(source: str, labels: int, max_labels: int) -> PreconditionFailed:
    """`forked_from` would take the fork past the label limit, and every later UpdateSession of it
    would be refused: the fork is refused instead, before anything is written."""
    return PreconditionFailed(
        "LABELS_FULL",
        "session_id",
        f"a fork of session {source!r} would have {labels} labels (with "
        f"`{FORKED_FROM_LABEL}`), more than the limit of {max_labels}: remove one first",
    )


def context_refused(
    status: Status, reply: Any, *, session_id: str, max_tokens: int, page_bytes: int
) -> ChatSessionError:
    if status is Status.OVER_BUDGET:
        return PreconditionFailed(
            "CONTEXT_OVER_BUDGET",
            "max_tokens",
            f"the pinned system prompt and the summary alone take {int(reply[1])} tokens, more than "
            f"max_tokens {max_tokens}",
        )
    if status is Status.REPLY_TOO_LARGE:
        return PreconditionFailed(
            "CONTEXT_TOO_LARGE",
            "session_id",
            f"the pinned system prompt and the summary alone take {int(reply[1])} bytes, more than "
            f"a reply holds ({page_bytes}); read them with ListMessages",
        )
    return SessionNotFound(session_id)


def compaction_refused(
    status: Status, reply: Any, *, session_id: str, compaction: Compaction, max_session_bytes: int
) -> ChatSessionError:
    if status is Status.REQUEST_ID_REUSED:
        return request_id_reused(compaction.request_id)
    if status is Status.UP_TO_SEQ_AHEAD:
        return PreconditionFailed(
            "UP_TO_SEQ_AHEAD",
            "up_to_seq",
            f"up_to_seq {compaction.up_to_seq} is beyond the session's last seq {int(reply[1])}",
        )
    if status is Status.UP_TO_SEQ_IN_PROMPT:
        return PreconditionFailed(
            "UP_TO_SEQ_IN_PROMPT",
            "up_to_seq",
            f"up_to_seq {compaction.up_to_seq} is within the pinned system prompt "
            f"(seqs 1-{int(reply[1])}), which is never compacted",
        )
    if status is Status.TOO_LARGE:
        return QuotaExceeded(
            "max_session_bytes",
            max_session_bytes,
            f"session {session_id}",
            f"session {session_id!r} stores {int(reply[1])} bytes and would store {int(reply[2])} "
            f"after this compaction: the limit per session is {max_session_bytes} "
            "(--max-session-bytes); write a shorter summary",
        )
    if status is Status.ALREADY_COMPACTED:
        return PreconditionFailed(
            "ALREADY_COMPACTED",
            "up_to_seq",
            f"up_to_seq {compaction.up_to_seq} is below the last seq {int(reply[1])} an earlier "
            "compaction replaced",
        )
    return SessionNotFound(session_id)


def summary_cleared(request_id: str) -> PreconditionFailed:
    """A compaction's replay after a clear: the summary it stored is gone."""
    return PreconditionFailed(
        "SUMMARY_CLEARED",
        "request_id",
        f"request_id {request_id!r} compacted this session, but it has been cleared since",
    )


def clear_refused(status: Status, session_id: str, request_id: str) -> ChatSessionError:
    if status is Status.REQUEST_ID_REUSED:
        return request_id_reused(request_id)
    return SessionNotFound(session_id)


def state_full(reply: Any, *, field: str, max_keys: int, max_bytes: int) -> PreconditionFailed:
    """A state change that would take the state past --max-state-keys or --max-state-bytes (and
    grow it): nothing was changed (nor appended, for an append's state_delta)."""
    keys, size = int(reply[1]), int(reply[2])
    if keys > max_keys:
        held = f"{keys} keys; the limit is {max_keys} (--max-state-keys)"
    else:
        held = f"{size} bytes of keys and JSON values; the limit is {max_bytes} (--max-state-bytes)"
    return PreconditionFailed("STATE_FULL", field, f"the state would hold {held}: remove keys first")


def truncation_refused(
    status: Status,
    reply: Any,
    *,
    session_id: str,
    truncation: Truncation,
    max_removed_messages: int,
    max_removed_bytes: int,
) -> ChatSessionError:
    if status is Status.REQUEST_ID_REUSED:
        return request_id_reused(truncation.request_id)
    if status is Status.SEQ_MISMATCH:
        return PreconditionFailed(
            "LAST_SEQ_MISMATCH",
            "expected_last_seq",
            f"the session's last seq is {int(reply[1])}, not {truncation.expected_last_seq}",
        )
    if status is Status.BEYOND_LAST:
        return PreconditionFailed(
            "AFTER_SEQ_AHEAD",
            "after_seq",
            f"after_seq {truncation.after_seq} is beyond the session's last seq {int(reply[1])}",
        )
    if status is Status.TRIMMED:
        pinned, base, summary_seq = int(reply[1]), int(reply[2]), int(reply[3])
        at_summary = f", {summary_seq} (keeps the summary)" if summary_seq > 0 else ""
        return PreconditionFailed(
            "AFTER_SEQ_TRIMMED",
            "after_seq",
            f"seq {truncation.after_seq} of session {session_id!r} was trimmed by the window or "
            f"compacted, so the history cannot be taken back to it: truncate at 0-{pinned} (the "
            f"prompt){at_summary} or after {base}",
        )
    if status is Status.TOO_LARGE:
        removed, size = int(reply[1]), int(reply[2])
        held = f"{size} bytes of them" if size >= 0 else f"{removed} messages"
        return PreconditionFailed(
            "REMOVED_TOO_LARGE",
            "return_removed",
            f"this truncation would remove {removed} messages and return {held}, more than a reply "
            f"holds ({max_removed_messages} messages, {max_removed_bytes} bytes): truncate in steps "
            "(a higher after_seq first) or without return_removed",
        )
    return SessionNotFound(session_id)
