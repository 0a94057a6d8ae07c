"""Key and channel names. `{...}` hash tags keep each session's keys in one cluster slot."""

CHAT_PREFIX = "chat:"
META_PREFIX = "meta:"
REQUESTS_PREFIX = "reqs:"
USER_INDEX_PREFIX = "user_sessions:"
SUMMARY_PREFIX = "summary:"


def chat_key(session_id: str) -> str:
    """LIST of the session's messages as JSON, oldest first."""
    return f"{CHAT_PREFIX}{{{session_id}}}"


def meta_key(session_id: str) -> str:
    """HASH of the session's metadata and counters."""
    return f"{META_PREFIX}{{{session_id}}}"


def requests_key(session_id: str) -> str:
    """HASH request_id -> "fingerprint first_seq count": AppendMessages' idempotency records."""
    return f"{REQUESTS_PREFIX}{{{session_id}}}"


def summary_key(session_id: str) -> str:
    """STRING: the summary CompactMessages stored, as JSON in the LIST items' format with its seq
    (the last seq it replaces) and `"summarizes":[first,last]`. Same slot and expiry as the
    session's other keys; absent until the first compaction."""
    return f"{SUMMARY_PREFIX}{{{session_id}}}"


def user_index_key(user_id: str) -> str:
    """ZSET of a user's session ids scored by last_active. Its own slot: in a cluster it is kept
    in a second step (see session_store.py); on standalone Valkey, in the session's scripts."""
    return f"{USER_INDEX_PREFIX}{{{user_id}}}"


WATCH_PREFIX = "watch:"


def watch_channel(session_id: str) -> str:
    """Pub/sub channel announcing a session's appends, compactions, clears and deletion; in its slot, so a
    cluster publishes it sharded (SPUBLISH) on the session's node only."""
    return f"{WATCH_PREFIX}{{{session_id}}}"


def session_of_channel(channel: str) -> str:
    return channel[len(WATCH_PREFIX) + 1 : -1]


USER_INDEX_KEY_HEAD = f"{USER_INDEX_PREFIX}{{"
"""What a script puts before a user id (and `}` after) to name that user's index (standalone only:
a key the script does not declare)."""


def page_token_secret_key() -> str:
    """STRING: the random secret that signs ListSessions page tokens when none is configured
    (created once by the first server to start, then shared by every replica). No expiry."""
    return "chatsession:page_token_key"
