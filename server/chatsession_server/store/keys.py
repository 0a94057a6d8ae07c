"""Key and channel names. `{...}` hash tags keep each session's keys in one cluster slot.

Every name starts with the deployment's key prefix (`--key-prefix`, empty by default: the
cookbook's own names), so several deployments can share one Valkey. The prefix holds no `{` or `}`:
it never changes which part of a name is hashed to a cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatsession_server.settings import KEY_PREFIX_PATTERN

CHAT_PREFIX = "chat:"
META_PREFIX = "meta:"
REQUESTS_PREFIX = "reqs:"
USER_INDEX_PREFIX = "user_sessions:"
WATCH_PREFIX = "watch:"
PAGE_TOKEN_SECRET = "chatsession:page_token_key"
SUMMARY_PREFIX = "summary:"
USAGE_PREFIX = "usage:"
USAGE_SEEN_PREFIX = "usage_seen:"
STATE_PREFIX = "state:"
USER_STATE_PREFIX = "user_state:"
APP_INDEX_PREFIX = "app_sessions:"
APP_STATE_PREFIX = "app_state:"

HASH_TAG_END = "}"
"""Closes the hash tag a `*_head` opens: a script names an owner's key as head, user id, this."""


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The names of every key and channel of one deployment."""

    prefix: str = ""

    def __post_init__(self) -> None:
        if not KEY_PREFIX_PATTERN.fullmatch(self.prefix):
            raise ValueError("key_prefix must be at most 64 characters from [A-Za-z0-9_.:-]")

    def chat(self, session_id: str) -> str:
        """LIST of the session's messages as JSON, oldest first."""
        return f"{self.prefix}{CHAT_PREFIX}{{{session_id}}}"

    def meta(self, session_id: str) -> str:
        """HASH of the session's metadata and counters."""
        return f"{self.prefix}{META_PREFIX}{{{session_id}}}"

    def requests(self, session_id: str) -> str:
        """HASH request_id -> "fingerprint first_seq count": the idempotency records of
        AppendMessages, CompactMessages, ClearMessages and TruncateMessages (one record per
        request_id)."""
        return f"{self.prefix}{REQUESTS_PREFIX}{{{session_id}}}"

    def user_index(self, user_id: str) -> str:
        """ZSET of a user's session ids scored by last_active. Its own slot: in a cluster it is kept
        in a second step (see owner_index.py); on standalone Valkey, in the session's scripts."""
        return f"{self.user_index_head}{user_id}{HASH_TAG_END}"

    def user_app_index(self, user_id: str, app: str) -> str:
        """ZSET of a user's session ids of one app, scored by last_active, as `user_index` (which
        still holds them too): `user_sessions:{<user_id>}:<app>`, in the user's slot, so the
        step that keeps the user's index keeps it in the same script."""
        return f"{self.user_index(user_id)}:{app}"

    def app_index(self, app: str) -> str:
        """ZSET of an app's session ids, of every user, scored by last_active. Its own slot: in
        a cluster it is kept in a step of its own after the owner's (see owner_index.py); on
        standalone Valkey, in the session's scripts."""
        return f"{self.app_index_head}{app}{HASH_TAG_END}"

    @property
    def app_index_head(self) -> str:
        """What a script puts before an app (and `}` after) to name that app's index (standalone
        only: a key the script does not declare)."""
        return f"{self.prefix}{APP_INDEX_PREFIX}{{"

    def listing_index(self, user_id: str, app: str) -> str:
        """The index a ListSessions reads: the user's, the user's of one app, or the app's."""
        if not user_id:
            return self.app_index(app)
        return self.user_app_index(user_id, app) if app else self.user_index(user_id)

    @property
    def user_index_head(self) -> str:
        """What a script puts before a user id (and `}` after) to name that user's index (standalone
        only: a key the script does not declare)."""
        return f"{self.prefix}{USER_INDEX_PREFIX}{{"

    def watch_channel(self, session_id: str) -> str:
        """Pub/sub channel announcing a session's appends, compactions, clears and deletion; in the
        session's slot, so a cluster publishes it sharded (SPUBLISH) on the session's node only."""
        return f"{self._watch_head}{session_id}}}"

    @property
    def _watch_head(self) -> str:
        return f"{self.prefix}{WATCH_PREFIX}{{"

    def session_of_channel(self, channel: str) -> str:
        """The session id a `watch_channel` name was made from."""
        return channel[len(self._watch_head) : -1]

    def summary(self, session_id: str) -> str:
        """STRING: the summary CompactMessages stored, as JSON in the LIST items' format with its seq
        (the last seq it replaces) and `"summarizes":[first,last]`. Same slot and expiry as the
        session's other keys; absent until the first compaction."""
        return f"{self.prefix}{SUMMARY_PREFIX}{{{session_id}}}"

    def usage(self, user_id: str) -> str:
        """HASH of a user's usage (codec.USAGE_*): messages, tokens and sessions created, in total
        (`total:<metric>`), per model (`model:<metric>:<model>`) and per UTC day
        (`day:<metric>:<YYYY-MM-DD>`, the last USAGE_DAYS days). No expiry: it outlives sessions. In the
        `{user_id}` slot of the owner's index; standalone, the create, append and fork scripts keep it
        in their own step; in a cluster it is a second step (see owner_index.py)."""
        return f"{self.usage_head}{user_id}{HASH_TAG_END}"

    @property
    def usage_head(self) -> str:
        """What a script puts before a user id (and `}` after) to name that user's usage HASH
        (standalone only: a key the script does not declare)."""
        return f"{self.prefix}{USAGE_PREFIX}{{"

    def usage_seen(self, user_id: str) -> str:
        """HASH session_id -> "created_at message_count token_count synced_at": what the cluster's
        second step has counted of each of the user's sessions, so a repeated or late step counts only
        what is new (cluster only; entries not synced for --max-ttl-seconds are dropped)."""
        return f"{self.prefix}{USAGE_SEEN_PREFIX}{{{user_id}}}"

    def page_token_secret(self) -> str:
        """STRING: the random secret that signs ListSessions page tokens when none is configured
        (created once by the first server to start, then shared by every replica). No expiry."""
        return f"{self.prefix}{PAGE_TOKEN_SECRET}"

    def state(self, session_id: str) -> str:
        """HASH of the session's state: key -> the value's JSON text (as the caller's
        google.protobuf.Value, written once by Python, never re-encoded), and the field "" (no key
        is empty) -> the bytes of every other key and value, which the limits are checked against.
        Same slot and expiry as the session's other keys; deleted and forked with it, kept by
        ClearMessages and CompactMessages; absent while the state is empty."""
        return f"{self.prefix}{STATE_PREFIX}{{{session_id}}}"

    def user_state(self, user_id: str) -> str:
        """HASH of the state every session of a user shares, as `state` holds it. In the user's
        slot (beside `user_sessions:{<user_id>}`); no expiry: it outlives the user's sessions."""
        return f"{self.prefix}{USER_STATE_PREFIX}{{{user_id}}}"

    def app_state(self, app: str) -> str:
        """HASH of the state every session of an app shares (ADK's `app:` keys), as `state`
        holds it. In the app's slot (beside `app_sessions:{<app>}`); no expiry."""
        return f"{self.prefix}{APP_STATE_PREFIX}{{{app}}}"


DEFAULT_KEY_SPACE = KeySpace()
"""No prefix: the cookbook's own key names."""
