"""Write rules the scripts hold atomically: the label count after an update, and the replica
acknowledgement --valkey-wait-replicas asks for."""

from __future__ import annotations

import grpc
import pytest
from glide import GlideClient
from google.protobuf.field_mask_pb2 import FieldMask

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_client import (
    NO_RETRY,
    InvalidArgumentError,
    ResourceExhaustedError,
    SessionClient,
    UnavailableError,
    user,
)
from chatsession_client.errors import from_rpc_error
from chatsession_server.app import start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import meta, raises, stored_messages, violated_fields


async def update(
    client: SessionClient, session: session_pb2.Session, paths: list[str]
) -> session_pb2.Session:
    """UpdateSession with an explicit mask (labels.<key> paths), errors as the client's exceptions."""
    request = session_service_pb2.UpdateSessionRequest(session=session, update_mask=FieldMask(paths=paths))
    try:
        return (await client._stub.UpdateSession(request, timeout=10)).session
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


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
