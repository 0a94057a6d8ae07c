"""What the async and the blocking client share apart from I/O: message and request building,
TLS options, page continuation and the watch cursor. A client method builds its request here,
makes the call its own way, and asks here how to go on."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_client._payload import payload_value
from chatsession_client.errors import PoppedMessageLostError

Session = session_pb2.Session
Message = session_pb2.Message

_ROLES = {
    "system": session_pb2.ROLE_SYSTEM,
    "user": session_pb2.ROLE_USER,
    "assistant": session_pb2.ROLE_ASSISTANT,
    "tool": session_pb2.ROLE_TOOL,
}


_NO_PAYLOAD: Any = object()
"""`message`'s default payload: none (None is JSON null, a payload like any other)."""


def message(
    role: str | int,
    content: str,
    *,
    tokens: int = 0,
    name: str = "",
    metadata: Mapping[str, str] | None = None,
    tool_calls: Iterable[tuple[str, str, str]] = (),
    tool_call_id: str = "",
    payload: Any = _NO_PAYLOAD,
    created_at: datetime.datetime | float | None = None,
) -> Message:
    """Build a Message; `role` is "system"/"user"/"assistant"/"tool" or a Role value.
    `tool_calls` are (id, name, arguments) triples. `payload`: any JSON-able value (dicts with
    str keys, lists, str, int within +-2^53, finite float, bool, None) stored with the message
    and read back with `payload_of`; left out, the message has none. `created_at`: the message's
    own time (an aware datetime, or unix seconds), kept to the microsecond, for imports and
    frameworks with their own clock; at most the server's max_clock_skew_seconds (default 300)
    ahead of its clock; left out, the server's time of the append."""
    out = Message(
        role=_ROLES[role] if isinstance(role, str) else role,  # type: ignore[arg-type]
        content=content,
        tokens=tokens,
        name=name,
        metadata=dict(metadata or {}),
        tool_calls=[session_pb2.ToolCall(id=i, name=n, arguments=a) for i, n, a in tool_calls],
        tool_call_id=tool_call_id,
    )
    if payload is not _NO_PAYLOAD:
        out.payload.CopyFrom(payload_value(payload))
    if created_at is not None:
        if isinstance(created_at, datetime.datetime):
            if created_at.tzinfo is None:
                raise ValueError("created_at: a naive datetime is ambiguous; give it a tzinfo")
            out.created_at.FromDatetime(created_at)
        else:
            seconds, micros = divmod(round(created_at * 1_000_000), 1_000_000)
            out.created_at.seconds, out.created_at.nanos = seconds, micros * 1000
    return out


def system(content: str, **kw: Any) -> Message:
    return message("system", content, **kw)


def user(content: str, **kw: Any) -> Message:
    return message("user", content, **kw)


def assistant(content: str, **kw: Any) -> Message:
    return message("assistant", content, **kw)


def tool(content: str, **kw: Any) -> Message:
    return message("tool", content, **kw)


def channel_credentials(
    *,
    tls: bool,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    credentials: grpc.ChannelCredentials | None,
    channel_given: bool,
) -> grpc.ChannelCredentials | None:
    """The credentials of the client's own channel, None for plaintext."""
    pem_given = root_certificates is not None or private_key is not None or certificate_chain is not None
    if credentials is not None and pem_given:
        raise ValueError("pass either credentials or root_certificates/private_key/certificate_chain")
    if credentials is None and (tls or pem_given):
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    if channel_given and credentials is not None:
        raise ValueError("TLS options configure the client's own channel: not with channel=")
    return credentials


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    # Plain metadata rather than call credentials: those need TLS, and a token over plaintext
    # to a server on the same host is a normal development setup.
    return () if token is None else (("authorization", f"Bearer {token}"),)


def create_session_request(
    user_id: str,
    *,
    session_id: str = "",
    model: str = "",
    title: str = "",
    labels: Mapping[str, str] | None = None,
    ttl_seconds: int = 0,
    max_messages: int = 0,
    request_id: str | None = None,
    app: str = "",
) -> session_service_pb2.CreateSessionRequest:
    return session_service_pb2.CreateSessionRequest(
        app=app,
        session_id=session_id,
        user_id=user_id,
        model=model,
        title=title,
        labels=dict(labels or {}),
        ttl_seconds=ttl_seconds,
        max_messages=max_messages,
        # Made once per call, so every retry of it carries the same id.
        request_id=request_id_or_new(request_id),
    )


def update_session_request(
    session_id: str,
    *,
    title: str | None = None,
    model: str | None = None,
    labels: Mapping[str, str] | None = None,
    ttl_seconds: int | None = None,
    max_messages: int | None = None,
) -> session_service_pb2.UpdateSessionRequest:
    """An update mask built from the arguments that are not None."""
    session = Session(session_id=session_id)
    paths: list[str] = []
    if title is not None:
        session.title = title
        paths.append("title")
    if model is not None:
        session.model = model
        paths.append("model")
    if ttl_seconds is not None:
        session.ttl_seconds = ttl_seconds
        paths.append("ttl_seconds")
    if max_messages is not None:
        session.max_messages = max_messages
        paths.append("max_messages")
    if labels is not None:
        session.labels.update(labels)
        paths.append("labels")
    return session_service_pb2.UpdateSessionRequest(
        session=session, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def delete_session_requests(
    session_id: str, allow_missing: bool
) -> tuple[session_service_pb2.DeleteSessionRequest, session_service_pb2.DeleteSessionRequest]:
    """The first attempt's request and the retries': a retry that finds the session gone (deleted
    by an attempt whose answer was lost) succeeds."""
    return (
        session_service_pb2.DeleteSessionRequest(session_id=session_id, allow_missing=allow_missing),
        session_service_pb2.DeleteSessionRequest(session_id=session_id, allow_missing=True),
    )


def append_request(
    session_id: str,
    messages: Iterable[Message],
    *,
    request_id: str | None = None,
    expected_last_seq: int | None = None,
) -> session_service_pb2.AppendMessagesRequest:
    request = session_service_pb2.AppendMessagesRequest(
        session_id=session_id,
        messages=list(messages),
        # Made once per call, so every retry of it carries the same id and is never stored twice.
        request_id=request_id_or_new(request_id),
    )
    if expected_last_seq is not None:
        request.expected_last_seq = expected_last_seq
    return request


def clear_messages_request(
    session_id: str, *, keep_system_prompt: bool = False, request_id: str | None = None
) -> session_service_pb2.ClearMessagesRequest:
    return session_service_pb2.ClearMessagesRequest(
        session_id=session_id,
        keep_system_prompt=keep_system_prompt,
        # Made once per call: a retry of a clear whose answer was lost empties nothing appended since.
        request_id=request_id_or_new(request_id),
    )


def truncate_messages_request(
    session_id: str,
    after_seq: int | None = None,
    *,
    pop_count: int = 0,
    expected_last_seq: int | None = None,
    request_id: str | None = None,
    return_removed: bool = False,
) -> session_service_pb2.TruncateMessagesRequest:
    request = session_service_pb2.TruncateMessagesRequest(
        session_id=session_id,
        pop_count=pop_count,
        return_removed=return_removed,
        # Made once per call: a retry of a truncation whose answer was lost removes nothing more
        # (not even what was appended since).
        request_id=request_id_or_new(request_id),
    )
    if after_seq is not None:
        request.after_seq = after_seq
    if expected_last_seq is not None:
        request.expected_last_seq = expected_last_seq
    return request


def popped_message(session_id: str, reply: session_service_pb2.TruncateMessagesResponse) -> Message | None:
    """pop_message's answer: the message removed, None when the session stored none."""
    if reply.removed_messages:
        return reply.removed_messages[-1]
    if reply.removed_count:
        raise PoppedMessageLostError(
            f"session {session_id!r}: an earlier attempt of this pop removed its newest message, but "
            "its answer was lost; the message is gone"
        )
    return None


def list_sessions_request(
    user_id: str | None, *, app: str | None = None, page_size: int = 0, page_token: str = ""
) -> session_service_pb2.ListSessionsRequest:
    return session_service_pb2.ListSessionsRequest(
        user_id=user_id or "", app=app or "", page_size=page_size, page_token=page_token
    )


def list_messages_request(
    session_id: str,
    *,
    page_size: int = 0,
    after_seq: int | None = None,
    before_seq: int | None = None,
) -> session_service_pb2.ListMessagesRequest:
    request = session_service_pb2.ListMessagesRequest(session_id=session_id, page_size=page_size)
    if after_seq is not None:
        request.after_seq = after_seq
    if before_seq is not None:
        request.before_seq = before_seq
    return request


def get_session_request(
    session_id: str, *, read_mask: Iterable[str] | None = None
) -> session_service_pb2.GetSessionRequest:
    request = session_service_pb2.GetSessionRequest(session_id=session_id)
    if read_mask is not None:
        request.read_mask.paths.extend(read_mask)
    return request


def fork_session_request(
    session_id: str,
    *,
    at_seq: int | None = None,
    new_session_id: str = "",
    request_id: str | None = None,
) -> session_service_pb2.ForkSessionRequest:
    request = session_service_pb2.ForkSessionRequest(
        session_id=session_id,
        new_session_id=new_session_id,
        # Made once per call, so every retry of it returns the same fork.
        request_id=request_id_or_new(request_id),
    )
    if at_seq is not None:
        request.at_seq = at_seq
    return request


def get_user_usage_request(user_id: str) -> session_service_pb2.GetUserUsageRequest:
    return session_service_pb2.GetUserUsageRequest(user_id=user_id)


def get_context_request(
    session_id: str, *, max_tokens: int = 0, max_messages: int = 0
) -> session_service_pb2.GetContextRequest:
    return session_service_pb2.GetContextRequest(
        session_id=session_id, max_tokens=max_tokens, max_messages=max_messages
    )


def compact_messages_request(
    session_id: str, up_to_seq: int, summary: Message, *, request_id: str | None = None
) -> session_service_pb2.CompactMessagesRequest:
    return session_service_pb2.CompactMessagesRequest(
        session_id=session_id,
        up_to_seq=up_to_seq,
        summary=summary,
        # Made once per call, so every retry of it compacts once and returns `replayed`.
        request_id=request_id_or_new(request_id),
    )


def next_page_token(page: session_service_pb2.ListSessionsResponse) -> str | None:
    """The token of the page after `page`, None when it was the last."""
    return page.next_page_token or None


def next_after_seq(page: session_service_pb2.ListMessagesResponse) -> int | None:
    """The `after_seq` of the page after `page` (read forward), None when it was the last."""
    if not page.has_more or not page.messages:
        return None
    return page.messages[-1].seq


def request_id_or_new(request_id: str | None) -> str:
    """The caller's request_id, or a fresh one: made once per call, so every retry of it repeats it."""
    return request_id if request_id is not None else uuid.uuid4().hex


class WatchCursor:
    """Where a watch stands: the last seq it delivered (or was told it starts after), so that
    reconnecting with it as `after_seq` neither repeats nor loses a message."""

    def __init__(self, after_seq: int | None) -> None:
        self.seq = after_seq

    def request(self, session_id: str) -> session_service_pb2.WatchMessagesRequest:
        request = session_service_pb2.WatchMessagesRequest(session_id=session_id)
        if self.seq is not None:
            request.after_seq = self.seq
        return request

    def advance(self, event: session_service_pb2.WatchMessagesResponse, include_heartbeats: bool) -> bool:
        """Move past `event`; whether the caller is to see it."""
        kind = event.WhichOneof("event")
        if kind == "message":
            self.seq = event.message.seq
        elif kind == "history_trimmed":
            self.seq = event.history_trimmed.last_missing_seq
        elif kind == "truncated":
            # Seqs go on after the last one at the truncation; messages before after_seq still
            # come when the cursor is below it.
            if self.seq is not None and self.seq > event.truncated.after_seq:
                self.seq = max(self.seq, event.truncated.last_seq)
        elif kind in ("compacted", "cleared"):
            # A summary stands at its range's last seq; a clear says the last seq it emptied.
            last = event.compacted.summarizes.last_seq if kind == "compacted" else event.cleared.last_seq
            self.seq = last if self.seq is None else max(self.seq, last)
        elif kind == "heartbeat":
            last = event.heartbeat.last_seq
            self.seq = last if self.seq is None else max(self.seq, last)
            return include_heartbeats
        return True
