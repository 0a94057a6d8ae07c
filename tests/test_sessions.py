"""CreateSession, GetSession, UpdateSession, DeleteSession: results and what lands in Valkey."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from glide import GlideClient

from chatsession_client import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    SessionClient,
    user,
)
from tests.helpers import meta, raises, session_keys_exist, stored_messages, violated_fields


async def test_create_writes_meta_hash_ttl_and_index(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    before = time.time()
    s = await client.create_session(
        f"{uid}-alice",
        session_id=f"{uid}-s",
        model="gpt-4o",
        title="Trip",
        labels={"team": "travel"},
        ttl_seconds=600,
        max_messages=50,
    )
    assert (s.session_id, s.user_id, s.model, s.title) == (f"{uid}-s", f"{uid}-alice", "gpt-4o", "Trip")
    assert dict(s.labels) == {"team": "travel"}
    assert (s.message_count, s.token_count, s.messages_stored) == (0, 0, 0)
    assert (s.ttl_seconds, s.max_messages) == (600, 50)
    assert 595 <= s.expires_in_seconds <= 600

    m = await meta(raw, f"{uid}-s")
    assert m["user_id"] == f"{uid}-alice"
    assert (m["model"], m["title"], m["message_count"], m["token_count"]) == ("gpt-4o", "Trip", "0", "0")
    assert m["label:team"] == "travel"
    assert before <= float(m["created_at"]) <= time.time()
    assert m["last_active"] == m["created_at"]
    assert 595 <= await raw.ttl(f"meta:{{{uid}-s}}") <= 600
    score = await raw.zscore(f"user_sessions:{{{uid}-alice}}", f"{uid}-s")
    assert score == float(m["last_active"])


async def test_create_generates_id_and_server_defaults(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    assert len(s.session_id) == 32
    assert s.ttl_seconds == 3600  # the test server's default
    assert s.max_messages == -1  # keep everything by default
    assert await raw.exists([f"meta:{{{s.session_id}}}"]) == 1


async def test_create_clash_is_already_exists_and_changes_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await client.create_session(f"{uid}-a", session_id=f"{uid}-s", title="first")
    before = await meta(raw, f"{uid}-s")
    await raises(AlreadyExistsError, client.create_session(f"{uid}-b", session_id=f"{uid}-s", title="second"))
    assert await meta(raw, f"{uid}-s") == before
    assert await raw.exists([f"user_sessions:{{{uid}-b}}"]) == 0


async def test_create_retry_with_request_id_returns_the_first_session(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    first = await client.create_session(uid, title="x", request_id="req-1")
    again = await client.create_session(uid, title="x", request_id="req-1")
    assert again.session_id == first.session_id
    assert again.created_at == first.created_at
    assert await raw.zcard(f"user_sessions:{{{uid}}}") == 1
    # Same id chosen by the caller but another request_id: a real clash.
    await raises(
        AlreadyExistsError, client.create_session(uid, session_id=first.session_id, request_id="req-2")
    )


async def test_get_returns_counters_and_missing_is_not_found(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-s")
    await client.append(s.session_id, [user("hello", tokens=5), user("again", tokens=7)])
    got = await client.get_session(s.session_id)
    assert (got.message_count, got.token_count, got.messages_stored) == (2, 12, 2)
    assert got.last_active.ToNanoseconds() >= got.created_at.ToNanoseconds()
    await raises(NotFoundError, client.get_session(f"{uid}-missing"))


async def test_update_applies_only_masked_fields(client: SessionClient, raw: GlideClient, uid: str) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-s", title="old", model="m1", labels={"a": "1"})
    updated = await client.update_session(s.session_id, title="new")
    assert (updated.title, updated.model, dict(updated.labels)) == ("new", "m1", {"a": "1"})
    updated = await client.update_session(s.session_id, labels={"b": "2"})
    assert dict(updated.labels) == {"b": "2"}
    m = await meta(raw, s.session_id)
    assert "label:a" not in m
    assert m["label:b"] == "2"
    assert m["title"] == "new"


async def test_update_single_label_paths(client: SessionClient, uid: str) -> None:
    from google.protobuf.field_mask_pb2 import FieldMask

    from chatsession.v1 import session_pb2, session_service_pb2

    s = await client.create_session(uid, labels={"keep": "1", "drop": "2"})
    request = session_service_pb2.UpdateSessionRequest(
        session=session_pb2.Session(session_id=s.session_id, labels={"add": "3"}),
        update_mask=FieldMask(paths=["labels.add", "labels.drop"]),
    )
    response = await client._stub.UpdateSession(request)
    assert dict(response.session.labels) == {"keep": "1", "add": "3"}


async def test_update_ttl_restarts_expiry_of_every_key(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, ttl_seconds=100)
    await client.append(s.session_id, [user("x")], request_id="r1")
    updated = await client.update_session(s.session_id, ttl_seconds=5000)
    assert updated.ttl_seconds == 5000
    for prefix in ("chat", "meta", "reqs"):
        assert 4990 <= await raw.ttl(f"{prefix}:{{{s.session_id}}}") <= 5000


async def test_update_max_messages_trims_at_once(client: SessionClient, raw: GlideClient, uid: str) -> None:
    s = await client.create_session(uid, ttl_seconds=700)
    await client.append(s.session_id, [user(f"m{i}") for i in range(10)])
    updated = await client.update_session(s.session_id, max_messages=3)
    assert updated.messages_stored == 3
    assert [m["seq"] for m in await stored_messages(raw, s.session_id)] == [8, 9, 10]
    assert 690 <= await raw.ttl(f"chat:{{{s.session_id}}}") <= 700


async def test_update_rejects_unknown_mask_paths_and_missing_session(client: SessionClient, uid: str) -> None:
    from google.protobuf.field_mask_pb2 import FieldMask

    from chatsession.v1 import session_pb2, session_service_pb2

    s = await client.create_session(uid)
    request = session_service_pb2.UpdateSessionRequest(
        session=session_pb2.Session(session_id=s.session_id, user_id="mallory"),
        update_mask=FieldMask(paths=["user_id"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client._stub.UpdateSession(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in (info.value.details() or "")
    assert (await client.get_session(s.session_id)).user_id == uid
    await raises(NotFoundError, client.update_session(f"{uid}-missing", title="x"))


async def test_delete_removes_keys_and_index_entry(client: SessionClient, raw: GlideClient, uid: str) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-s")
    await client.append(s.session_id, [user("x")], request_id="r")
    assert await session_keys_exist(raw, s.session_id) == 3
    await client.delete_session(s.session_id)
    assert await session_keys_exist(raw, s.session_id) == 0
    assert await raw.zscore(f"user_sessions:{{{uid}}}", s.session_id) is None
    await raises(NotFoundError, client.delete_session(s.session_id))
    await client.delete_session(s.session_id, allow_missing=True)
    await raises(NotFoundError, client.get_session(s.session_id))


async def test_recreated_session_starts_empty(client: SessionClient, raw: GlideClient, uid: str) -> None:
    await client.create_session(uid, session_id=f"{uid}-s")
    await client.append(f"{uid}-s", [user("old")])
    await client.delete_session(f"{uid}-s")
    again = await client.create_session(uid, session_id=f"{uid}-s")
    assert again.message_count == 0
    assert await stored_messages(raw, f"{uid}-s") == []


async def test_expired_session_is_not_found(client: SessionClient, raw: GlideClient, uid: str) -> None:
    s = await client.create_session(uid, ttl_seconds=1)
    await asyncio.sleep(1.2)
    await raises(NotFoundError, client.get_session(s.session_id))
    await raises(NotFoundError, client.append(s.session_id, [user("late")]))
    assert await session_keys_exist(raw, s.session_id) == 0


async def test_create_validation_names_fields(client: SessionClient, raw: GlideClient, uid: str) -> None:
    err = await raises(
        InvalidArgumentError,
        client.create_session("", session_id="bad id{x}", ttl_seconds=-5, max_messages=-7, title="t" * 2000),
    )
    assert violated_fields(err) >= {"user_id", "session_id", "ttl_seconds", "max_messages", "title"}
    assert await raw.exists(["meta:{bad id{x}}"]) == 0
