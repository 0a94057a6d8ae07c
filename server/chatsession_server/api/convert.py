"""Domain values -> protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_server.domain import (
    Cleared,
    Compacted,
    Heartbeat,
    Role,
    Session,
    StoredMessage,
    Trimmed,
    UsageCounts,
    UserUsage,
    WatchEvent,
)

_ROLE_TO_PROTO = {
    Role.SYSTEM: session_pb2.ROLE_SYSTEM,
    Role.USER: session_pb2.ROLE_USER,
    Role.ASSISTANT: session_pb2.ROLE_ASSISTANT,
    Role.TOOL: session_pb2.ROLE_TOOL,
}


def timestamp(seconds: float) -> Timestamp:
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=round((seconds - whole) * 1_000_000) * 1000)


def session_to_proto(s: Session) -> session_pb2.Session:
    return session_pb2.Session(
        session_id=s.session_id,
        user_id=s.user_id,
        model=s.model,
        title=s.title,
        labels=dict(s.labels),
        created_at=timestamp(s.created_at),
        last_active=timestamp(s.last_active),
        message_count=s.message_count,
        token_count=s.token_count,
        messages_stored=s.messages_stored,
        expires_in_seconds=s.expires_in_seconds,
        ttl_seconds=s.ttl_seconds,
        max_messages=s.max_messages,
    )


def message_to_proto(m: StoredMessage) -> session_pb2.Message:
    message = _message_to_proto(m)
    if m.summarizes is not None:
        message.summarizes.first_seq, message.summarizes.last_seq = m.summarizes
    return message


def _message_to_proto(m: StoredMessage) -> session_pb2.Message:
    return session_pb2.Message(
        seq=m.seq,
        role=_ROLE_TO_PROTO[m.role],
        content=m.content,
        tokens=m.tokens,
        name=m.name,
        metadata=dict(m.metadata),
        created_at=timestamp(m.created_at),
        tool_calls=[session_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls],
        tool_call_id=m.tool_call_id,
    )


def watch_event_to_proto(event: WatchEvent) -> session_service_pb2.WatchMessagesResponse:
    if isinstance(event, StoredMessage):
        return session_service_pb2.WatchMessagesResponse(message=message_to_proto(event))
    if isinstance(event, Heartbeat):
        return session_service_pb2.WatchMessagesResponse(
            heartbeat=session_service_pb2.Heartbeat(last_seq=event.last_seq)
        )
    if isinstance(event, Compacted):
        summarizes = session_pb2.SeqRange(first_seq=event.first_seq, last_seq=event.last_seq)
        return session_service_pb2.WatchMessagesResponse(
            compacted=session_service_pb2.Compacted(summarizes=summarizes)
        )
    if isinstance(event, Cleared):
        return session_service_pb2.WatchMessagesResponse(
            cleared=session_service_pb2.Cleared(last_seq=event.last_seq)
        )
    assert isinstance(event, Trimmed)
    trimmed = session_service_pb2.HistoryTrimmed(
        first_missing_seq=event.first_missing_seq, last_missing_seq=event.last_missing_seq
    )
    return session_service_pb2.WatchMessagesResponse(history_trimmed=trimmed)


def _counts(c: UsageCounts) -> session_service_pb2.UsageCounts:
    return session_service_pb2.UsageCounts(messages=c.messages, tokens=c.tokens, sessions=c.sessions)


def usage_to_proto(u: UserUsage) -> session_service_pb2.GetUserUsageResponse:
    return session_service_pb2.GetUserUsageResponse(
        total=_counts(u.total),
        models=[session_service_pb2.ModelUsage(model=m, usage=_counts(c)) for m, c in u.by_model],
        days=[session_service_pb2.DayUsage(day=d, usage=_counts(c)) for d, c in u.by_day],
    )


def masked_session(full: session_pb2.Session, paths: frozenset[str]) -> session_pb2.Session:
    """Only the fields `paths` name (GetSession's read_mask), the others unset (AIP-157)."""
    out = session_pb2.Session()
    for path in paths:
        if path.startswith("labels."):
            key = path[len("labels.") :]
            if key in full.labels:
                out.labels[key] = full.labels[key]
        elif path == "labels":
            out.labels.update(full.labels)
        elif path in ("created_at", "last_active"):
            getattr(out, path).CopyFrom(getattr(full, path))
        else:
            setattr(out, path, getattr(full, path))
    return out
