"""Stored forms: message JSON in the chat LIST, fields of the meta HASH."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chatsession_server.domain import NewMessage, Role, Session, StoredMessage, ToolCall

LABEL_FIELD_PREFIX = "label:"
SEQ_HEAD = '{"seq":'
"""How every stored message begins: the append script writes SEQ_HEAD, the seq, a comma, the body."""
TOKENS_HEAD = ',"tokens":'
"""What precedes a stored message's token count: the first occurrence is the top-level field
(`encode_body` puts it right after role and content, and a quote inside a string is escaped)."""
SUMMARIZES_HEAD = ',"summarizes":['
"""The compaction script closes a summary's body with this, its first and last seq, and `]}`."""


class MetaField(enum.StrEnum):
    """Fields of the meta HASH (besides `label:<key>`), as the scripts and the decoder name them."""

    USER_ID = "user_id"
    MODEL = "model"
    TITLE = "title"
    CREATED_AT = "created_at"
    LAST_ACTIVE = "last_active"
    MESSAGE_COUNT = "message_count"
    TOKEN_COUNT = "token_count"
    TTL_SECONDS = "ttl_seconds"
    MAX_MESSAGES = "max_messages"
    PINNED = "pinned"
    """how many leading system messages form the pinned prompt"""
    STORED_BYTES = "stored_bytes"
    """bytes of JSON the chat LIST and the summary key hold now (appends and compactions add,
    window trims, compactions and clears subtract)"""
    CREATE_REQUEST_ID = "create_request_id"


def body_prefix(role: Role) -> str:
    """What `encode_body` output starts with for a message of `role`: the scripts tell system and
    tool messages apart by this prefix alone, without decoding JSON."""
    return f'"role":{json.dumps(role.value)},'


def format_time(seconds: float) -> str:
    """Unix seconds as the decimal string the meta HASH holds (microsecond precision)."""
    return f"{seconds:.6f}"


def encode_body(message: NewMessage, created_at: float) -> str:
    """The message's JSON without its opening `{"seq":N,`, which the append script prepends.

    `role` comes first so the scripts can tell system and tool messages from the prefix alone.
    """
    obj: dict[str, Any] = {"role": message.role.value, "content": message.content, "tokens": message.tokens}
    obj["created_at"] = round(created_at, 6)
    if message.name:
        obj["name"] = message.name
    if message.metadata:
        obj["metadata"] = dict(message.metadata)
    if message.tool_calls:
        obj["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        obj["tool_call_id"] = message.tool_call_id
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text[1:]


def stored_json(seq: int, body: str) -> str:
    """Exactly what the append script stores for `body` at `seq`."""
    return f"{SEQ_HEAD}{seq},{body}"


def fingerprint(messages: Sequence[NewMessage]) -> str:
    """Identifies a request's content (not its timing) so a reused request_id can be told apart."""
    canonical = [
        [
            m.role.value,
            m.content,
            m.tokens,
            m.name,
            sorted(m.metadata.items()),
            [[c.id, c.name, c.arguments] for c in m.tool_calls],
            m.tool_call_id,
        ]
        for m in messages
    ]
    raw = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def decode_message(raw: bytes | str) -> StoredMessage:
    return message_from_obj(json.loads(raw))


def message_from_obj(obj: dict[str, Any]) -> StoredMessage:
    calls = tuple(
        ToolCall(
            id=str(c.get("id", "")),
            name=str(c.get("function", {}).get("name", "")),
            arguments=str(c.get("function", {}).get("arguments", "")),
        )
        for c in obj.get("tool_calls") or ()
    )
    return StoredMessage(
        seq=int(obj["seq"]),
        role=Role(obj["role"]),
        content=str(obj.get("content") or ""),
        tokens=int(obj.get("tokens") or 0),
        created_at=float(obj.get("created_at") or 0.0),
        name=str(obj.get("name") or ""),
        metadata={str(k): str(v) for k, v in (obj.get("metadata") or {}).items()},
        tool_calls=calls,
        tool_call_id=str(obj.get("tool_call_id") or ""),
        summarizes=_seq_range(obj.get("summarizes")),
    )


def _seq_range(value: Any) -> tuple[int, int] | None:
    if not value:
        return None
    first, last = value
    return int(first), int(last)


def new_session_fields(
    *,
    user_id: str,
    model: str,
    title: str,
    labels: Mapping[str, str],
    created_at: str,
    ttl_seconds: int,
    max_messages: int,
    request_id: str,
) -> list[str]:
    """Field/value pairs of a new meta HASH, flat, ready for HSET (`created_at` as format_time gives it)."""
    now = created_at
    fields: dict[str, str] = {
        MetaField.USER_ID: user_id,
        MetaField.MODEL: model,
        MetaField.TITLE: title,
        MetaField.CREATED_AT: now,
        MetaField.LAST_ACTIVE: now,
        MetaField.MESSAGE_COUNT: "0",
        MetaField.TOKEN_COUNT: "0",
        MetaField.TTL_SECONDS: str(ttl_seconds),
        MetaField.MAX_MESSAGES: str(max_messages),
        MetaField.PINNED: "0",
        MetaField.STORED_BYTES: "0",
    }
    if request_id:
        fields[MetaField.CREATE_REQUEST_ID] = request_id
    for key, value in labels.items():
        fields[LABEL_FIELD_PREFIX + key] = value
    return flatten(fields.items())


def flatten(pairs: Iterable[tuple[str, str]]) -> list[str]:
    return [item for pair in pairs for item in pair]


def _text(meta: Mapping[bytes, bytes], field: MetaField, default: str = "") -> str:
    value = meta.get(field.encode())
    return value.decode() if value is not None else default


def decode_session(session_id: str, meta: Mapping[bytes, bytes], stored: int, ttl: int) -> Session:
    """A Session from HGETALL meta, LLEN chat and TTL meta."""
    labels = {
        k.decode()[len(LABEL_FIELD_PREFIX) :]: v.decode()
        for k, v in meta.items()
        if k.startswith(LABEL_FIELD_PREFIX.encode())
    }
    created_at = float(_text(meta, MetaField.CREATED_AT, "0"))
    return Session(
        session_id=session_id,
        user_id=_text(meta, MetaField.USER_ID),
        model=_text(meta, MetaField.MODEL),
        title=_text(meta, MetaField.TITLE),
        labels=labels,
        created_at=created_at,
        last_active=float(_text(meta, MetaField.LAST_ACTIVE, str(created_at))),
        message_count=int(_text(meta, MetaField.MESSAGE_COUNT, "0")),
        token_count=int(_text(meta, MetaField.TOKEN_COUNT, "0")),
        messages_stored=stored,
        expires_in_seconds=max(ttl, 0),
        ttl_seconds=int(_text(meta, MetaField.TTL_SECONDS, "0")),
        max_messages=int(_text(meta, MetaField.MAX_MESSAGES, "-1")),
    )


def pairs_to_map(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """HGETALL as a Lua script returns it (a flat array) into a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
