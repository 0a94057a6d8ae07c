"""ListSessions: newest first across pages, signed page tokens, expired and deleted sessions pruned
from the index (and live ones kept however old their score), pages cut by bytes, and the session
quota that counts through those pages."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from glide import GlideClient, UpdateOptions

from chatsession_client import NO_RETRY, InvalidArgumentError, SessionClient, UnavailableError, user
from chatsession_client.errors import ResourceExhaustedError
from chatsession_server.api.page_token import PageTokens
from chatsession_server.app import RunningServer, start_server
from chatsession_server.domain import Listed, SessionCursor
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.errors import InvalidArgument, StoreUnavailable
from chatsession_server.settings import Settings, ValkeyAddress
from chatsession_server.store import keys
from chatsession_server.store.keys import KeySpace
from chatsession_server.store.lua import session_scripts
from tests.helpers import raises, serving, violated_fields

# --- order and paging -----------------------------------------------------------------------------


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


@pytest.mark.cluster_only
async def test_paging_lists_every_live_session_when_a_score_is_repaired_mid_page(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    """Paging goes on from the last row read, not from an offset: a score repaired between two
    reads of one page takes its row out of the range, and an offset would then skip the next row.

    Needs a row whose index step failed (B: its score lags its last_active) followed by a dead
    entry that is too young to prune (a create cut off after its index step), so the page takes
    a second read. A concurrent append (ZADD GT) between the two reads does the same, in both
    modes."""
    store = server.store
    skipped = await client.create_session(uid, session_id=f"{uid}-s")
    original_run = store._scripts.call

    async def cut_off(which: Any, keys_: Any, args: Any) -> Any:
        if which is session_scripts.CREATE:
            raise StoreUnavailable("injected: the connection to the node was lost")
        return await original_run(which, keys_, args)

    monkeypatch.setattr(store._scripts, "call", cut_off)  # a create cut off after its index step
    await raises(UnavailableError, client.create_session(uid, session_id=f"{uid}-dead"))
    monkeypatch.undo()
    lagging = await client.create_session(uid, session_id=f"{uid}-b")
    await client.create_session(uid, session_id=f"{uid}-a")
    await client.create_session(uid, session_id=f"{uid}-a2")

    first = await client.list_sessions(uid, page_size=2)
    seen = [s.session_id for s in first.sessions]

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    monkeypatch.setattr(store._owner_index, "touch", broken)
    await client.append(lagging.session_id, [user("index step fails: the score lags")])
    monkeypatch.undo()
    token = first.next_page_token
    while token:
        page = await client.list_sessions(uid, page_size=2, page_token=token)
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
    assert skipped.session_id in seen, seen


@pytest.mark.cluster_only
async def test_a_lagging_row_past_the_page_end_is_listed_on_a_later_page(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, uid: str
) -> None:
    """Only the scores of the sessions a page returns are repaired: a lagging row past the page's
    end, raised over the cursor, would be skipped by the next page."""
    lagging = await client.create_session(uid, session_id=f"{uid}-1")
    await client.create_session(uid, session_id=f"{uid}-2")
    await client.create_session(uid, session_id=f"{uid}-3")

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    # An append whose index step fails: acknowledged, its session's score lags (README).
    monkeypatch.setattr(server.store._owner_index, "touch", broken)
    await client.append(lagging.session_id, [user("stored; the index step failed")])
    monkeypatch.undo()
    # No other activity: paging two by two must list all three.
    listed = [s.session_id async for s in client.iter_sessions(uid, page_size=2)]
    assert sorted(listed) == [f"{uid}-1", f"{uid}-2", f"{uid}-3"], listed


# --- pruning: dead entries go, live sessions stay listed however old their score ------------------


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
    assert await raw.zscore(f"user_sessions:{{{uid}}}", "ancient") == 1000.0
    live = await client.create_session(uid)
    sessions = [s.session_id async for s in client.iter_sessions(uid)]
    assert sessions == [live.session_id]
    assert await raw.zscore(f"user_sessions:{{{uid}}}", "ancient") is None


# A live session stays listed even when its index score is older than --max-ttl-seconds: a
# listing never drops entries in bulk by score, only a read of the session decides. The score lags
# the session's real life in two ways: UpdateSession(ttl_seconds) extends the life without
# touching last_active (both modes), and in a cluster an append whose index step failed leaves the
# old score. These tests let wall time pass on purpose (about 3.5 s each, with a 3 s
# --max-ttl-seconds): the session must outlive its score in Valkey's own expiry clock, which no
# test can move; a sleep here waits for no state, it ages the session.
MAX_TTL = 3


@pytest.fixture
async def short_lived(
    settings: Settings, valkey_url: str
) -> AsyncIterator[tuple[RunningServer, SessionClient]]:
    short = dataclasses.replace(settings, max_ttl_seconds=MAX_TTL, default_ttl_seconds=MAX_TTL)
    running = await start_server(short, ValkeyAddress.parse(valkey_url))
    async with SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as c:
        yield running, c
    await running.stop(1.0)


async def listed(client: SessionClient, user_id: str) -> list[str]:
    return [s.session_id async for s in client.iter_sessions(user_id)]


async def test_a_session_kept_alive_by_update_stays_listed(
    short_lived: tuple[RunningServer, SessionClient], uid: str
) -> None:
    _, client = short_lived
    s = await client.create_session(uid, session_id=f"{uid}-a", ttl_seconds=MAX_TTL)
    await asyncio.sleep(2.0)  # ages the session (see MAX_TTL): 1 s left of its TTL
    await client.update_session(s.session_id, ttl_seconds=MAX_TTL)  # lives until ~T0+5
    await asyncio.sleep(
        1.5
    )  # ages its score past MAX_TTL: T0+3.5: idle 3.5 s since creation, live for another 1.5 s
    assert (await client.get_session(s.session_id)).session_id == s.session_id  # live
    assert await listed(client, uid) == [s.session_id]


@pytest.mark.cluster_only
async def test_a_session_whose_append_index_step_failed_stays_listed(
    monkeypatch: pytest.MonkeyPatch, short_lived: tuple[RunningServer, SessionClient], uid: str
) -> None:
    running, client = short_lived
    s = await client.create_session(uid, session_id=f"{uid}-b", ttl_seconds=MAX_TTL)
    await asyncio.sleep(2.0)  # ages the session (see MAX_TTL): 1 s left of its TTL

    async def broken(*args: Any) -> None:
        raise StoreUnavailable("injected: the index node is unreachable")

    monkeypatch.setattr(running.store._owner_index, "touch", broken)
    await client.append(s.session_id, [user("keeps the session alive until ~T0+5")])
    monkeypatch.undo()
    await asyncio.sleep(1.5)  # ages its score past MAX_TTL: T0+3.5, live until ~T0+5
    assert (await client.get_session(s.session_id)).message_count == 1  # live
    assert await listed(client, uid) == [s.session_id]


# --- page tokens and page sizes -------------------------------------------------------------------


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


def _signed(payload: bytes, key: bytes) -> str:
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")


FORGED_PAYLOADS = {
    "nan": b'{"v":1,"u":"alice","s":NaN,"i":"x"}',
    "infinity": b'{"v":1,"u":"alice","s":-Infinity,"i":"x"}',
    "float overflow": b'{"v":1,"u":"alice","s":1e400,"i":"x"}',
    "400 digits": b'{"v":1,"u":"alice","s":' + b"9" * 400 + b',"i":"x"}',
    "string score": b'{"v":1,"u":"alice","s":"12","i":"x"}',
    "bool score": b'{"v":1,"u":"alice","s":true,"i":"x"}',
    "id not a string": b'{"v":1,"u":"alice","s":1,"i":7}',
    "bad id": b'{"v":1,"u":"alice","s":1,"i":"a b{c}"}',
    "user not a string": b'{"v":1,"u":null,"s":1,"i":"x"}',
    "app not a string": b'{"v":1,"u":"alice","a":7,"s":1,"i":"x"}',
    "a list": b"[1,2,3]",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "not utf-8": b'{"v":1,"u":"\xff","s":1,"i":"x"}',
    "missing score": b'{"v":1,"u":"alice","i":"x"}',
}


@pytest.mark.parametrize("payload", FORGED_PAYLOADS.values(), ids=FORGED_PAYLOADS.keys())
def test_signed_but_malformed_tokens_are_invalid_argument(payload: bytes) -> None:
    tokens = PageTokens(b"k")
    with pytest.raises(InvalidArgument) as info:
        tokens.decode(_signed(payload, b"k"), Listed("alice"))
    assert [v.field for v in info.value.violations] == ["page_token"]


def test_token_round_trip_and_length_bound() -> None:
    tokens = PageTokens(b"k")
    cursor = SessionCursor(1_700_000_000.123456, "s-1")
    assert tokens.decode(tokens.encode(Listed("alice"), cursor), Listed("alice")) == cursor
    with pytest.raises(InvalidArgument):
        tokens.decode("A" * 100_000, Listed("alice"))


async def test_token_forged_with_the_old_default_key_is_rejected(client: SessionClient, uid: str) -> None:
    for payload in (
        b'{"v":1,"u":"%s","s":NaN,"i":"x"}' % uid.encode(),
        b'{"v":1,"u":"%s","s":' % uid.encode() + b"9" * 400 + b',"i":"x"}',
        b'{"v":1,"u":"%s","s":1.5,"i":"x"}' % uid.encode(),
    ):
        token = _signed(payload, b"chatsession-page-tokens")
        err = await raises(InvalidArgumentError, client.list_sessions(uid, page_token=token))
        assert violated_fields(err) == {"page_token"}


@pytest.fixture(scope="module")
async def second_server(valkey_url: str, valkey_cluster: bool) -> AsyncIterator[RunningServer]:
    """Another replica on the same Valkey, configured with no page-token key either."""
    running = await start_server(
        Settings(listen="127.0.0.1:0", valkey_cluster=valkey_cluster), ValkeyAddress.parse(valkey_url)
    )
    yield running
    await running.stop(1.0)


async def test_replicas_share_a_generated_key_and_other_deployments_do_not(
    client: SessionClient, raw: GlideClient, second_server: RunningServer, uid: str
) -> None:
    assert Settings().page_token_key == ""
    for i in range(3):
        await client.create_session(uid, session_id=f"{uid}-{i}")
    token = (await client.list_sessions(uid, page_size=1)).next_page_token
    assert token
    secret = await raw.get(KeySpace().page_token_secret())
    assert secret is not None
    assert len(secret) == 64
    async with SessionClient(f"127.0.0.1:{second_server.port}") as replica:
        page = await replica.list_sessions(uid, page_size=1, page_token=token)
        assert [s.session_id for s in page.sessions] == [f"{uid}-1"]
        assert await raw.get(KeySpace().page_token_secret()) == secret
    with EmbeddedValkey() as elsewhere:
        other = await start_server(Settings(listen="127.0.0.1:0"), ValkeyAddress.parse(elsewhere.url))
        try:
            async with SessionClient(f"127.0.0.1:{other.port}") as stranger:
                err = await raises(InvalidArgumentError, stranger.list_sessions(uid, page_token=token))
                assert violated_fields(err) == {"page_token"}
        finally:
            await other.stop(1.0)


async def test_configured_key_still_signs(valkey_url: str, valkey_cluster: bool, uid: str) -> None:
    settings = Settings(listen="127.0.0.1:0", page_token_key="replica-secret", valkey_cluster=valkey_cluster)
    first = await start_server(settings, ValkeyAddress.parse(valkey_url))
    second = await start_server(settings, ValkeyAddress.parse(valkey_url))
    try:
        async with (
            SessionClient(f"127.0.0.1:{first.port}") as a,
            SessionClient(f"127.0.0.1:{second.port}") as b,
        ):
            for i in range(2):
                await a.create_session(uid, session_id=f"{uid}-{i}")
            token = (await a.list_sessions(uid, page_size=1)).next_page_token
            page = await b.list_sessions(uid, page_size=1, page_token=token)
            assert [s.session_id for s in page.sessions] == [f"{uid}-0"]
            forged = _signed(b'{"v":1,"u":"%s","s":NaN,"i":"x"}' % uid.encode(), b"replica-secret")
            err = await raises(InvalidArgumentError, b.list_sessions(uid, page_token=forged))
            assert violated_fields(err) == {"page_token"}
    finally:
        await first.stop(1.0)
        await second.stop(1.0)


# --- pages cut by bytes ---------------------------------------------------------------------------


async def test_pages_are_cut_by_bytes_so_every_reply_fits_a_default_client(
    client: SessionClient, uid: str
) -> None:
    labels = {f"label-{i}": "v" * 1000 for i in range(64)}  # about 65 KB a session
    ids = {(await client.create_session(uid, labels=labels)).session_id for _ in range(60)}
    first = await client.list_sessions(uid, page_size=100)  # 60 x 65 KB would not fit 4 MiB
    assert 1 <= len(first.sessions) < 60
    assert first.next_page_token
    assert {s.session_id async for s in client.iter_sessions(uid, page_size=100)} == ids


def big_labels(char: str) -> dict[str, str]:
    """The most a session may carry: 64 labels of a 128-character key (ASCII, as keys must be) and
    a 1024-character value of `char`."""
    return {f"{i:03d}" + "k" * 125: char * 1024 for i in range(64)}


async def test_a_list_sessions_page_fits_a_default_client_with_non_ascii_labels(
    client: SessionClient, uid: str
) -> None:
    """The byte cut counts bytes, not characters."""
    labels = big_labels("\N{GRINNING FACE}")  # 4 bytes in UTF-8, 1 character
    for i in range(15):
        await client.create_session(uid, session_id=f"{uid}-{i}", labels=labels)
    # The client's default receive limit is 4 MiB; the server promises pages below 3 MiB.
    listed = [s.session_id async for s in client.iter_sessions(uid, page_size=100)]
    assert len(listed) == 15


@pytest.mark.standalone_only  # the row counts below assume expired rows are pruned as read
async def test_a_page_cut_by_bytes_holds_at_most_page_size(client: SessionClient, raw: Any, uid: str) -> None:
    """After index rows of expired sessions the read doubles (3, 6, 12, ...), so one read can
    bring far more live rows than the page needs; when the byte cut fires among them, the page
    still holds the first page_size of them, no more."""
    # 16 live sessions of ~270 KB each (64 labels of 1024 four-byte characters): 4 MB in all.
    labels = {f"k{i:02d}": "\U0001f600" * 1024 for i in range(64)}
    for i in range(16):
        await client.create_session(uid, session_id=f"{uid}-live{i:02d}", labels=labels)
    # 10 index rows of sessions that no longer exist, newer than every live one: the first two
    # reads (3 and 7 rows) meet only them, the third reads 13 rows, all live.
    future = time.time() + 1000
    await raw.zadd(keys.KeySpace().user_index(uid), {f"{uid}-gone{i:02d}": future - i for i in range(10)})
    page = await client.list_sessions(uid, page_size=2)
    assert len(page.sessions) <= 2, f"page_size=2 returned {len(page.sessions)} sessions"


# --- the session quota counts every page ----------------------------------------------------------


async def test_the_session_quota_holds_for_sessions_with_large_labels(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    """The quota counts the owner's sessions over every page of the listing, not only the first
    one the byte cut ends."""
    limit = 45  # a page of these sessions is cut by bytes after 42
    async with (
        serving(settings, valkey_url, max_sessions_per_user=limit) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client,
    ):
        labels = big_labels("k")
        for i in range(limit):
            await client.create_session(uid, session_id=f"{uid}-{i}", labels=labels)
        with pytest.raises(ResourceExhaustedError):
            await client.create_session(uid, session_id=f"{uid}-over", labels=labels)


async def test_quota_still_refuses_small_sessions(settings: Settings, valkey_url: str, uid: str) -> None:
    """The control of the test above: the same limit holds for sessions without labels."""
    async with (
        serving(settings, valkey_url, max_sessions_per_user=3) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client,
    ):
        for i in range(3):
            await client.create_session(uid, session_id=f"{uid}-{i}")
        with pytest.raises(ResourceExhaustedError):
            await client.create_session(uid, session_id=f"{uid}-over")
