"""CreateSession, GetSession (and its read_mask), UpdateSession, DeleteSession: results and what
lands in Valkey; and the write rules the scripts hold atomically: the label count after an update,
the replica acknowledgement --valkey-wait-replicas asks for, --max-session-bytes."""

from __future__ import annotations

import time

import grpc
import pytest
from glide import GlideClient
from google.protobuf.field_mask_pb2 import FieldMask

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_client import (
    NO_RETRY,
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SessionClient,
    UnavailableError,
    user,
)
from chatsession_client.errors import from_rpc_error
from chatsession_server.app import start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import (
    command_counts,
    eventually,
    meta,
    raises,
    session_keys_exist,
    stored_messages,
    violated_fields,
)

# --- CreateSession --------------------------------------------------------------------------------


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
    assert await raw.exists([f"user_sessions:{{{uid}-a}}"]) == 1  # the same read sees an owner's index
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


async def test_create_validation_names_fields(client: SessionClient, raw: GlideClient, uid: str) -> None:
    err = await raises(
        InvalidArgumentError,
        client.create_session("", session_id="bad id{x}", ttl_seconds=-5, max_messages=-7, title="t" * 2000),
    )
    assert violated_fields(err) >= {"user_id", "session_id", "ttl_seconds", "max_messages", "title"}
    assert await raw.exists(["meta:{bad id{x}}"]) == 0
    good = await client.create_session(uid, session_id=f"{uid}-good")  # the same read sees a session
    assert await raw.exists([f"meta:{{{good.session_id}}}"]) == 1


# --- GetSession and its read_mask -----------------------------------------------------------------


async def test_get_returns_counters_and_missing_is_not_found(client: SessionClient, uid: str) -> None:
    s = await client.create_session(uid, session_id=f"{uid}-s")
    await client.append(s.session_id, [user("hello", tokens=5), user("again", tokens=7)])
    got = await client.get_session(s.session_id)
    assert (got.message_count, got.token_count, got.messages_stored) == (2, 12, 2)
    assert got.last_active.ToNanoseconds() >= got.created_at.ToNanoseconds()
    await raises(NotFoundError, client.get_session(f"{uid}-missing"))


async def test_read_mask_reads_only_the_named_fields(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, title="t", labels={"team": "a", "other": "b"})
    await client.append(s.session_id, [user("hi", tokens=9)])
    key = f"meta:{{{s.session_id}}}"
    before = await command_counts(raw, key=key)
    got = await client.get_session(s.session_id, read_mask=["token_count", "labels.team"])
    after = await command_counts(raw, key=key)
    assert got.token_count == 9
    assert dict(got.labels) == {"team": "a"}
    assert (got.title, got.session_id, got.message_count) == ("", "", 0)
    assert not got.HasField("created_at")
    ran = {name for name in after if after[name] != before.get(name, 0)}
    assert "hmget" in ran
    assert not ran & {"hgetall", "llen", "ttl", "hget"}, ran

    counted = await client.get_session(s.session_id, read_mask=["messages_stored", "expires_in_seconds"])
    assert counted.messages_stored == 1
    assert counted.expires_in_seconds > 0
    assert counted.user_id == ""
    whole = await client.get_session(s.session_id, read_mask=["*"])
    assert (whole.title, whole.message_count, dict(whole.labels)) == ("t", 1, {"team": "a", "other": "b"})
    labels = await client.get_session(s.session_id, read_mask=["labels", "created_at"])
    assert dict(labels.labels) == {"team": "a", "other": "b"}
    assert labels.HasField("created_at")

    for mask in (["nope"], ["labels."], ["title", "session.title"]):
        error = await raises(InvalidArgumentError, client.get_session(s.session_id, read_mask=mask))
        assert violated_fields(error) == {"read_mask"}
    await raises(NotFoundError, client.get_session(f"{uid}-missing", read_mask=["title"]))


# --- UpdateSession --------------------------------------------------------------------------------


async def update(
    client: SessionClient, session: session_pb2.Session, paths: list[str]
) -> session_pb2.Session:
    """UpdateSession with an explicit mask (labels.<key> paths), errors as the client's exceptions."""
    request = session_service_pb2.UpdateSessionRequest(session=session, update_mask=FieldMask(paths=paths))
    try:
        return (await client._stub.UpdateSession(request, timeout=10)).session
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


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


async def test_the_label_count_after_an_update_is_checked_before_anything_is_written(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, labels={f"k{i}": "v" for i in range(60)})
    before = await meta(raw, s.session_id)
    new = {f"n{i}": "v" for i in range(10)}
    # Ten more through labels.<key> paths, with a title change in the same request: refused whole.
    patch = session_pb2.Session(session_id=s.session_id, title="changed", labels=new)
    err = await raises(InvalidArgumentError, update(client, patch, ["title", *(f"labels.{k}" for k in new)]))
    assert violated_fields(err) == {"session.labels"}
    assert "70" in err.field_violations[0].description
    assert await meta(raw, s.session_id) == before
    # Removing some in the same request makes room.
    patch = session_pb2.Session(session_id=s.session_id, labels=new)
    paths = [*(f"labels.k{i}" for i in range(6)), *(f"labels.{k}" for k in new)]
    assert len((await update(client, patch, paths)).labels) == 64
    patch = session_pb2.Session(session_id=s.session_id, labels={"x": "1"})
    await raises(InvalidArgumentError, update(client, patch, ["labels.x"]))


# --- DeleteSession and expiry ---------------------------------------------------------------------


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
    assert await session_keys_exist(raw, s.session_id) == 1  # its meta hash, until it expires

    async def expired() -> bool:
        return await session_keys_exist(raw, s.session_id) == 0

    await eventually(expired, 5)
    await raises(NotFoundError, client.get_session(s.session_id))
    await raises(NotFoundError, client.append(s.session_id, [user("late")]))
    assert await session_keys_exist(raw, s.session_id) == 0


# --- write rules: replica acknowledgement, the session's byte cap ---------------------------------


async def test_without_the_replicas_asked_for_a_write_is_unavailable_never_ok(
    settings: Settings, valkey_url: str, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    # The suite's Valkey has no replicas: WAIT 1 can never be satisfied.
    waiting = Settings(
        listen="127.0.0.1:0",
        valkey_cluster=settings.valkey_cluster,
        valkey_wait_replicas=1,
        valkey_wait_timeout_ms=100,
    )
    s = await client.create_session(uid)
    server = await start_server(waiting, ValkeyAddress.parse(valkey_url))
    try:
        async with SessionClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as c:
            err = await raises(UnavailableError, c.create_session(uid, request_id="c1"))
            assert "replicas" in err.message
            # The primary has the append; a retry with the same request_id finds it, and still
            # cannot say it is replicated.
            for _ in range(2):
                err = await raises(
                    UnavailableError, c.append(s.session_id, [user("kept once")], request_id="a1")
                )
                assert "replicas" in err.message
            assert [m["content"] for m in await stored_messages(raw, s.session_id)] == ["kept once"]
    finally:
        await server.stop(0.5)


@pytest.mark.parametrize("replicas", [-1])
def test_wait_replicas_must_not_be_negative(replicas: int) -> None:
    with pytest.raises(ValueError, match="valkey_wait_replicas"):
        Settings(valkey_wait_replicas=replicas)


async def stored_bytes(raw: GlideClient, session_id: str) -> tuple[int, int]:
    """The session's stored_bytes count, and what its LIST really holds."""
    items = await raw.lrange(f"chat:{{{session_id}}}", 0, -1)
    return int((await meta(raw, session_id))["stored_bytes"]), sum(len(i) for i in items)


async def test_a_session_stores_at_most_max_session_bytes(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    capped = Settings(listen="127.0.0.1:0", valkey_cluster=settings.valkey_cluster, max_session_bytes=4000)
    server = await start_server(capped, ValkeyAddress.parse(valkey_url))
    try:
        async with SessionClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as c:
            keeps_all = await c.create_session(uid)
            for i in range(3):
                await c.append(keeps_all.session_id, [user("x" * 1000)], request_id=f"r{i}")
            counted, real = await stored_bytes(raw, keeps_all.session_id)
            assert counted == real
            err = await raises(ResourceExhaustedError, c.append(keeps_all.session_id, [user("y" * 1000)]))
            assert "max-session-bytes" in err.message
            assert await stored_bytes(raw, keeps_all.session_id) == (counted, real)  # nothing written
            # A window keeps a session under the cap: trims give their bytes back.
            windowed = await c.create_session(uid, max_messages=2)
            for _ in range(20):
                await c.append(windowed.session_id, [user("z" * 1000)])
                counted, real = await stored_bytes(raw, windowed.session_id)
                assert counted == real
            await c.update_session(windowed.session_id, max_messages=1)
            counted, real = await stored_bytes(raw, windowed.session_id)
            assert counted == real < 1100
    finally:
        await server.stop(0.5)
