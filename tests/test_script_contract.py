"""The Lua <-> Python contract: what the scripts match in stored JSON, and how they are called."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsession_server.domain import NewMessage, Role, ToolCall
from chatsession_server.store import codec
from chatsession_server.store.lua import owner_scripts, runtime, session_scripts

texts = st.text(max_size=50)


@given(
    role=st.sampled_from(list(Role)),
    content=texts,
    name=texts,
    metadata=st.dictionaries(texts, texts, max_size=3),
    call=st.tuples(texts, texts, texts),
    seq=st.integers(1, 10**12),
)
def test_stored_json_starts_with_what_the_scripts_match(
    role: Role, content: str, name: str, metadata: dict[str, str], call: tuple[str, str, str], seq: int
) -> None:
    message = NewMessage(
        role=role,
        content=content,
        name=name,
        metadata=metadata,
        tool_calls=(ToolCall(*call),) if role is Role.ASSISTANT else (),
        tool_call_id="c1" if role is Role.TOOL else "",
    )
    body = codec.encode_body(message, 1710000000.5)
    assert body.startswith(codec.body_prefix(role))
    # A content that looks like another role's prefix cannot fool the match: the role comes first.
    for other in Role:
        assert body.startswith(codec.body_prefix(other)) == (other is role)
    stored = codec.stored_json(seq, body)
    assert stored.startswith(f"{codec.SEQ_HEAD}{seq},{codec.body_prefix(role)}")
    assert codec.decode_message(stored).seq == seq


@pytest.mark.parametrize("script", session_scripts.ALL + owner_scripts.ALL)
def test_scripts_name_every_key_and_argument_instead_of_indexing(script: runtime.LuaScript[object]) -> None:
    header, _, body = script.source.partition("\nlocal function describe")
    assert "KEYS[" not in body
    assert "ARGV[" not in re.sub(r"ARGV\[i( \+ 1)?\]|unpack\(ARGV", "", body)
    assert "#!lua" not in script.source or script.source.startswith("#!lua flags=no-writes\n")
    assert f"local {', '.join(script.key_names)} = " in header


def test_arguments_are_encoded_in_field_order() -> None:
    args = session_scripts.ListMessagesArgs(
        owners=runtime.owners_arg({"bob", "al"}), limit=20, after_seq=None, before_seq=7, max_bytes=100
    )
    assert session_scripts.LIST_MESSAGES.argv(args) == [" al bob ", "20", "", "7", "100"]
    assert runtime.owners_arg(None) == ""  # anyone's
    assert runtime.owners_arg(()) == " "  # nobody's
    update = session_scripts.UpdateArgs(
        owners="",
        ttl=None,
        max_messages=5,
        clear_labels=True,
        max_labels=64,
        set_count=1,
        changes=["title", "t", "label:x"],
    )
    assert session_scripts.UPDATE.argv(update) == ["", "", "5", "1", "64", "1", "title", "t", "label:x"]
    assert "local changes_from = 7" in session_scripts.UPDATE.source
    with pytest.raises(ValueError, match="at most 3 keys"):
        session_scripts.LIST_MESSAGES.keys("a", "b", "c", "d")


@given(
    role=st.sampled_from(Role),
    content=st.text(),
    tokens=st.integers(0, 10**9),
    created_at=st.floats(0, 4e9, allow_nan=False) | st.integers(0, 4 * 10**9).map(float),
    extras=st.booleans(),
)
def test_a_body_is_what_json_dumps_writes(
    role: Role, content: str, tokens: int, created_at: float, extras: bool
) -> None:
    # encode_body writes the common message (role, content, tokens) directly: byte for byte what
    # json.dumps gives, escapes, non-ASCII text and float forms included.
    message = NewMessage(
        role=role,
        content=content,
        tokens=tokens,
        name="n" if extras else "",
        metadata={"k": content} if extras else {},
    )
    expected: dict[str, object] = {"role": role.value, "content": content, "tokens": tokens}
    expected["created_at"] = round(created_at, 6)
    if extras:
        expected["name"], expected["metadata"] = "n", {"k": content}
    assert (
        codec.encode_body(message, created_at)
        == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))[1:]
    )


@given(
    messages=st.lists(
        st.builds(
            NewMessage,
            role=st.sampled_from(Role),
            content=st.text(),
            tokens=st.integers(0, 10**9),
            name=st.sampled_from(["", "bob"]),
            metadata=st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
            tool_calls=st.lists(st.builds(ToolCall, st.text(), st.text(), st.text()), max_size=2).map(tuple),
            tool_call_id=st.sampled_from(["", "call-1"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_fingerprint_is_the_sha256_of_the_same_json_as_ever(messages: list[NewMessage]) -> None:
    # Stored request records outlive an upgrade: a retry after it must still match.
    canonical = [
        [m.role.value, m.content, m.tokens, m.name, sorted(m.metadata.items()),
         [[c.id, c.name, c.arguments] for c in m.tool_calls], m.tool_call_id]
        for m in messages
    ]  # fmt: skip
    raw = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()
    assert codec.fingerprint(messages) == hashlib.sha256(raw).hexdigest()


json_scalars = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip


def _lua_pattern_as_regex(pattern: str) -> re.Pattern[str]:
    """The Lua pattern classes REPLY_BYTES_PATTERN uses, as a Python regex."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern[i] == "%":
            out += {"d": r"\d", "a": "[A-Za-z]"}[pattern[i + 1]]
            i += 2
        elif pattern[i] in "^()+":
            out += pattern[i]
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


@given(
    role=st.sampled_from(list(Role)),
    content=texts,
    tokens=st.integers(0, 10**9),
    payload=json_values,
    reply_bytes=st.integers(1, 10**7),
    name=st.sampled_from(["", "bob"]),
)
def test_a_payload_is_a_json_string_after_the_role_that_hides_nothing_the_scripts_match(
    role: Role, content: str, tokens: int, payload: object, reply_bytes: int, name: str
) -> None:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    message = NewMessage(
        role=role, content=content, tokens=tokens, name=name, payload=text, reply_bytes=reply_bytes
    )
    body = codec.encode_body(message, 1710000000.5)
    expected: dict[str, object] = {"role": role.value, "reply_bytes": reply_bytes, "payload": text}
    expected |= {"content": content, "tokens": tokens, "created_at": 1710000000.5}
    if name:
        expected["name"] = name
    assert body == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))[1:]
    stored = codec.stored_json(7, body)
    assert body.startswith(codec.body_prefix(role))
    # The scripts' reads of a stored message: its reply_bytes, its top-level tokens.
    match = _lua_pattern_as_regex(codec.REPLY_BYTES_PATTERN).match(stored)
    assert match is not None
    assert int(match.group(1)) == reply_bytes
    at = stored.index(codec.TOKENS_HEAD) + len(codec.TOKENS_HEAD)
    assert int(re.match(r"\d+", stored[at:]).group()) == tokens  # type: ignore[union-attr]
    decoded = codec.decode_message(stored)
    assert decoded.payload == text
    assert decoded == codec.stored_message(message, 7, 1710000000.5)
    # Without a payload, nothing of one.
    plain = codec.stored_json(7, codec.encode_body(NewMessage(role=role, content=content), 1.0))
    assert _lua_pattern_as_regex(codec.REPLY_BYTES_PATTERN).match(plain) is None
    assert codec.decode_message(plain).payload is None


def test_a_payload_joins_the_fingerprint_only_when_there_is_one() -> None:
    plain = NewMessage(role=Role.USER, content="x")
    raw = json.dumps([["user", "x", 0, "", [], [], ""]], separators=(",", ":")).encode()
    assert codec.fingerprint([plain]) == hashlib.sha256(raw).hexdigest()
    with_payload = NewMessage(role=Role.USER, content="x", payload='{"a":1}', reply_bytes=40)
    raw = json.dumps([["user", "x", 0, "", [], [], "", '{"a":1}']], separators=(",", ":")).encode()
    assert codec.fingerprint([with_payload]) == hashlib.sha256(raw).hexdigest()
    other = NewMessage(role=Role.USER, content="x", payload='{"a":2}', reply_bytes=40)
    null = NewMessage(role=Role.USER, content="x", payload="null", reply_bytes=40)
    assert len({codec.fingerprint([m]) for m in (plain, with_payload, other, null)}) == 4
