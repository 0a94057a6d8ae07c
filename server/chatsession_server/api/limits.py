"""Input limits and defaults the validators apply, taken from Settings once."""

from __future__ import annotations

from dataclasses import dataclass

from chatsession_server.settings import Settings

MAX_ID_LENGTH = 128
MAX_MODEL_LENGTH = 256
MAX_TITLE_LENGTH = 1024
MAX_LABELS = 64
MAX_LABEL_KEY_LENGTH = 128
MAX_LABEL_VALUE_LENGTH = 1024
MAX_NAME_LENGTH = 256
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LENGTH = 128
MAX_METADATA_VALUE_LENGTH = 4096
MAX_TOOL_CALLS = 128
MAX_TOKENS_PER_MESSAGE = 1 << 31
MAX_WINDOW = 1_000_000
MAX_PAYLOAD_DEPTH = 24
"""Lists and objects a payload may nest: each level of an object is three levels of protobuf
messages, and protobuf parsers refuse a message nested deeper than 100 (the reply that carries
a payload nests it three deeper still)."""
MAX_PAYLOAD_VALUES = 10_000
"""Values (each null, bool, number, string, list and object) in one message's payload: checking
and converting a payload costs a few microseconds a value (a 1 MiB list of nulls holds 250000)."""
MAX_PAYLOAD_VALUES_PER_APPEND = 20_000
"""Values in all the payloads of one AppendMessages: what validating one request may cost."""
REPLY_BYTES_PER_VALUE = 64
"""What a payload value counts for in a page's byte budget at the least: a page of 3 MiB then
converts at most about 49000 values (reply_bytes is the larger of this and the encoded size)."""
REPLY_OVERHEAD_BYTES = 32
"""What a stored message adds in a reply to what the caller sent (its seq and created_at)."""
DEFAULT_SESSIONS_PAGE = 50
DEFAULT_MESSAGES_PAGE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Limits:
    default_ttl_seconds: int
    max_ttl_seconds: int
    default_max_messages: int
    max_content_bytes: int
    max_messages_per_append: int
    max_message_bytes: int
    max_append_bytes: int
    max_clock_skew_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            default_ttl_seconds=settings.default_ttl_seconds,
            max_ttl_seconds=settings.max_ttl_seconds,
            default_max_messages=settings.default_max_messages,
            max_content_bytes=settings.max_content_bytes,
            max_messages_per_append=settings.max_messages_per_append,
            max_message_bytes=settings.max_message_bytes,
            max_append_bytes=settings.max_append_bytes,
            max_clock_skew_seconds=settings.max_clock_skew_seconds,
        )
