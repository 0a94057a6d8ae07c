"""Stored forms: message JSON in the chat LIST, fields of the meta HASH."""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from chatsession_server.domain import (
    FORKED_FROM_LABEL,
    NEVER_EXPIRES,
    ROLE_OF,
    NewMessage,
    Role,
    Session,
    StoredMessage,
    ToolCall,
    UsageCounts,
    UserUsage,
)

LABEL_FIELD_PREFIX = "label:"
SEQ_HEAD = '{"seq":'
"""How every stored message begins: the append script writes SEQ_HEAD, the seq, a comma, the body."""
TOKENS_HEAD = ',"tokens":'
"""What precedes a stored message's token count: the first occurrence is the top-level field
(`encode_body` puts it after role, content and a payload's two fields, none of which can hold
it: a quote inside a string is escaped)."""
REPLY_BYTES_PATTERN = "^" + SEQ_HEAD + '%d+,"role":"%a+","reply_bytes":(%d+),'
"""Lua pattern of a stored message with a payload, capturing its `reply_bytes` (written right
after its role, before the payload): what the message counts for in a reply, which the scripts'
page and context budgets count when it is more than the stored JSON: its encoded size (a payload
of small numbers is shorter as JSON than encoded), or more for a payload of many values, whose
conversion costs CPU (see api/limits.py)."""
SUMMARIZES_HEAD = ',"summarizes":['
"""The compaction script closes a summary's body with this, its first and last seq, and `]}`."""
MAX_PINNED = 16
"""Most leading system messages a session pins (keeps through every window trim)."""


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
    FORK_ORIGIN = "fork_origin"
    """on a fork: "<source session_id> <at_seq>", so a retried ForkSession is told from another"""
    USAGE_BASE = "usage_base"
    """on a fork: "<message_count> <token_count>" it was created with (copied, not appended: the
    usage counts them for the source only)"""
    REWRITES = "rewrites"
    """compactions, clears and truncations so far: numbers their publishes, so a watcher tells one
    it has announced (or read the result of) from a newer one"""
    CLEARED_AT_SEQ = "cleared_at_seq"
    """the session's last seq when it was last cleared: a watch resumed at or before it missed that"""
    TRUNCATED = "truncated"
    """"<after> <last> <rewrite>": every seq in after+1..last was removed by the latest truncation
    (merged with the earlier ones it reaches into), the session's rewrite that one was: a watch
    resumed within that range missed it, and one that reads past it knows whether it was told
    (a record written before the rewrite was kept has none)"""
    COMPACTED = "compacted"
    """"<first> <last> <rewrite>": the range the summary stored now replaces (its seq is last) and
    the session's rewrite the compaction that wrote it was. A later compaction rewrites it (its
    range takes the earlier one in); a clear, or a truncation that removes the summary, deletes it;
    a fork does not copy it (the fork's summary is none of its own compactions). A watch that
    reads past it later (its event dropped from a full inbox) knows whether it was told. A session
    compacted before the record was kept has none."""
    HOLES = "holes"
    """"1" once a truncation left the window's seqs short of message_count: its seqs may have holes
    (removed seqs are never reused), so the scripts read them from the items instead of counting
    back from message_count (absent or "0": no holes)"""
    PAYLOADS = "payloads"
    """'1' once the session has stored a message with a payload (set by appends, compactions and
    forks, never unset): only then do the page and context budgets look for reply_bytes in
    each message (REPLY_BYTES_PATTERN), so a session without payloads pays nothing for them"""
    APP = "app"
    """the app (namespace) the session belongs to; absent for none. Immutable."""


class PublishKind(enum.StrEnum):
    """The letter a watch channel's publish starts with: what happened to the session (the
    scripts write it, the feed reads it; see feed.py for each payload's form)."""

    APPENDED = "M"
    DELETED = "D"
    COMPACTED = "C"
    CLEARED = "X"
    TRUNCATED = "T"


def body_prefix(role: Role) -> str:
    """What `encode_body` output starts with for a message of `role`: the scripts tell system and
    tool messages apart by this prefix alone, without decoding JSON."""
    return f'"role":{json.dumps(role.value)},'


TIME_FORMAT = "%.6f"
"""Unix seconds as the meta HASH and the index scores hold them (microsecond precision); the
scripts write a score in this form too."""


def format_time(seconds: float) -> str:
    """Unix seconds as the decimal string the meta HASH holds."""
    return TIME_FORMAT % seconds


def encode_body(message: NewMessage, created_at: float) -> str:
    """The message's JSON without its opening `{"seq":N,`, which the append script prepends;
    `created_at` is the message's own time when the caller gave one.

    `role` comes first so the scripts can tell system and tool messages from the prefix alone.
    """
    if message.created_at is not None:
        created_at = message.created_at
    if not (
        message.name
        or message.metadata
        or message.tool_calls
        or message.tool_call_id
        or message.payload is not None
    ):
        # Most messages are just these four fields: written directly, byte for byte what the
        # json.dumps below gives (tests/test_script_contract.py), in less than half the time.
        return (
            f'"role":"{message.role.value}","content":{_json_string(message.content)},'
            f'"tokens":{message.tokens},"created_at":{round(created_at, 6)!r}}}'
        )
    obj: dict[str, Any] = {"role": message.role.value}
    if message.payload is not None:
        # A JSON string holding the payload's JSON text: no script parses it (REPLY_BYTES_PATTERN).
        obj["reply_bytes"] = message.reply_bytes
        obj["payload"] = message.payload
    obj["content"], obj["tokens"] = message.content, message.tokens
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
    return _BODY_ENCODER.encode(obj)[1:]


_BODY_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_json_string: Callable[[str], str] = json.encoder.encode_basestring
"""A JSON string literal as json.dumps(ensure_ascii=False) writes it (the C function)."""


def stored_json(seq: int, body: str) -> str:
    """Exactly what the append script stores for `body` at `seq`."""
    return f"{SEQ_HEAD}{seq},{body}"


def fingerprint(messages: Sequence[NewMessage]) -> str:
    """Identifies a request's content (not its timing) so a reused request_id can be told apart."""
    raw = "[" + ",".join(map(_canonical, messages)) + "]"
    return hashlib.sha256(raw.encode()).hexdigest()


def _canonical(m: NewMessage) -> str:
    """One message's part of the fingerprint: its JSON list [role, content, tokens, name,
    metadata pairs sorted, tool calls, tool_call_id], and the payload's JSON text after them when
    it has one. Request records outlive a server upgrade: these bytes never change
    (tests/test_script_contract.py holds them to json.dumps)."""
    if not (m.name or m.metadata or m.tool_calls or m.tool_call_id or m.payload is not None):
        return f'["{m.role.value}",{_json_string(m.content)},{m.tokens},"",[],[],""]'
    parts: list[Any] = [
        m.role.value,
        m.content,
        m.tokens,
        m.name,
        sorted(m.metadata.items()),
        [[c.id, c.name, c.arguments] for c in m.tool_calls],
        m.tool_call_id,
    ]
    if m.payload is not None:
        parts.append(m.payload)
    return _BODY_ENCODER.encode(parts)


def decode_message(raw: bytes | str) -> StoredMessage:
    return message_from_obj(json.loads(raw))


def decode_messages(raws: Sequence[bytes]) -> tuple[StoredMessage, ...]:
    """Stored messages as the scripts return them, parsed as one JSON array (one parse, not one
    per message: a page of 20 decodes in a third of the time)."""
    if not raws:
        return ()
    return tuple(map(message_from_obj, json.loads(b"[" + b",".join(raws) + b"]")))


def _role(value: Any) -> Role:
    role = ROLE_OF.get(value) if isinstance(value, str) else None
    return role if role is not None else Role(value)  # an unknown role: Role's ValueError


def message_from_obj(obj: dict[str, Any]) -> StoredMessage:
    calls = obj.get("tool_calls")
    metadata = obj.get("metadata")
    return StoredMessage(
        int(obj["seq"]),
        _role(obj["role"]),
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
        _seq_range(obj.get("summarizes")),
        obj.get("payload"),
    )


def stored_message(message: NewMessage, seq: int, created_at: float) -> StoredMessage:
    """What `decode_message` gives for the message the append script stored from
    `encode_body(message, created_at)` at `seq`, without the JSON round trip."""
    return StoredMessage(
        seq,
        message.role,
        message.content,
        message.tokens,
        round(created_at if message.created_at is None else message.created_at, 6),
        message.name,
        message.metadata,
        message.tool_calls,
        message.tool_call_id,
        None,
        message.payload,
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
    app: str = "",
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
    if app:
        fields[MetaField.APP] = app
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
        # TTL says -1 for a key without expiry (a session with ttl_seconds NEVER_EXPIRES)
        expires_in_seconds=NEVER_EXPIRES if ttl == -1 else max(ttl, 0),
        ttl_seconds=int(_text(meta, MetaField.TTL_SECONDS, "0")),
        max_messages=int(_text(meta, MetaField.MAX_MESSAGES, "-1")),
        app=_text(meta, MetaField.APP),
        rewrites=int(meta.get(_REWRITES_KEY) or 0),
        cleared_at_seq=int(meta.get(_CLEARED_AT_SEQ_KEY) or 0),
    )


# (Encoded once: every session read decodes these two, which only a watch uses.)
_REWRITES_KEY = MetaField.REWRITES.encode()
_CLEARED_AT_SEQ_KEY = MetaField.CLEARED_AT_SEQ.encode()


def decode_described(session_id: str, described: Any) -> Session:
    """A Session from a script's `describe(chat, meta)`: {HGETALL meta (flat), LLEN chat, TTL meta}."""
    meta_flat, stored, ttl = described
    return decode_session(session_id, pairs_to_map(meta_flat), int(stored), int(ttl))


def pairs_to_map(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """HGETALL as a Lua script returns it (a flat array) into a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# --- Usage HASH fields (KeySpace.usage) --------------------------------------------------------

USAGE_SEPARATOR = ":"
"""between the parts of a usage field's name: `total:<metric>`, `model:<metric>:<model>`,
`day:<metric>:<YYYY-MM-DD>`"""
USAGE_TOTAL_PREFIX = "total" + USAGE_SEPARATOR
USAGE_DAY_PREFIX = "day" + USAGE_SEPARATOR
USAGE_MODEL_PREFIX = "model" + USAGE_SEPARATOR
USAGE_PRUNED_FIELD = "pruned_day"
"""the UTC day old `day:` fields were last dropped: the scripts drop them once a day"""
USAGE_METRICS = ("messages", "tokens", "sessions")
USAGE_DAYS = 90
"""UTC days of per-day usage kept, today included"""
USAGE_MAX_MODELS = 100
"""distinct models counted apart per user: the usage HASH never expires, and its reply must stay
bounded whatever models a user names"""
USAGE_OTHER_MODEL = "(other)"
"""the model the usage of a user's further models is counted under"""
USAGE_MODELS_FIELD = "models_counted"
"""how many of USAGE_MAX_MODELS places are taken (no `:`, so no reading takes it for a count)"""
SEEN_PRUNED_FIELD = " pruned_day"
"""usage_seen's bookkeeping field (no session id holds a space): the UTC day it was last pruned"""


def usage_days(now: float) -> str:
    """The scripts' `usage_days` argument: today (UTC) and the oldest day kept, "YYYY-MM-DD YYYY-MM-DD"."""
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    return f"{today.isoformat()} {(today - datetime.timedelta(days=USAGE_DAYS - 1)).isoformat()}"


def decode_usage(fields: Mapping[bytes, bytes], oldest_day: str) -> UserUsage:
    """A UserUsage from HGETALL of the usage HASH; days before `oldest_day` are left out (a user
    with no write since has them still)."""
    total: dict[str, int] = {}
    models: dict[str, dict[str, int]] = {}
    days: dict[str, dict[str, int]] = {}
    for raw_name, raw_value in fields.items():
        name = raw_name.decode()
        scope, _, rest = name.partition(USAGE_SEPARATOR)
        scope += USAGE_SEPARATOR
        if scope == USAGE_TOTAL_PREFIX:
            total[rest] = int(raw_value)
            continue
        metric, _, which = rest.partition(USAGE_SEPARATOR)
        if scope == USAGE_MODEL_PREFIX:
            models.setdefault(which, {})[metric] = int(raw_value)
        elif scope == USAGE_DAY_PREFIX and which >= oldest_day:
            days.setdefault(which, {})[metric] = int(raw_value)

    def counts(values: Mapping[str, int]) -> UsageCounts:
        return UsageCounts(values.get("messages", 0), values.get("tokens", 0), values.get("sessions", 0))

    # A HASH written before USAGE_MAX_MODELS existed may hold more: the rest is read as "(other)".
    named = sorted(model for model in models if model != USAGE_OTHER_MODEL)
    for model in named[USAGE_MAX_MODELS:]:
        other = models.setdefault(USAGE_OTHER_MODEL, {})
        for metric, n in models.pop(model).items():
            other[metric] = other.get(metric, 0) + n
    return UserUsage(
        total=counts(total),
        by_model=tuple((model, counts(models[model])) for model in sorted(models)),
        by_day=tuple((day, counts(days[day])) for day in sorted(days)),
    )


# --- ForkSession ------------------------------------------------------------------------------


def renumbered(item: bytes | str, seq: int) -> str:
    """A stored message given another seq (the rest of its JSON as it is)."""
    text = item.decode() if isinstance(item, bytes) else item
    return f"{SEQ_HEAD}{seq}{text[text.index(',', len(SEQ_HEAD)) :]}"


def fork_contents(
    prompt: Sequence[bytes], summary: bytes | str, recent: Sequence[bytes]
) -> tuple[list[str], str, int, int]:
    """What a fork stores: its LIST items (the prompt as it is, then the recent messages renumbered
    after it), its summary JSON ('' for none), its message_count and token_count.

    The summary takes the one seq after the prompt (`seq` = `summarizes` = [p+1, p+1]), standing
    for the whole compacted stretch, so the fork's LIST reads as after a compaction: prompt, a gap
    the summary covers, then the window."""
    items = [renumbered(raw, seq) for seq, raw in enumerate(prompt, 1)]
    tokens = sum(int(json.loads(raw).get("tokens") or 0) for raw in prompt)
    summary_json = ""
    next_seq = len(items) + 1
    if summary:
        obj = json.loads(summary)
        tokens += int(obj.get("tokens") or 0)
        obj["seq"] = next_seq
        obj["summarizes"] = [next_seq, next_seq]
        body = json.dumps(
            {k: v for k, v in obj.items() if k != "seq"}, ensure_ascii=False, separators=(",", ":")
        )
        summary_json = stored_json(next_seq, body[1:])
        next_seq += 1
    for raw in recent:
        items.append(renumbered(raw, next_seq))
        tokens += int(json.loads(raw).get("tokens") or 0)
        next_seq += 1
    return items, summary_json, next_seq - 1, tokens


def fork_fields(
    source: Mapping[bytes, bytes],
    *,
    source_id: str,
    origin: str,
    created_at: str,
    request_id: str,
    message_count: int,
    token_count: int,
    pinned: int,
    stored_bytes: int,
) -> dict[str, str]:
    """The fork's meta HASH: the source's model, title, labels (plus `forked_from`), ttl and
    window; its own times and counters."""
    fields: dict[str, str] = {
        k.decode(): v.decode() for k, v in source.items() if k.startswith(LABEL_FIELD_PREFIX.encode())
    }
    fields[LABEL_FIELD_PREFIX + FORKED_FROM_LABEL] = source_id
    copied = (
        MetaField.USER_ID,
        MetaField.MODEL,
        MetaField.TITLE,
        MetaField.TTL_SECONDS,
        MetaField.MAX_MESSAGES,
        MetaField.PAYLOADS,
        MetaField.APP,
    )
    for field in copied:  # those the source has (an old session may lack max_messages)
        if (value := source.get(field.encode())) is not None:
            fields[field] = value.decode()
    fields.update(
        {
            MetaField.CREATED_AT: created_at,
            MetaField.LAST_ACTIVE: created_at,
            MetaField.MESSAGE_COUNT: str(message_count),
            MetaField.TOKEN_COUNT: str(token_count),
            MetaField.PINNED: str(pinned),
            MetaField.STORED_BYTES: str(stored_bytes),
            MetaField.FORK_ORIGIN: origin,
            MetaField.USAGE_BASE: f"{message_count} {token_count}",
        }
    )
    if request_id:
        fields[MetaField.CREATE_REQUEST_ID] = request_id
    return fields


# --- State (KeySpace.state, KeySpace.user_state) ------------------------------------------------

STATE_BYTES_FIELD = ""
"""The field of a state HASH that holds the bytes of its keys and values (no key is empty)."""


def encode_state_delta(to_set: Mapping[str, str], to_remove: Iterable[str]) -> str:
    """A state change as the scripts take it: '' for none, else the JSON
    `[[key, json text, key, json text, ...], [key to remove, ...]]`, keys sorted (so that the same
    change is the same text). The values are the JSON texts to store, carried as JSON strings:
    cjson gives a string back byte for byte, so no script ever re-encodes a value."""
    removed = sorted(set(to_remove))
    if not to_set and not removed:
        return ""
    pairs = [item for key in sorted(to_set) for item in (key, to_set[key])]
    return _BODY_ENCODER.encode([pairs, removed])


def decode_state(flat: Sequence[bytes]) -> dict[str, str]:
    """A state HASH as HGETALL gives it to a script (a flat array): key -> JSON text, without
    the bytes field."""
    return {
        flat[i].decode(): flat[i + 1].decode()
        for i in range(0, len(flat), 2)
        if flat[i] != STATE_BYTES_FIELD.encode()
    }


def state_fingerprint(fingerprint: str, encoded_delta: str) -> str:
    """An append's fingerprint with its state change: a request_id reused with another change is
    another request. Without a change the fingerprint is the messages' alone, as it always was."""
    if not encoded_delta:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}\n{encoded_delta}".encode()).hexdigest()
