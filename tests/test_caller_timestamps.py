"""A message's own created_at: kept to the microsecond through every read and replay, bounded
against the server's clock, and followed by the session's last_active and its owner's index
(which orders, and never prunes, a live session whatever its last_active)."""

from __future__ import annotations

import datetime
import time

import pytest
from glide import GlideClient
from google.protobuf.timestamp_pb2 import Timestamp

from chatsession_client import InvalidArgumentError, SessionClient, user
from tests.helpers import meta, raises, stored_messages, violated_fields

UTC = datetime.UTC


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


async def index_score(raw: GlideClient, user_id: str, session_id: str) -> float | None:
    return await raw.zscore(f"user_sessions:{{{user_id}}}", session_id)


async def test_a_message_keeps_its_own_time_and_the_session_follows_it(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid)).session_id
    then = datetime.datetime(2021, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    imported = [user("old", created_at=then), user("older still", created_at=then.timestamp() - 60)]
    appended = await client.append(sid, imported, request_id="import-1")
    assert [m.created_at.ToDatetime(UTC) for m in appended.messages] == [
        then,
        then - datetime.timedelta(seconds=60),
    ]
    # The newest of the append's times, though the session was created just now.
    assert appended.session.last_active.ToDatetime(UTC) == then
    replay = await client.append(sid, imported, request_id="import-1")
    assert replay.replayed
    assert list(replay.messages) == list(appended.messages)
    listed = (await client.list_messages(sid)).messages
    assert [m.created_at for m in listed] == [m.created_at for m in appended.messages]
    stored = await stored_messages(raw, sid)
    assert [m["created_at"] for m in stored] == [then.timestamp(), then.timestamp() - 60]
    assert float((await meta(raw, sid))["last_active"]) == pytest.approx(then.timestamp(), abs=1e-6)
    assert await index_score(raw, uid, sid) == pytest.approx(then.timestamp(), abs=1e-6)

    # A later append without times of its own: the server's clock, forward again.
    before = time.time()
    latest = (await client.append(sid, [user("now")])).session.last_active
    assert seconds(latest) >= before - 1
    assert await index_score(raw, uid, sid) == pytest.approx(seconds(latest), abs=1e-6)


async def test_a_mix_of_own_and_server_times_ends_at_the_newest(client: SessionClient, uid: str) -> None:
    sid = (await client.create_session(uid)).session_id
    before = time.time()
    reply = await client.append(sid, [user("old", created_at=86_400.0), user("server's time")])
    assert seconds(reply.messages[0].created_at) == 86_400.0
    assert seconds(reply.messages[1].created_at) >= before - 1
    assert reply.session.last_active == reply.messages[1].created_at


async def test_a_session_whose_last_activity_is_long_past_is_listed_in_its_place_and_never_pruned(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    recent = (await client.create_session(uid, title="recent")).session_id
    imported = (await client.create_session(uid, title="imported")).session_id
    await client.append(imported, [user("from 1971", created_at=365 * 86_400.0)])
    newer = (await client.create_session(uid, title="newer")).session_id
    for _ in range(2):  # a listing prunes what it finds dead: twice, to see nothing went
        listed = [s.session_id async for s in client.iter_sessions(uid, page_size=1)]
        assert listed == [newer, recent, imported]  # newest last_active first
    assert await index_score(raw, uid, imported) == 365 * 86_400.0
    got = await client.get_session(imported)
    assert seconds(got.last_active) == 365 * 86_400.0
    assert got.expires_in_seconds > 3000  # the expiry runs from the append, not from 1971


@pytest.mark.parametrize(
    ("created_at", "why"),
    [
        (Timestamp(seconds=int(time.time()) + 3600), "ahead of the server's clock"),
        (Timestamp(seconds=-1), "before 1970"),
        (Timestamp(seconds=100, nanos=1_000_000_000), "nanos"),
        (Timestamp(seconds=100, nanos=-1), "nanos"),
        (Timestamp(seconds=253402300800), "ahead of the server's clock"),
    ],
)
async def test_a_time_out_of_bounds_is_refused_naming_it_and_nothing_is_written(
    client: SessionClient, raw: GlideClient, uid: str, created_at: Timestamp, why: str
) -> None:
    sid = (await client.create_session(uid)).session_id
    before = await meta(raw, sid)
    bad = user("x")
    bad.created_at.CopyFrom(created_at)
    error = await raises(InvalidArgumentError, client.append(sid, [user("fine"), bad]))
    assert violated_fields(error) == {"messages[1].created_at"}
    assert why in error.field_violations[0].description
    assert await meta(raw, sid) == before
    assert await stored_messages(raw, sid) == []


async def test_a_time_within_the_allowed_skew_is_kept(client: SessionClient, uid: str) -> None:
    sid = (await client.create_session(uid)).session_id
    ahead = time.time() + 200  # within the default 300 s
    reply = await client.append(sid, [user("from a fast clock", created_at=ahead)])
    assert seconds(reply.messages[0].created_at) == pytest.approx(ahead, abs=1e-6)
    assert reply.session.last_active == reply.messages[0].created_at


def test_the_client_takes_an_aware_datetime_or_unix_seconds() -> None:
    at = datetime.datetime(2020, 1, 2, 3, 4, 5, 999_999, tzinfo=UTC)
    assert user("x", created_at=at).created_at.ToDatetime(UTC) == at
    from_seconds = user("x", created_at=at.timestamp()).created_at
    assert (from_seconds.seconds, from_seconds.nanos) == (int(at.timestamp()), 999_999_000)
    rounded_up = user("x", created_at=9.9999999).created_at
    assert (rounded_up.seconds, rounded_up.nanos) == (10, 0)
    with pytest.raises(ValueError, match="naive"):
        user("x", created_at=datetime.datetime(2020, 1, 1))
    assert not user("x").HasField("created_at")
