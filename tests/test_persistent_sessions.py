"""Sessions that never expire (ttl_seconds = -1) and keep every message (max_messages = -1), for
an application that owns retention: no key of the session has a TTL through any write, the
index never drops it, and a TTL can be given back (or taken away) by UpdateSession."""

from __future__ import annotations

from glide import GlideClient

from chatsession_client import InvalidArgumentError, SessionClient, assistant, system, user
from tests.helpers import raises, violated_fields


def session_keys(session_id: str) -> list[str]:
    return [f"{prefix}:{{{session_id}}}" for prefix in ("chat", "meta", "reqs", "summary")]


async def ttls(raw: GlideClient, session_id: str) -> dict[str, int]:
    """TTL of each of the session's keys that exists (-1: none)."""
    out = {}
    for key in session_keys(session_id):
        ttl = await raw.ttl(key)
        if ttl != -2:
            out[key.split(":")[0]] = ttl
    return out


async def test_a_session_that_never_expires_keeps_no_ttl_through_every_write(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, ttl_seconds=-1, max_messages=-1)
    assert (s.ttl_seconds, s.expires_in_seconds, s.max_messages) == (-1, -1, -1)
    assert await ttls(raw, s.session_id) == {"meta": -1}
    sid = s.session_id
    await client.append(
        sid, [system("prompt"), *(user(f"m{i}", tokens=1) for i in range(50))], request_id="r1"
    )
    await client.compact_messages(sid, 20, assistant("summary", tokens=2))
    await client.append(sid, [user("after")], request_id="r2")
    assert await ttls(raw, sid) == {"chat": -1, "meta": -1, "reqs": -1, "summary": -1}
    got = await client.get_session(sid)
    assert (got.ttl_seconds, got.expires_in_seconds, got.messages_stored) == (-1, -1, 1 + 31 + 1)
    masked = await client.get_session(sid, read_mask=["expires_in_seconds", "ttl_seconds"])
    assert (masked.expires_in_seconds, masked.ttl_seconds) == (-1, -1)
    await client.clear_messages(sid, keep_system_prompt=True)
    assert set((await ttls(raw, sid)).values()) == {-1}

    fork = (await client.fork_session(sid)).session
    assert (fork.ttl_seconds, fork.expires_in_seconds) == (-1, -1)
    assert set((await ttls(raw, fork.session_id)).values()) == {-1}

    # The index never drops it: listed (twice: a listing prunes what it finds dead).
    for _ in range(2):
        listed = {x.session_id: x for x in (await client.list_sessions(uid)).sessions}
        assert listed[sid].expires_in_seconds == -1
        assert fork.session_id in listed
    assert await raw.zscore(f"user_sessions:{{{uid}}}", sid) is not None
    usage = await client.get_user_usage(uid)
    assert (usage.total.messages, usage.total.sessions) == (52, 2)


async def test_update_gives_a_session_a_ttl_and_takes_it_away(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid)).session_id
    await client.append(sid, [user("hi")], request_id="r1")
    await client.compact_messages(sid, 1, assistant("sum"))
    assert all(0 < t <= 3600 for t in (await ttls(raw, sid)).values())
    forever = await client.update_session(sid, ttl_seconds=-1)
    assert (forever.ttl_seconds, forever.expires_in_seconds) == (-1, -1)
    assert set((await ttls(raw, sid)).values()) == {-1}
    back = await client.update_session(sid, ttl_seconds=600)
    assert 590 <= back.expires_in_seconds <= 600
    assert all(590 <= t <= 600 for t in (await ttls(raw, sid)).values())


async def test_a_ttl_below_minus_one_is_refused_naming_it(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    error = await raises(
        InvalidArgumentError, client.create_session(uid, session_id=f"{uid}-x", ttl_seconds=-2)
    )
    assert violated_fields(error) == {"ttl_seconds"}
    assert "-1 (never expires)" in error.field_violations[0].description
    assert await raw.exists([f"meta:{{{uid}-x}}"]) == 0
    sid = (await client.create_session(uid)).session_id
    error = await raises(InvalidArgumentError, client.update_session(sid, ttl_seconds=-5))
    assert violated_fields(error) == {"session.ttl_seconds"}
    assert 0 < await raw.ttl(f"meta:{{{sid}}}") <= 3600


async def test_a_session_that_never_expires_and_was_last_active_long_ago_stays_listed(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    sid = (await client.create_session(uid, ttl_seconds=-1)).session_id
    await client.append(sid, [user("from 1971", created_at=365 * 86_400.0)])
    for _ in range(2):
        assert [s.session_id for s in (await client.list_sessions(uid)).sessions] == [sid]
    assert await raw.zscore(f"user_sessions:{{{uid}}}", sid) == 365 * 86_400.0
    assert await raw.ttl(f"meta:{{{sid}}}") == -1
