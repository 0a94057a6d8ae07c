"""ListSessions: newest first, signed page tokens, expired sessions pruned from the index."""

from __future__ import annotations

from glide import GlideClient, UpdateOptions

from chatsession_client import InvalidArgumentError, SessionClient, user
from tests.helpers import raises, violated_fields


async def test_newest_active_first_across_pages(client: SessionClient, raw: GlideClient, uid: str) -> None:
    ids = [
        (await client.create_session(uid, session_id=f"{uid}-{i:02d}", title=f"T{i}")).session_id
        for i in range(25)
    ]
    # Activity reorders: the oldest session becomes the most recent.
    await client.append(ids[0], [user("bump")])
    page1 = await client.list_sessions(uid, page_size=10)
    assert page1.sessions[0].session_id == ids[0]
    assert page1.sessions[0].title == "T0"
    assert page1.next_page_token
    seen = [s.session_id async for s in client.iter_sessions(uid, page_size=10)]
    assert seen == [ids[0], *reversed(ids[1:])]
    assert len(set(seen)) == 25
    last_active = [s.last_active.ToNanoseconds() async for s in client.iter_sessions(uid, page_size=7)]
    assert last_active == sorted(last_active, reverse=True)


async def test_last_page_has_no_token_and_empty_user(client: SessionClient, uid: str) -> None:
    for i in range(3):
        await client.create_session(uid, session_id=f"{uid}-{i}")
    page = await client.list_sessions(uid, page_size=3)
    assert len(page.sessions) == 3
    assert page.next_page_token == ""
    empty = await client.list_sessions(f"{uid}-nobody")
    assert (list(empty.sessions), empty.next_page_token) == ([], "")


async def test_expired_and_deleted_sessions_are_not_listed_and_get_pruned(
    client: SessionClient, raw: GlideClient, uid: str, valkey_cluster: bool
) -> None:
    index = f"user_sessions:{{{uid}}}"
    keep = [(await client.create_session(uid, session_id=f"{uid}-k{i}")).session_id for i in range(3)]
    gone = [(await client.create_session(uid, session_id=f"{uid}-g{i}")).session_id for i in range(4)]
    for session_id in gone:  # as if their TTL ran out
        await raw.delete([f"meta:{{{session_id}}}", f"chat:{{{session_id}}}"])
    assert await raw.zcard(index) == 7
    page = await client.list_sessions(uid, page_size=2)
    listed = [s.session_id for s in page.sessions]
    assert len(listed) == 2
    rest = [s.session_id async for s in client.iter_sessions(uid, page_size=2)]
    assert sorted(rest) == sorted(keep)
    if valkey_cluster:
        # A cluster cannot tell an expired session from a create between its two steps, so
        # recent entries are only skipped; once older than the grace period they go.
        assert await raw.zcard(index) == 7
        for session_id in gone:
            score = await raw.zscore(index, session_id)
            assert score is not None
            await raw.zadd(index, {session_id: score - 3600}, update_condition=UpdateOptions.LESS_THAN)
        assert sorted([s.session_id async for s in client.iter_sessions(uid)]) == sorted(keep)
    assert await raw.zcard(index) == 3


async def test_index_entries_older_than_the_max_ttl_are_dropped(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    await raw.zadd(f"user_sessions:{{{uid}}}", {"ancient": 1000.0})
    live = await client.create_session(uid)
    sessions = [s.session_id async for s in client.iter_sessions(uid)]
    assert sessions == [live.session_id]
    assert await raw.zscore(f"user_sessions:{{{uid}}}", "ancient") is None


async def test_tampered_or_foreign_page_token_is_rejected(client: SessionClient, uid: str) -> None:
    for i in range(3):
        await client.create_session(uid, session_id=f"{uid}-{i}")
    token = (await client.list_sessions(uid, page_size=1)).next_page_token
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    err = await raises(InvalidArgumentError, client.list_sessions(uid, page_token=tampered))
    assert violated_fields(err) == {"page_token"}
    err = await raises(InvalidArgumentError, client.list_sessions(f"{uid}-other", page_token=token))
    assert violated_fields(err) == {"page_token"}
    err = await raises(InvalidArgumentError, client.list_sessions(uid, page_token="not a token!"))
    assert violated_fields(err) == {"page_token"}


async def test_page_size_rules(client: SessionClient, uid: str) -> None:
    err = await raises(InvalidArgumentError, client.list_sessions(uid, page_size=-1))
    assert violated_fields(err) == {"page_size"}
    err = await raises(InvalidArgumentError, client.list_sessions("bad user{x}"))
    assert violated_fields(err) == {"user_id"}


async def test_pages_are_cut_by_bytes_so_every_reply_fits_a_default_client(
    client: SessionClient, uid: str
) -> None:
    labels = {f"label-{i}": "v" * 1000 for i in range(64)}  # about 65 KB a session
    ids = {(await client.create_session(uid, labels=labels)).session_id for _ in range(60)}
    first = await client.list_sessions(uid, page_size=100)  # 60 x 65 KB would not fit 4 MiB
    assert 1 <= len(first.sessions) < 60
    assert first.next_page_token
    assert {s.session_id async for s in client.iter_sessions(uid, page_size=100)} == ids
