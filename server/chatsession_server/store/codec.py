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
    """bytes of JSON the chat LIST holds now (appends add, window trims subtract)"""
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


def decode_messages(raws: Sequence[bytes]) -> tuple[StoredMessage, ...]:
    """Stored messages as the scripts return them, parsed as one JSON array (one parse, not one
    per message: a page of 20 decodes in a third of the time)."""
    if not raws:
        return ()
    return tuple(map(message_from_obj, json.loads(b"[" + b",".join(raws) + b"]")))


def message_from_obj(obj: dict[str, Any]) -> StoredMessage:
    calls = obj.get("tool_calls")
    metadata = obj.get("metadata")
    return StoredMessage(
        int(obj["seq"]),
        Role(obj["role"]),
        str(obj.get("content") or ""),
        int(obj.get("tokens") or 0),
        float(obj.get("created_at") or 0.0),
        str(obj.get("name") or ""),
        {str(k): str(v) for k, v in metadata.items()} if metadata else {},
        tuple(
            ToolCall(
                id=str(c.get("id", "")),
                name=str(c.get("function", {}).get("name", "")),
                arguments=str(c.get("function", {}).get("arguments", "")),
            )
            for c in calls
        )
        if calls
        else (),
        str(obj.get("tool_call_id") or ""),
    )


def stored_message(message: NewMessage, seq: int, created_at: float) -> StoredMessage:
    """What `decode_message` gives for the message the append script stored from
    `encode_body(message, created_at)` at `seq`, without the JSON round trip."""
    return StoredMessage(
        seq,
        message.role,
        message.content,
        message.tokens,
        round(created_at, 6),
        message.name,
        message.metadata,
        message.tool_calls,
        message.tool_call_id,
    )


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
