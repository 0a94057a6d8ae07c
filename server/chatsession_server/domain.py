"""Domain types shared by the servicer and the store: no protobuf, no Valkey."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, TypeAlias


class Role(enum.StrEnum):
    """Message author; the value is what the stored JSON says (`"role": "user"`)."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


ROLE_OF: Mapping[str, Role] = {role.value: role for role in Role}
"""A role by its stored value: a dict lookup costs a tenth of `Role(value)` (on every message read)."""

_NO_METADATA: Mapping[str, str] = MappingProxyType({})

FORKED_FROM_LABEL = "forked_from"
"""The label ForkSession gives a fork: the source's session id (the store writes it)."""
RESERVED_LABELS = frozenset({FORKED_FROM_LABEL})
"""Labels only the service sets: a caller reads them, never sets or removes them."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message as the caller sends it, before the store assigns seq and created_at."""

    role: Role
    content: str
    tokens: int = 0
    name: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    payload: str | None = None
    """the caller's JSON value as JSON text (api/payload.py writes it); None: no payload"""
    reply_bytes: int = 0
    """with a payload: about what the message takes encoded in a reply (the page budgets count it)"""
    created_at: float | None = None
    """the caller's own time of the message (unix seconds); None: the server's time of the append"""


class StoredMessage(NamedTuple):
    """A message as stored, with its seq and created_at.

    A NamedTuple, not a frozen dataclass like the other types here: one is built per message on
    every read (a page of 20, a watch batch), and a frozen dataclass's __init__ costs three times
    as much (one object.__setattr__ per field). Immutable all the same."""

    seq: int
    role: Role
    content: str
    tokens: int
    created_at: float
    name: str = ""
    metadata: Mapping[str, str] = _NO_METADATA
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    summarizes: tuple[int, int] | None = None
    """On a compaction's summary: the first and last seq it stands for."""
    payload: str | None = None
    """The caller's JSON value as the JSON text stored (None: no payload)."""


UNLIMITED = -1
"""`max_messages` value for a session without a sliding window."""
NEVER_EXPIRES = -1
"""`ttl_seconds` (and `expires_in_seconds`) of a session that never expires: its keys have no TTL."""


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    user_id: str
    model: str
    title: str
    labels: Mapping[str, str]
    created_at: float
    last_active: float
    message_count: int
    token_count: int
    messages_stored: int
    expires_in_seconds: int
    ttl_seconds: int
    max_messages: int
    app: str = ""
    """the app (namespace) it belongs to; '' for none"""
    rewrites: int = 0
    """its compactions, clears and truncations so far (see Compacted.rewrite); not in the API's
    Session: what a watch starting now takes as already told"""
    cleared_at_seq: int = 0
    """its last seq when it was last cleared (0: never); as `rewrites`, for a watch"""


@dataclass(frozen=True, slots=True)
class NewSession:
    """What CreateSession asks for, with defaults already resolved by the caller."""

    session_id: str
    user_id: str
    model: str
    title: str
    labels: Mapping[str, str]
    ttl_seconds: int
    max_messages: int
    request_id: str = ""
    chosen_id: bool = False
    """the caller chose `session_id` (else the server made it)"""
    app: str = ""


@dataclass(frozen=True, slots=True)
class Owners:
    """Whose sessions a call may touch, for a caller confined to some apps: those of `users`
    (None: of every user) that belong to one of `apps` (never a session without an app)."""

    users: frozenset[str] | None
    apps: frozenset[str]

    def allow(self, user_id: str, app: str) -> bool:
        return (self.users is None or user_id in self.users) and app in self.apps


Owned: TypeAlias = Collection[str] | Owners | None
"""A store call's `owners`: the user ids whose sessions it may touch, an `Owners`, or None (anyone's)."""


def owns(owners: Owned, user_id: str, app: str) -> bool:
    """Whether `owners` lets a call touch a session of `user_id` in `app` ('' for none)."""
    if owners is None:
        return True
    if isinstance(owners, Owners):
        return owners.allow(user_id, app)
    return user_id in owners


@dataclass(frozen=True, slots=True)
class Listed:
    """What a ListSessions lists: a user's sessions (`app` '': of every app, else of that app),
    or with `user_id` '' every user's sessions of `app`."""

    user_id: str
    app: str = ""


def scope_owner(session_id: str) -> str | None:
    """The user a '<user_id>/<name>' session id belongs to (no user id holds '/', so the prefix
    names one user only); None for an id without '/'."""
    owner, slash, _ = session_id.partition("/")
    return owner if slash else None


def scope_rule(user_id: str) -> str:
    """What a refusal of a '<user_id>/<name>' id of another user says."""
    return f"an id with '/' is the session of the user before its first '/': must start with '{user_id}/'"


@dataclass(frozen=True, slots=True)
class NewFork:
    """What ForkSession asks for: a copy of `source_id` up to `at_seq` (None: its newest seq)
    as the new session `session_id`."""

    source_id: str
    at_seq: int | None
    session_id: str
    request_id: str = ""
    chosen_id: bool = False
    """the caller chose `session_id` (else the server made it)"""


@dataclass(frozen=True, slots=True)
class UsageCounts:
    messages: int = 0
    tokens: int = 0
    sessions: int = 0
    """sessions created (forks included)"""


@dataclass(frozen=True, slots=True)
class UserUsage:
    """A user's usage in total, per model (sorted by name) and per UTC day ("YYYY-MM-DD", oldest first)."""

    total: UsageCounts
    by_model: tuple[tuple[str, UsageCounts], ...]
    by_day: tuple[tuple[str, UsageCounts], ...]


@dataclass(frozen=True, slots=True)
class SessionPatch:
    """UpdateSession's changes; None leaves a field as it is."""

    title: str | None = None
    model: str | None = None
    ttl_seconds: int | None = None
    max_messages: int | None = None
    replace_labels: Mapping[str, str] | None = None
    """The whole new label map, or None to keep the labels (then `set_labels`/`remove_labels` apply)."""
    set_labels: Mapping[str, str] = field(default_factory=dict)
    remove_labels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AppendResult:
    messages: tuple[StoredMessage, ...]
    session: Session
    replayed: bool


@dataclass(frozen=True, slots=True)
class SessionCursor:
    """Position in a user's index, newest first: the last row a page returned."""

    last_active: float
    session_id: str


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: tuple[Session, ...]
    next_cursor: SessionCursor | None


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """ListMessages' range: forward after `after_seq`, else backward before `before_seq` (or the newest)."""

    limit: int
    after_seq: int | None = None
    before_seq: int | None = None
    max_bytes: int | None = None
    """a page stops short of this many bytes of stored messages (holding at least one); None: the
    store's own page bound"""


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: tuple[StoredMessage, ...]
    has_more: bool
    last_seq: int
    window_start_seq: int
    history_trimmed: bool
    rewrites: int = 0
    """the session's compactions, clears and truncations so far, as of this read (see Compacted.rewrite)"""
    cleared_at_seq: int = 0
    """the session's last seq when it was last cleared (0: never)"""
    truncated: tuple[int, int] | None = None
    """(after, last): the seqs after+1..last the latest truncations removed (None: none)"""
    truncation_rewrite: int = 0
    """the rewrite (see Truncated.rewrite) of the latest truncation (0: none, or not recorded)"""
    compacted: tuple[int, int] | None = None
    """(first, last): the range the stored summary replaced, as its compaction recorded it (None:
    no summary, or one compacted before the record was kept)"""
    compaction_rewrite: int = 0
    """the rewrite (see Compacted.rewrite) of the compaction that stored the summary (0: none)"""


# --- Live watch: what the feed tells a watcher, and what a watch yields -------------------------


@dataclass(frozen=True, slots=True)
class Appended:
    """Seqs first..last were appended; `messages` holds them when they came inline. `owner` is
    the user whose session they went to (None from a server that did not say)."""

    first_seq: int
    last_seq: int
    messages: tuple[StoredMessage, ...] | None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Behind:
    """Something may have been missed (lost publish, full buffer): re-read after your cursor.
    `last_seq` is the newest seq known, or 0 when unknown."""

    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class Deleted:
    """The session was deleted or expired."""


@dataclass(frozen=True, slots=True)
class Closing:
    """This server is shutting down."""


@dataclass(frozen=True, slots=True)
class Compacted:
    """Seqs first..last were replaced by a summary (stored with seq = last). `owner` as in Appended;
    `rewrite`: the session's count of compactions and clears this one made (None: not known)."""

    first_seq: int
    last_seq: int
    owner: str | None = None
    rewrite: int | None = None


@dataclass(frozen=True, slots=True)
class Cleared:
    """The history was emptied when the session's last seq was `last_seq`."""

    last_seq: int
    owner: str | None = None
    rewrite: int | None = None
    """as in Compacted"""


@dataclass(frozen=True, slots=True)
class Truncated:
    """The stored messages after `after_seq` were removed when the session's last seq was
    `last_seq` (seqs go on after it)."""

    after_seq: int
    last_seq: int
    owner: str | None = None
    rewrite: int | None = None
    """as in Compacted"""


FeedEvent = Appended | Behind | Deleted | Closing | Compacted | Cleared | Truncated


@dataclass(frozen=True, slots=True)
class Heartbeat:
    last_seq: int


@dataclass(frozen=True, slots=True)
class Trimmed:
    first_missing_seq: int
    last_missing_seq: int


WatchEvent = StoredMessage | Heartbeat | Trimmed | Compacted | Cleared | Truncated


# --- Context, compaction and clearing ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContextQuery:
    """GetContext's budget; 0 means no limit."""

    max_tokens: int = 0
    max_messages: int = 0


@dataclass(frozen=True, slots=True)
class Context:
    messages: tuple[StoredMessage, ...]
    tokens: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class Compaction:
    """CompactMessages' request: replace the stored messages up to `up_to_seq` with `summary`."""

    up_to_seq: int
    summary: NewMessage
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class CompactResult:
    summary: StoredMessage
    session: Session
    replayed: bool


@dataclass(frozen=True, slots=True)
class StateScope:
    """Whose state: a session's (`session_id`), the one every session of a user shares
    (`user_id`) or the one every session of an app shares (`app`); exactly one is set."""

    session_id: str = ""
    user_id: str = ""
    app: str = ""


@dataclass(frozen=True, slots=True)
class StateDelta:
    """A change of a state: keys to set, with their values' JSON text, and keys to remove (never
    one of those set)."""

    to_set: Mapping[str, str] = field(default_factory=dict)
    to_remove: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Truncation:
    """TruncateMessages' request: keep the stored messages with seq <= `after_seq`, or (when it is
    None) remove the newest `pop_count` stored ones."""

    after_seq: int | None
    pop_count: int = 0
    expected_last_seq: int | None = None
    request_id: str = ""
    return_removed: bool = False


@dataclass(frozen=True, slots=True)
class TruncateResult:
    session: Session
    after_seq: int
    """where the history now ends: every stored message after it was removed"""
    removed_count: int
    removed: tuple[StoredMessage, ...]
    """the removed messages, oldest first (only when asked for, and never on a replay)"""
    replayed: bool
