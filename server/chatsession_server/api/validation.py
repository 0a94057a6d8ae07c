"""Request validation: each function turns a request into domain values or raises InvalidArgument
naming every bad field. Nothing reaches the store before it passes here."""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Mapping

from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_server.api import limits as L
from chatsession_server.api.limits import Limits
from chatsession_server.api.payload import PayloadError, PayloadTooLarge, payload_json
from chatsession_server.domain import (
    NEVER_EXPIRES,
    RESERVED_LABELS,
    Compaction,
    ContextQuery,
    Listed,
    MessageQuery,
    NewFork,
    NewMessage,
    NewSession,
    Role,
    SessionPatch,
    StateDelta,
    StateScope,
    ToolCall,
    Truncation,
    scope_owner,
    scope_rule,
)
from chatsession_server.errors import FieldViolation, InvalidArgument

# Ids end up inside key names and `{}` hash tags: keep them to a safe alphabet.
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ID_RULE = "must be 1-128 characters from [A-Za-z0-9_.:-]"
# Session ids may also hold '/': a session id with one belongs to the user named before its first
# '/' ('<user_id>/<name>'), which no user id holds, so the prefix names one user only.
_SESSION_ID = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_SESSION_ID_RULE = "must be 1-128 characters from [A-Za-z0-9_.:/-]"
# Label keys as Kubernetes and cloud labels spell them (`team`, `app.example.com/tier`): no
# spaces, braces, wildcards or control characters for a caller to slip into what reads them.
_LABEL_KEY = re.compile(rf"[A-Za-z0-9._/-]{{1,{L.MAX_LABEL_KEY_LENGTH}}}")
_LABEL_KEY_RULE = f"label keys must be 1-{L.MAX_LABEL_KEY_LENGTH} characters from [A-Za-z0-9._/-]"
_RESERVED_RULE = (
    f"is a label the service sets ({', '.join(sorted(RESERVED_LABELS))}): it cannot be set or removed"
)
_ROLES = {
    session_pb2.ROLE_SYSTEM: Role.SYSTEM,
    session_pb2.ROLE_USER: Role.USER,
    session_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    session_pb2.ROLE_TOOL: Role.TOOL,
}
# Derives session ids from (user_id, request_id) so a retried create lands on the same id.
_SESSION_ID_NAMESPACE = uuid.UUID("8c0f3a52-58a4-4c39-9d0b-2f6c7c3f1a10")
UPDATABLE_FIELDS = ("title", "model", "labels", "ttl_seconds", "max_messages")
_APP_IMMUTABLE = "is immutable: a session's app is set by CreateSession (or ForkSession's source) only"
# Each field once, or a label path per label a session may hold.
MAX_MASK_PATHS = len(UPDATABLE_FIELDS) + L.MAX_LABELS


def is_valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def is_valid_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


class Violations:
    """Collects the problems of a request, so the caller can fix them all at once; beyond
    MAX_KEPT it only counts them, and `full` tells the checks to stop: a request of a million
    bad parts costs no more than one of a hundred."""

    MAX_KEPT = 100

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self.omitted = 0

    @property
    def full(self) -> bool:
        return self.omitted > 0

    def add(self, field: str, description: str) -> None:
        if len(self.items) < self.MAX_KEPT:
            self.items.append(FieldViolation(field, description))
        else:
            self.omitted += 1

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items, self.omitted)

    def id(
        self,
        field: str,
        value: str,
        *,
        required: bool = True,
        pattern: re.Pattern[str] = _ID,
        rule: str = _ID_RULE,
    ) -> None:
        if not value:
            if required:
                self.add(field, "is required")
        elif not pattern.fullmatch(value):
            self.add(field, rule)

    def session_id(self, field: str, value: str, *, required: bool = True) -> None:
        self.id(field, value, required=required, pattern=_SESSION_ID, rule=_SESSION_ID_RULE)

    def text(self, field: str, value: str, max_length: int) -> None:
        if len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters")

    def string_map(
        self, field: str, values: Mapping[str, str], entries: int, key_len: int, value_len: int
    ) -> None:
        if len(values) > entries:
            self.add(field, f"must have at most {entries} entries")
            return  # the entries of a map this size are not worth checking one by one
        for key, value in values.items():
            if not key or len(key) > key_len:
                self.add(f"{field}[{key!r}]", f"keys must be 1-{key_len} characters")
            if len(value) > value_len:
                self.add(f"{field}[{key!r}]", f"values must be at most {value_len} characters")

    def labels(self, field: str, values: Mapping[str, str]) -> None:
        """A session's labels as a caller sets them (CreateSession, an UpdateSession of `labels`)."""
        if len(values) > L.MAX_LABELS:
            self.add(field, f"must have at most {L.MAX_LABELS} entries")
            return  # the entries of a map this size are not worth checking one by one
        for key, value in values.items():
            self.label_key(f"{field}[{key!r}]", key)
            if len(value) > L.MAX_LABEL_VALUE_LENGTH:
                self.add(f"{field}[{key!r}]", f"values must be at most {L.MAX_LABEL_VALUE_LENGTH} characters")

    def label_key(self, field: str, key: str) -> None:
        if key in RESERVED_LABELS:
            self.add(field, _RESERVED_RULE)
        elif not _LABEL_KEY.fullmatch(key):
            self.add(field, _LABEL_KEY_RULE)

    def page_size(self, value: int) -> None:
        if value < 0:
            self.add("page_size", "must not be negative")


def _ttl(v: Violations, field: str, value: int, limits: Limits) -> int:
    if value < NEVER_EXPIRES or value > limits.max_ttl_seconds:
        v.add(field, f"must be -1 (never expires), 0 (server default) or 1-{limits.max_ttl_seconds}")
    return value or limits.default_ttl_seconds


def _window(v: Violations, field: str, value: int, limits: Limits) -> int:
    if value < -1 or value > L.MAX_WINDOW:
        v.add(field, f"must be -1 (keep all), 0 (server default) or 1-{L.MAX_WINDOW}")
    return value or limits.default_max_messages


def session_id_for(user_id: str, session_id: str, request_id: str) -> str:
    if session_id:
        return session_id
    if request_id:
        return uuid.uuid5(_SESSION_ID_NAMESPACE, f"{user_id}\x00{request_id}").hex
    return uuid.uuid4().hex


def create_session(request: session_service_pb2.CreateSessionRequest, limits: Limits) -> NewSession:
    v = Violations()
    v.session_id("session_id", request.session_id, required=False)
    v.id("user_id", request.user_id)
    owner = scope_owner(request.session_id)
    if owner is not None and owner != request.user_id and is_valid_id(request.user_id):
        v.add("session_id", scope_rule(request.user_id))
    v.id("request_id", request.request_id, required=False)
    v.text("model", request.model, L.MAX_MODEL_LENGTH)
    v.text("title", request.title, L.MAX_TITLE_LENGTH)
    v.labels("labels", request.labels)
    ttl = _ttl(v, "ttl_seconds", request.ttl_seconds, limits)
    window = _window(v, "max_messages", request.max_messages, limits)
    v.id("app", request.app, required=False)
    v.raise_if_any()
    return NewSession(
        session_id=session_id_for(request.user_id, request.session_id, request.request_id),
        chosen_id=bool(request.session_id),
        user_id=request.user_id,
        model=request.model,
        title=request.title,
        labels=dict(request.labels),
        ttl_seconds=ttl,
        max_messages=window,
        request_id=request.request_id,
        app=request.app,
    )


def session_id(session_id: str) -> str:
    v = Violations()
    v.session_id("session_id", session_id)
    v.raise_if_any()
    return session_id


def update_session(
    request: session_service_pb2.UpdateSessionRequest, limits: Limits
) -> tuple[str, SessionPatch]:
    v = Violations()
    if not request.HasField("session"):
        v.add("session", "is required")
        v.raise_if_any()
    s = request.session
    v.session_id("session.session_id", s.session_id)
    # Bounded before anything else (before even a copy): every path becomes work, and a Lua
    # argument, in the store.
    if len(request.update_mask.paths) > MAX_MASK_PATHS:
        v.add("update_mask", f"must have at most {MAX_MASK_PATHS} paths")
        v.raise_if_any()
    if request.HasField("update_mask"):
        paths = list(request.update_mask.paths)
        if paths == ["*"]:
            paths = list(UPDATABLE_FIELDS)
    else:  # AIP-134: without a mask, apply the fields that are set
        paths = [f for f in UPDATABLE_FIELDS if (s.labels if f == "labels" else getattr(s, f))]
        if s.app:
            v.add("session.app", _APP_IMMUTABLE)
    if len(set(paths)) < len(paths):
        v.add("update_mask", "must not name a path twice")
    if sum(p.startswith("labels.") for p in paths) > L.MAX_LABELS:
        v.add("update_mask", f"must have at most {L.MAX_LABELS} 'labels.<key>' paths")
    title: str | None = None
    model: str | None = None
    ttl: int | None = None
    window: int | None = None
    replace_labels: dict[str, str] | None = None
    set_labels: dict[str, str] = {}
    remove_labels: set[str] = set()
    for path in paths:
        if path == "title":
            v.text("session.title", s.title, L.MAX_TITLE_LENGTH)
            title = s.title
        elif path == "model":
            v.text("session.model", s.model, L.MAX_MODEL_LENGTH)
            model = s.model
        elif path == "ttl_seconds":
            ttl = _ttl(v, "session.ttl_seconds", s.ttl_seconds, limits)
        elif path == "max_messages":
            window = _window(v, "session.max_messages", s.max_messages, limits)
        elif path == "labels":
            v.labels("session.labels", s.labels)
            replace_labels = dict(s.labels)
        elif path.startswith("labels.") and len(path) > len("labels."):
            key = path[len("labels.") :]
            if len(key) > L.MAX_LABEL_KEY_LENGTH:
                v.add("update_mask", f"label keys must be 1-{L.MAX_LABEL_KEY_LENGTH} characters")
            elif key in RESERVED_LABELS:
                v.add(f"session.labels[{key!r}]", _RESERVED_RULE)
            elif key in s.labels:
                v.label_key(f"session.labels[{key!r}]", key)
                v.text(f"session.labels[{key!r}]", s.labels[key], L.MAX_LABEL_VALUE_LENGTH)
                set_labels[key] = s.labels[key]
            else:
                # Any key within the length: a label stored before the key rule can be removed.
                remove_labels.add(key)
        elif path == "app":
            v.add("session.app", _APP_IMMUTABLE)
        else:
            v.add(
                "update_mask",
                f"unknown or immutable field {path!r}; updatable: {', '.join(UPDATABLE_FIELDS)}",
            )
    if replace_labels is not None and (set_labels or remove_labels):
        v.add("update_mask", "'labels' and 'labels.<key>' cannot be combined")
    v.raise_if_any()
    patch = SessionPatch(
        title=title,
        model=model,
        ttl_seconds=ttl,
        max_messages=window,
        replace_labels=replace_labels,
        set_labels=set_labels,
        remove_labels=frozenset(remove_labels),
    )
    return s.session_id, patch


def list_sessions(request: session_service_pb2.ListSessionsRequest) -> tuple[Listed, int]:
    """What to list (a user's sessions, of an app or of all; or an app's) and the page size."""
    v = Violations()
    v.id("app", request.app, required=False)
    if not request.user_id and not request.app:
        v.add("user_id", "is required, unless app is set (then every user's sessions of the app are listed)")
    v.id("user_id", request.user_id, required=False)
    v.page_size(request.page_size)
    v.raise_if_any()
    page_size = min(request.page_size or L.DEFAULT_SESSIONS_PAGE, L.MAX_PAGE_SIZE)
    return Listed(request.user_id, request.app), page_size


def _message(
    v: Violations, field: str, m: session_pb2.Message, limits: Limits, payload_budget: list[int] | None = None
) -> NewMessage | None:
    """`payload_budget`: [values the request's payloads may still hold], spent here."""
    # Each field is read once: every read of a protobuf field builds a new Python object.
    content, tokens, name, metadata = m.content, m.tokens, m.name, m.metadata
    tool_calls, tool_call_id = m.tool_calls, m.tool_call_id
    role = _ROLES.get(m.role)
    if role is None:
        v.add(f"{field}.role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
    size = len(content.encode())
    if size > limits.max_content_bytes:
        v.add(f"{field}.content", f"is {size} bytes; the limit is {limits.max_content_bytes}")
    if not content and not (role is Role.ASSISTANT and tool_calls):
        v.add(f"{field}.content", "must not be empty (except on an assistant message with tool_calls)")
    if tokens < 0:
        v.add(f"{field}.tokens", "must not be negative")
    elif tokens > L.MAX_TOKENS_PER_MESSAGE:
        v.add(f"{field}.tokens", f"must be at most {L.MAX_TOKENS_PER_MESSAGE}")
    if name:
        v.text(f"{field}.name", name, L.MAX_NAME_LENGTH)
    if metadata:
        v.string_map(
            f"{field}.metadata",
            metadata,
            L.MAX_METADATA_ENTRIES,
            L.MAX_METADATA_KEY_LENGTH,
            L.MAX_METADATA_VALUE_LENGTH,
        )
    if tool_calls:
        if role is not Role.ASSISTANT:
            v.add(f"{field}.tool_calls", "only assistant messages carry tool_calls")
        too_many_calls = len(tool_calls) > L.MAX_TOOL_CALLS
        if too_many_calls:
            v.add(f"{field}.tool_calls", f"must have at most {L.MAX_TOOL_CALLS} entries")
        for j, call in enumerate(() if too_many_calls else tool_calls):  # too many: not one by one
            v.text(f"{field}.tool_calls[{j}].id", call.id, L.MAX_NAME_LENGTH)
            if not call.name or len(call.name) > L.MAX_NAME_LENGTH:
                v.add(f"{field}.tool_calls[{j}].name", f"must be 1-{L.MAX_NAME_LENGTH} characters")
            if len(call.arguments.encode()) > limits.max_content_bytes:
                limit = limits.max_content_bytes
                v.add(f"{field}.tool_calls[{j}].arguments", f"must be at most {limit} bytes")
    if tool_call_id:
        if role is not Role.TOOL:
            v.add(f"{field}.tool_call_id", "only tool messages carry tool_call_id")
        v.text(f"{field}.tool_call_id", tool_call_id, L.MAX_NAME_LENGTH)
    size = m.ByteSize()
    if size > limits.max_message_bytes:
        v.add(field, f"is {size} bytes encoded; the limit is {limits.max_message_bytes}")
    payload: str | None = None
    payload_values = 0
    if m.HasField("payload"):
        payload, payload_values = _payload(v, f"{field}.payload", m.payload, limits, payload_budget)
    created_at: float | None = None
    if m.HasField("created_at"):
        created_at = _created_at(v, f"{field}.created_at", m.created_at, limits)
    if role is None:
        return None
    return NewMessage(
        role=role,
        content=content,
        tokens=tokens,
        name=name,
        metadata=dict(metadata) if metadata else {},
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in tool_calls) if tool_calls else (),
        tool_call_id=tool_call_id,
        payload=payload,
        reply_bytes=max(size + L.REPLY_OVERHEAD_BYTES, payload_values * L.REPLY_BYTES_PER_VALUE)
        if payload is not None
        else 0,
        created_at=created_at,
    )


def _created_at(v: Violations, field: str, value: Timestamp, limits: Limits) -> float | None:
    """A message's own time in unix seconds: from the epoch on, at most max_clock_skew_seconds
    ahead of this server's clock."""
    seconds, nanos = value.seconds, value.nanos
    if not 0 <= nanos <= 999_999_999:
        v.add(field, "nanos must be 0-999999999")
        return None
    if seconds < 0:
        v.add(field, "must not be before 1970-01-01T00:00:00Z")
        return None
    at = seconds + nanos / 1e9
    latest = time.time() + limits.max_clock_skew_seconds
    if at > latest:
        v.add(field, f"is more than {limits.max_clock_skew_seconds} seconds ahead of the server's clock")
        return None
    return at


def _payload(
    v: Violations, field: str, value: struct_pb2.Value, limits: Limits, budget: list[int] | None
) -> tuple[str | None, int]:
    """The payload as the JSON text the store keeps and its count of values, or (None, 0) after
    saying what is wrong."""
    size = value.ByteSize()
    if size > limits.max_message_bytes:  # said before the walk, which it would make long
        v.add(field, f"is {size} bytes encoded; a message's limit is {limits.max_message_bytes}")
        return None, 0
    left = L.MAX_PAYLOAD_VALUES if budget is None else min(L.MAX_PAYLOAD_VALUES, budget[0])
    try:
        text, values = payload_json(value, max_depth=L.MAX_PAYLOAD_DEPTH, max_values=left)
    except PayloadTooLarge:
        if left < L.MAX_PAYLOAD_VALUES:  # the request's budget ran out, not the message's
            v.add(field, f"takes the request's payloads past {L.MAX_PAYLOAD_VALUES_PER_APPEND} values")
            if budget is not None:
                budget[0] = 0
        else:
            v.add(
                field,
                f"must hold at most {L.MAX_PAYLOAD_VALUES} values"
                " (each null, bool, number, string, list and object counts one)",
            )
        return None, 0
    except PayloadError as exc:
        v.add(field, str(exc))
        return None, 0
    if budget is not None:
        budget[0] -= values
    return text, values


def append_messages(
    request: session_service_pb2.AppendMessagesRequest, limits: Limits
) -> tuple[str, list[NewMessage], str, int | None]:
    v = Violations()
    v.session_id("session_id", request.session_id)
    v.id("request_id", request.request_id, required=False)
    expected = request.expected_last_seq if request.HasField("expected_last_seq") else None
    if expected is not None and expected < 0:
        v.add("expected_last_seq", "must not be negative")
    count = len(request.messages)
    if not count:
        v.add("messages", "must hold at least one message")
    elif count > limits.max_messages_per_append:
        # Said at once: checking each of a million messages would hold the event loop for seconds.
        v.add("messages", f"must hold at most {limits.max_messages_per_append} messages, not {count}")
        v.raise_if_any()
    size = sum(m.ByteSize() for m in request.messages)
    if size > limits.max_append_bytes:
        v.add("messages", f"are {size} bytes encoded; the limit per append is {limits.max_append_bytes}")
    messages: list[NewMessage] = []
    payload_budget = [L.MAX_PAYLOAD_VALUES_PER_APPEND]
    for i, m in enumerate(request.messages):
        if v.full:
            break
        checked = _message(v, f"messages[{i}]", m, limits, payload_budget)
        if checked is not None:
            messages.append(checked)
    v.raise_if_any()
    return request.session_id, messages, request.request_id, expected


def watch_messages(request: session_service_pb2.WatchMessagesRequest) -> tuple[str, int | None]:
    v = Violations()
    v.session_id("session_id", request.session_id)
    after = request.after_seq if request.HasField("after_seq") else None
    if after is not None and after < 0:
        v.add("after_seq", "must not be negative")
    v.raise_if_any()
    return request.session_id, after


def list_messages(request: session_service_pb2.ListMessagesRequest) -> tuple[str, MessageQuery]:
    v = Violations()
    v.session_id("session_id", request.session_id)
    v.page_size(request.page_size)
    after = request.after_seq if request.HasField("after_seq") else None
    before = request.before_seq if request.HasField("before_seq") else None
    if after is not None and after < 0:
        v.add("after_seq", "must not be negative")
    if before is not None and before < 1:
        v.add("before_seq", "must be at least 1")
    v.raise_if_any()
    limit = min(request.page_size or L.DEFAULT_MESSAGES_PAGE, L.MAX_PAGE_SIZE)
    return request.session_id, MessageQuery(limit=limit, after_seq=after, before_seq=before)


def fork_session(request: session_service_pb2.ForkSessionRequest) -> NewFork:
    v = Violations()
    v.session_id("session_id", request.session_id)
    v.session_id("new_session_id", request.new_session_id, required=False)
    v.id("request_id", request.request_id, required=False)
    at_seq = request.at_seq if request.HasField("at_seq") else None
    if at_seq is not None and at_seq < 0:
        v.add("at_seq", "must not be negative")
    if request.new_session_id and request.new_session_id == request.session_id:
        v.add("new_session_id", "must differ from session_id")
    v.raise_if_any()
    # A generated id derives from the source and the request_id ('/' keeps it apart from a create's).
    new_id = session_id_for(f"fork/{request.session_id}", request.new_session_id, request.request_id)
    return NewFork(
        request.session_id, at_seq, new_id, request.request_id, chosen_id=bool(request.new_session_id)
    )


def get_user_usage(request: session_service_pb2.GetUserUsageRequest) -> str:
    v = Violations()
    v.id("user_id", request.user_id)
    v.raise_if_any()
    return request.user_id


# --- Read masks, context, compaction and clearing ---------------------------------------------

# GetSession read_mask paths (AIP-157), besides `labels.<key>`.
READABLE_FIELDS = (
    "session_id",
    "user_id",
    "model",
    "title",
    "labels",
    "created_at",
    "last_active",
    "message_count",
    "token_count",
    "messages_stored",
    "expires_in_seconds",
    "ttl_seconds",
    "max_messages",
    "app",
)
MAX_READ_MASK_PATHS = len(READABLE_FIELDS) + L.MAX_LABELS


def get_session(request: session_service_pb2.GetSessionRequest) -> tuple[str, frozenset[str] | None]:
    """The session id and the fields to read (None: every field)."""
    v = Violations()
    v.session_id("session_id", request.session_id)
    if not request.HasField("read_mask"):
        v.raise_if_any()
        return request.session_id, None
    paths = request.read_mask.paths
    if len(paths) > MAX_READ_MASK_PATHS:
        v.add("read_mask", f"must have at most {MAX_READ_MASK_PATHS} paths")
        v.raise_if_any()
    if list(paths) == ["*"]:
        v.raise_if_any()
        return request.session_id, None
    if not paths:
        v.add("read_mask", "must name at least one path (or '*')")
    for path in paths:
        if path.startswith("labels."):
            key = path[len("labels.") :]
            if not key or len(key) > L.MAX_LABEL_KEY_LENGTH:
                v.add("read_mask", f"label keys must be 1-{L.MAX_LABEL_KEY_LENGTH} characters")
        elif path not in READABLE_FIELDS:
            readable = ", ".join(READABLE_FIELDS)
            v.add("read_mask", f"unknown field {path!r}; readable: {readable}, labels.<key>")
    v.raise_if_any()
    return request.session_id, frozenset(paths)


def get_context(request: session_service_pb2.GetContextRequest) -> tuple[str, ContextQuery]:
    v = Violations()
    v.session_id("session_id", request.session_id)
    if request.max_tokens < 0:
        v.add("max_tokens", "must not be negative (0 means no limit)")
    if request.max_messages < 0:
        v.add("max_messages", "must not be negative (0 means no limit)")
    v.raise_if_any()
    return request.session_id, ContextQuery(request.max_tokens, request.max_messages)


def compact_messages(
    request: session_service_pb2.CompactMessagesRequest, limits: Limits
) -> tuple[str, Compaction]:
    v = Violations()
    v.session_id("session_id", request.session_id)
    v.id("request_id", request.request_id, required=False)
    if request.up_to_seq < 1:
        v.add("up_to_seq", "must be at least 1")
    summary: NewMessage | None = None
    if not request.HasField("summary"):
        v.add("summary", "is required")
    else:
        m = request.summary
        summary = _message(v, "summary", m, limits)
        if m.role in (session_pb2.ROLE_USER, session_pb2.ROLE_TOOL):  # unknown roles: said above
            v.add("summary.role", "must be ROLE_SYSTEM or ROLE_ASSISTANT")
        if m.tool_calls:  # (which alone let an assistant message be empty)
            v.add("summary.tool_calls", "a summary carries no tool calls")
            if not m.content:
                v.add("summary.content", "must not be empty")
    v.raise_if_any()
    assert summary is not None
    return request.session_id, Compaction(request.up_to_seq, summary, request.request_id)


def clear_messages(request: session_service_pb2.ClearMessagesRequest) -> tuple[str, bool, str]:
    """The session id, keep_system_prompt and request_id."""
    v = Violations()
    v.session_id("session_id", request.session_id)
    v.id("request_id", request.request_id, required=False)
    v.raise_if_any()
    return request.session_id, request.keep_system_prompt, request.request_id


# --- State ------------------------------------------------------------------------------------

# C0 and C1 control characters and DEL: a key is shown, logged and typed by people.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_STATE_KEY_RULE = f"state keys must be 1-{L.MAX_STATE_KEY_BYTES} bytes of UTF-8 without control characters"


def _state_key(v: Violations, field: str, key: str) -> None:
    if not 1 <= len(key.encode()) <= L.MAX_STATE_KEY_BYTES or _CONTROL_CHARACTER.search(key):
        v.add(field, _STATE_KEY_RULE)


def _state_scope(v: Violations, field: str, scope: session_service_pb2.StateScope, given: bool) -> StateScope:
    which = scope.WhichOneof("scope") if given else None
    if which == "session_id":
        v.session_id(f"{field}.session_id", scope.session_id)
        return StateScope(session_id=scope.session_id)
    if which == "user_id":
        v.id(f"{field}.user_id", scope.user_id)
        return StateScope(user_id=scope.user_id)
    if which == "app":
        v.id(f"{field}.app", scope.app)
        return StateScope(app=scope.app)
    v.add(field, "is required: set session_id, user_id or app")
    return StateScope()


def state_delta(v: Violations, field: str, delta: session_service_pb2.StateDelta) -> StateDelta:
    """A delta's keys and values, each value as the JSON text to store."""
    to_set, to_remove = delta.set, delta.remove
    count = len(to_set) + len(to_remove)
    if count > L.MAX_STATE_DELTA_KEYS:
        # Said at once: a million keys are not checked one by one.
        v.add(field, f"must set and remove at most {L.MAX_STATE_DELTA_KEYS} keys together, not {count}")
        return StateDelta()
    texts: dict[str, str] = {}
    for key, value in to_set.items():
        if v.full:
            break
        name = f"{field}.set[{key!r}]"
        _state_key(v, name, key)
        try:
            # Not counted: a state value is bounded by its bytes (below) instead.
            text, _ = payload_json(value, max_depth=L.MAX_STATE_DEPTH, max_values=sys.maxsize)
        except PayloadError as exc:
            v.add(name, str(exc))
            continue
        size = len(text.encode())
        if size > L.MAX_STATE_VALUE_BYTES:
            v.add(name, f"is {size} bytes as JSON; the limit is {L.MAX_STATE_VALUE_BYTES}")
        texts[key] = text
    for i, key in enumerate(to_remove):
        if v.full:
            break
        _state_key(v, f"{field}.remove[{i}]", key)
        if key in to_set:
            v.add(f"{field}.remove[{i}]", f"{key!r} is in {field}.set too: a key is set or removed, not both")
    return StateDelta(texts, frozenset(to_remove))


def get_state(request: session_service_pb2.GetStateRequest) -> tuple[StateScope, list[str]]:
    """The scope and the keys to read (none: the whole state)."""
    v = Violations()
    scope = _state_scope(v, "scope", request.scope, request.HasField("scope"))
    keys = list(request.keys)
    if len(keys) > L.MAX_STATE_DELTA_KEYS:
        v.add("keys", f"must name at most {L.MAX_STATE_DELTA_KEYS} keys, not {len(keys)}")
        v.raise_if_any()
    for i, key in enumerate(keys):
        _state_key(v, f"keys[{i}]", key)
    v.raise_if_any()
    return scope, list(dict.fromkeys(keys))


def update_state(request: session_service_pb2.UpdateStateRequest) -> tuple[StateScope, StateDelta]:
    v = Violations()
    scope = _state_scope(v, "scope", request.scope, request.HasField("scope"))
    delta = state_delta(v, "delta", request.delta)
    v.raise_if_any()
    return scope, delta


def append_state_delta(request: session_service_pb2.AppendMessagesRequest) -> StateDelta | None:
    """AppendMessagesRequest.state_delta (None when absent), checked apart from the messages."""
    if not request.HasField("state_delta"):
        return None
    v = Violations()
    delta = state_delta(v, "state_delta", request.state_delta)
    v.raise_if_any()
    return delta


def truncate_messages(request: session_service_pb2.TruncateMessagesRequest) -> tuple[str, Truncation]:
    v = Violations()
    v.session_id("session_id", request.session_id)
    v.id("request_id", request.request_id, required=False)
    after_seq = request.after_seq if request.HasField("after_seq") else None
    if after_seq is not None and request.pop_count:
        v.add("pop_count", "set either after_seq or pop_count, not both")
    elif after_seq is None and not request.pop_count:
        # An empty request must not remove everything (as after_seq = 0 would).
        v.add("after_seq", "is required: the seq to keep up to (0 removes everything), or set pop_count")
    if after_seq is not None and after_seq < 0:
        v.add("after_seq", "must not be negative (0 removes everything)")
    if request.pop_count < 0:
        v.add("pop_count", "must not be negative")
    expected = request.expected_last_seq if request.HasField("expected_last_seq") else None
    if expected is not None and expected < 0:
        v.add("expected_last_seq", "must not be negative")
    v.raise_if_any()
    return request.session_id, Truncation(
        after_seq=after_seq,
        pop_count=request.pop_count,
        expected_last_seq=expected,
        request_id=request.request_id,
        return_removed=request.return_removed,
    )
