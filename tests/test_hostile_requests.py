"""Hostile requests: bytes that do not parse, errors too big for trailers, oversized masks (refused
before their paths are copied) and messages. Each gets a clear status, writes nothing and logs no
traceback. (Forged page tokens: test_listing.py; every field's rules: test_validation.py; random
requests: test_fuzz.py.)"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import AsyncIterator

import grpc
import pytest
from glide import GlideClient
from google.protobuf import field_mask_pb2
from google.protobuf.field_mask_pb2 import FieldMask

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import InvalidArgumentError, SessionClient, assistant, user
from chatsession_server.api import validation
from chatsession_server.api.limits import Limits
from chatsession_server.app import RunningServer, start_server
from chatsession_server.errors import InvalidArgument
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import meta, raises, stored_messages, violated_fields

SERVICE = "/chatsession.v1.SessionService/"
KIB = 1024
MIB = 1024 * KIB


# -- 1. requests that do not parse ---------------------------------------------------------------

UNDECODABLE = {
    # field 1 (session_id) holding bytes that are not UTF-8
    "bad utf-8": b"\x0a\x02\xff\xfe",
    # field 1 claims 100 bytes, 1 follows
    "truncated": b"\x0a\x64x",
    # a wire type that does not exist
    "bad wire type": b"\x0f\x00",
    # unknown groups nested past the parser's depth limit
    "deep nesting": b"\x0b" * 1000,
}


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_undecodable_request_is_invalid_argument_without_traceback(
    target: str, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(target) as channel:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SERVICE + "CreateSession")
        with pytest.raises(grpc.aio.AioRpcError) as unary_error:
            await unary(payload, timeout=5)
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            SERVICE + "WatchMessages"
        )
        with pytest.raises(grpc.aio.AioRpcError) as stream_error:
            async for _ in stream(payload, timeout=5):
                pass
    for error, message_type in (
        (unary_error, "CreateSessionRequest"),
        (stream_error, "WatchMessagesRequest"),
    ):
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
        assert message_type in (error.value.details() or "")
        assert len(error.value.details() or "") < 200
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
    about_calls = [r for r in caplog.records if "SessionService" in r.getMessage()]
    assert len(about_calls) <= 2, [r.getMessage() for r in about_calls]
    assert all(r.levelno <= logging.INFO for r in about_calls)


# -- 2. error details bounded to fit a client's trailers ------------------------------------------


async def test_hundreds_of_bad_fields_fit_in_the_trailers(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid)
    bad = [user("", tokens=-1) for _ in range(300)]
    err = await raises(InvalidArgumentError, client.append(s.session_id, bad))
    assert len(err.field_violations) == 21
    assert err.field_violations[0].field == "messages[0].content"
    assert "more" in err.field_violations[-1].description
    # 300 messages x 2 violations: validation keeps 100 and stops soon after; 20 are shown.
    assert "at least 8" in err.field_violations[-1].description
    assert await stored_messages(raw, s.session_id) == []
    await client.append(s.session_id, [user("ok")])  # the same read sees an accepted append
    assert [m["content"] for m in await stored_messages(raw, s.session_id)] == ["ok"]


async def test_huge_field_names_are_clipped(client: SessionClient, uid: str) -> None:
    # Label keys are echoed in the field names; 64 KiB keys (of 4-byte characters, which the
    # status message percent-encodes to 12 bytes each) must not blow the trailers.
    labels = {f"{i}" + "𝄞" * 16 * KIB: "v" for i in range(30)}
    err = await raises(InvalidArgumentError, client.create_session(uid, labels=labels))
    assert 1 < len(err.field_violations) < 20
    for v in err.field_violations[:-1]:
        assert v.field.startswith("labels[")
        assert len(v.field.encode()) <= 256
    assert "more violations" in err.field_violations[-1].description
    assert len(str(err).encode()) < 4 * KIB


# -- 3. UpdateSession masks -------------------------------------------------------------------------


async def _update(client: SessionClient, session: session_pb2.Session, paths: list[str]) -> None:
    request = session_service_pb2.UpdateSessionRequest(session=session, update_mask=FieldMask(paths=paths))
    await client._stub.UpdateSession(request, timeout=10)


async def test_label_paths_are_bounded_per_request(client: SessionClient, raw: GlideClient, uid: str) -> None:
    s = await client.create_session(uid, title="before", labels={"keep": "1"})
    before = await meta(raw, s.session_id)
    labels = {f"k{i}": "v" for i in range(300)}
    patch = session_pb2.Session(session_id=s.session_id, title="after", labels=labels)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _update(client, patch, [f"labels.{k}" for k in labels])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _update(client, patch, ["title", *(f"labels.k{i}" for i in range(10_000))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in (info.value.details() or "")
    assert await meta(raw, s.session_id) == before


async def test_mask_paths_must_be_distinct_and_label_keys_valid(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, title="before")
    before = await meta(raw, s.session_id)
    patch = session_pb2.Session(session_id=s.session_id, title="after", labels={"a": "1"})
    for paths in (["title", "title"], ["labels.a", "labels.a"], ["labels." + "k" * 129]):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _update(client, patch, paths)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, paths
        assert "update_mask" in (info.value.details() or "")
    assert await meta(raw, s.session_id) == before
    await _update(client, patch, ["title", *(f"labels.k{i}" for i in range(63)), "labels.a"])
    updated = await client.get_session(s.session_id)
    assert updated.title == "after"
    assert dict(updated.labels) == {"a": "1"}


def test_an_oversized_update_mask_is_refused_before_its_paths_are_copied() -> None:
    request = pb.UpdateSessionRequest(
        session=session_pb2.Session(session_id="s"),
        update_mask=field_mask_pb2.FieldMask(paths=["ab"] * 1_000_000),
    )
    parsed = pb.UpdateSessionRequest.FromString(request.SerializeToString())  # as gRPC hands it over
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument):
            validation.update_session(parsed, Limits.from_settings(Settings()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024, f"refusing the mask took {peak // (1024 * 1024)} MiB"


# -- 4. size limits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def default_server(valkey_url: str, valkey_cluster: bool) -> AsyncIterator[RunningServer]:
    """A server with the default limits (the shared one runs with a 1 KiB content limit)."""
    running = await start_server(
        Settings(listen="127.0.0.1:0", valkey_cluster=valkey_cluster), ValkeyAddress.parse(valkey_url)
    )
    yield running
    await running.stop(1.0)


@pytest.fixture
async def default_client(default_server: RunningServer) -> AsyncIterator[SessionClient]:
    async with SessionClient(f"127.0.0.1:{default_server.port}") as c:
        yield c


async def _unchanged_after(
    raw: GlideClient, session_id: str, before: tuple[dict[str, str], int, dict[bytes, bytes]]
) -> None:
    assert (
        await meta(raw, session_id),
        await raw.llen(f"chat:{{{session_id}}}"),
        await raw.hgetall(f"reqs:{{{session_id}}}"),
    ) == before


async def test_message_over_the_byte_limit_is_rejected(
    default_client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await default_client.create_session(uid)
    await default_client.append(s.session_id, [user("hi")])
    before = (await meta(raw, s.session_id), 1, await raw.hgetall(f"reqs:{{{s.session_id}}}"))
    args = "a" * 256 * KIB
    calls = [(f"c{i}", "f", args) for i in range(5)]  # 1.25 MiB in one message, each part in limits
    err = await raises(
        InvalidArgumentError, default_client.append(s.session_id, [assistant("", tool_calls=calls)])
    )
    assert violated_fields(err) == {"messages[0]"}
    await _unchanged_after(raw, s.session_id, before)


async def test_append_over_the_byte_limit_is_rejected(
    default_client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await default_client.create_session(uid)
    before: tuple[dict[str, str], int, dict[bytes, bytes]] = (await meta(raw, s.session_id), 0, {})
    big = [user("x" * 256 * KIB) for _ in range(13)]  # 3.25 MiB: under the 4 MiB request limit
    err = await raises(InvalidArgumentError, default_client.append(s.session_id, big))
    assert violated_fields(err) == {"messages"}
    await _unchanged_after(raw, s.session_id, before)


async def test_append_at_the_limit_fits_the_reply_in_a_default_client(
    default_client: SessionClient, raw: GlideClient, uid: str
) -> None:
    # The largest session the limits allow, so the echoed session is as big as it gets.
    labels = {f"{i:02d}" + "k" * 126: "€" * 1024 for i in range(64)}  # keys are ASCII
    s = await default_client.create_session(uid, title="€" * 1024, model="m" * 256, labels=labels)
    chunk = "ø" * (128 * KIB)  # 256 KiB of UTF-8
    messages = [user(chunk) for _ in range(11)]
    used = sum(m.ByteSize() for m in messages)
    last = user("")
    last.content = "x" * (3 * MIB - used - 6)  # tag, 3-byte length, role tag and value: 6 bytes
    messages.append(last)
    assert sum(m.ByteSize() for m in messages) == 3 * MIB
    reply = await default_client.append(s.session_id, messages)
    assert len(reply.messages) == 12
    assert reply.ByteSize() < 4 * MIB
    assert await raw.llen(f"chat:{{{s.session_id}}}") == 12
    one_more = user("y")
    err = await raises(InvalidArgumentError, default_client.append(s.session_id, [*messages, one_more]))
    assert violated_fields(err) == {"messages"}


async def test_request_over_the_transport_limit_never_reaches_the_servicer(
    default_client: SessionClient, raw: GlideClient, uid: str
) -> None:
    assert Settings().max_request_bytes == 4 * MIB
    s = await default_client.create_session(uid)
    big = [user("x" * 256 * KIB) for _ in range(17)]  # 4.25 MiB
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await default_client._stub.AppendMessages(
            session_service_pb2.AppendMessagesRequest(session_id=s.session_id, messages=big), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await raw.llen(f"chat:{{{s.session_id}}}") == 0
    await default_client.append(s.session_id, big[:1])  # the same read sees an accepted append
    assert await raw.llen(f"chat:{{{s.session_id}}}") == 1


async def test_pages_are_cut_by_bytes_so_every_reply_fits_a_default_client(
    default_client: SessionClient, uid: str
) -> None:
    s = await default_client.create_session(uid)
    for _ in range(2):  # 5 MB of messages: no page may hold them all
        await default_client.append(s.session_id, [user("x" * 250 * KIB) for _ in range(10)])
    newest = await default_client.list_messages(s.session_id, page_size=100)
    assert 1 <= len(newest.messages) < 20
    assert newest.has_more
    assert newest.messages[-1].seq == 20  # a backward page keeps the newest
    seen = [m.seq for m in newest.messages]
    while seen[0] > 1:  # page backward with before_seq until the oldest
        older = await default_client.list_messages(s.session_id, page_size=100, before_seq=seen[0])
        seen = [m.seq for m in older.messages] + seen
    assert seen == list(range(1, 21))
    forward = await default_client.list_messages(s.session_id, page_size=100, after_seq=0)
    assert forward.messages[0].seq == 1  # a forward page keeps the oldest
    assert forward.has_more
    # A watch of the whole backlog gets every message, page by page.
    delivered = []
    async for event in default_client.watch(s.session_id, after_seq=0):
        if event.HasField("message"):
            delivered.append(event.message.seq)
            if event.message.seq == 20:
                break
    assert delivered == list(range(1, 21))
