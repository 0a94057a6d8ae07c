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
from chatsession_server.store.lua import owner_scripts, runtime, session_scripts, state_scripts

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


@pytest.mark.parametrize("script", session_scripts.ALL + owner_scripts.ALL + state_scripts.ALL)
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
