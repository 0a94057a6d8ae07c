"""Apps (namespaces): a session may belong to an app (immutable, copied by a fork); ListSessions
lists an app's sessions across its users, or a user's of one app, newest first and paged, from
the indexes `app_sessions:{<app>}` and `user_sessions:{<user_id>}:<app>`, which never list a
deleted or expired session and never lose a live one (in a cluster they are steps of their own:
a failed or late step is skipped, repaired or pruned by listings, as the owner's index)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from glide import GlideClient, UpdateOptions
from google.protobuf import field_mask_pb2

from chatsession.v1 import session_pb2, session_service_pb2
from chatsession_client import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SessionClient,
    StateFullError,
    UnavailableError,
    user,
)
from chatsession_server.app import RunningServer
from chatsession_server.settings import Settings
from chatsession_server.store.lua import session_scripts
from tests.helpers import ALICE, BOB, RUN, client_for, meta, raises, serving, violated_fields
from tests.test_cli import cli
from tests.test_cluster_index import fail_index_step, fail_script, hold_unindex


def app_index(app: str) -> str:
    return f"app_sessions:{{{app}}}"


def user_app_index(user_id: str, app: str) -> str:
    return f"user_sessions:{{{user_id}}}:{app}"


async def listed(client: SessionClient, user_id: str | None = None, *, app: str | None = None) -> list[str]:
    return [s.session_id async for s in client.iter_sessions(user_id, app=app, page_size=2)]


async def age_entries(raw: GlideClient, index: str, session_ids: list[str], seconds: float = 3600) -> None:
    """Make index entries look `seconds` older, as time passing would (past the cluster's grace)."""
    for session_id in session_ids:
        score = await raw.zscore(index, session_id)
        assert score is not None
        await raw.zadd(index, {session_id: score - seconds}, update_condition=UpdateOptions.LESS_THAN)


# --- Session.app ----------------------------------------------------------------------------------


async def test_a_session_keeps_its_app_and_a_fork_copies_it(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}.travel"
    s = await client.create_session(uid, app=app, title="trip")
    assert s.app == app
    assert (await meta(raw, s.session_id))["app"] == app
    assert (await client.get_session(s.session_id)).app == app
    masked = await client.get_session(s.session_id, read_mask=["app"])
    assert (masked.app, masked.title, masked.user_id) == (app, "", "")
    fork = (await client.fork_session(s.session_id)).session
    assert fork.app == app
    assert await listed(client, app=app) == [fork.session_id, s.session_id]
    assert await listed(client, uid, app=app) == [fork.session_id, s.session_id]
    plain = await client.create_session(uid)
    assert plain.app == ""
    assert "app" not in await meta(raw, plain.session_id)


# --- listings -------------------------------------------------------------------------------------


async def test_an_app_lists_every_users_sessions_newest_first_across_pages(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app, other_app = f"{uid}-app", f"{uid}-other"
    users = [f"{uid}-u{i}" for i in range(3)]
    ids = [
        (await client.create_session(users[i % 3], session_id=f"{users[i % 3]}/s{i}", app=app)).session_id
        for i in range(7)
    ]
    await client.create_session(users[0], app=other_app)
    await client.create_session(users[1])  # no app
    await client.append(ids[0], [user("bump: the oldest becomes the newest")])
    expected = [ids[0], *reversed(ids[1:])]

    first = await client.list_sessions(app=app, page_size=3)
    assert [s.session_id for s in first.sessions] == expected[:3]
    assert {s.app for s in first.sessions} == {app}
    assert first.next_page_token
    assert await listed(client, app=app) == expected
    last_active = [s.last_active.ToNanoseconds() async for s in client.iter_sessions(app=app, page_size=2)]
    assert last_active == sorted(last_active, reverse=True)

    # The raw index: every session of the app, scored by its last_active.
    assert await raw.zcard(app_index(app)) == 7
    bumped = await client.get_session(ids[0])
    assert await raw.zscore(app_index(app), ids[0]) == pytest.approx(
        bumped.last_active.ToNanoseconds() / 1e9, abs=1e-6
    )
    assert await raw.zcard(app_index(other_app)) == 1


async def test_a_users_listing_by_app_holds_only_that_app_and_the_whole_listing_holds_all(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    a = [(await client.create_session(uid, app=f"{uid}-a")).session_id for _ in range(3)]
    b = (await client.create_session(uid, app=f"{uid}-b")).session_id
    plain = (await client.create_session(uid)).session_id
    someone_else = (await client.create_session(f"{uid}-x", app=f"{uid}-a")).session_id
    assert await listed(client, uid, app=f"{uid}-a") == list(reversed(a))
    assert await listed(client, uid, app=f"{uid}-b") == [b]
    assert await listed(client, uid) == [plain, b, *reversed(a)]  # every app, and none
    assert someone_else in await listed(client, app=f"{uid}-a")
    assert await raw.zcard(user_app_index(uid, f"{uid}-a")) == 3
    assert await raw.zcard(f"user_sessions:{{{uid}}}") == 5
    assert await listed(client, uid, app=f"{uid}-none") == []


async def test_deleted_and_expired_sessions_leave_the_app_listings(
    client: SessionClient, raw: GlideClient, uid: str, valkey_cluster: bool
) -> None:
    app = f"{uid}-app"
    keep = [(await client.create_session(uid, app=app)).session_id for _ in range(2)]
    deleted = (await client.create_session(uid, app=app)).session_id
    expired = [(await client.create_session(f"{uid}-o", app=app)).session_id for _ in range(3)]
    await client.delete_session(deleted)
    for index in (app_index(app), user_app_index(uid, app), f"user_sessions:{{{uid}}}"):
        assert await raw.zscore(index, deleted) is None, index
    for session_id in expired:  # as if their TTL ran out
        await raw.delete([f"meta:{{{session_id}}}", f"chat:{{{session_id}}}"])
    assert sorted(await listed(client, app=app)) == sorted(keep)
    assert await listed(client, f"{uid}-o", app=app) == []
    if valkey_cluster:
        # A cluster cannot tell an expired session from a create between its steps: recent
        # entries are only skipped; once older than the grace period they go.
        assert await raw.zcard(app_index(app)) == 5
        await age_entries(raw, app_index(app), expired)
        await age_entries(raw, user_app_index(f"{uid}-o", app), expired)
        assert sorted(await listed(client, app=app)) == sorted(keep)
        assert await listed(client, f"{uid}-o", app=app) == []
    assert await raw.zcard(app_index(app)) == 2
    assert await raw.zcard(user_app_index(f"{uid}-o", app)) == 0


async def test_a_taken_id_leaves_the_app_entries_of_the_session_that_holds_it(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    """A refused create (ALREADY_EXISTS) of the same id, in the same app or another, by the same
    user or another (with --global-session-ids off, ids without '/' are anyone's)."""
    app = f"{uid}-app"
    held = await client.create_session(uid, session_id=f"{uid}-taken", app=app)
    score = await raw.zscore(app_index(app), held.session_id)
    for owner, its_app in ((uid, app), (uid, f"{uid}-b"), (f"{uid}-bob", app), (f"{uid}-bob", "")):
        await raises(
            AlreadyExistsError, client.create_session(owner, session_id=held.session_id, app=its_app)
        )
    assert await raw.zscore(app_index(app), held.session_id) == score
    assert await raw.zscore(user_app_index(uid, app), held.session_id) == score
    assert await raw.zscore(app_index(f"{uid}-b"), held.session_id) is None
    assert await raw.zscore(user_app_index(uid, f"{uid}-b"), held.session_id) is None
    assert await raw.zscore(user_app_index(f"{uid}-bob", app), held.session_id) is None
    assert await listed(client, app=app) == [held.session_id]


async def test_a_retried_create_is_listed_once_in_its_app(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}-app"
    first = await client.create_session(uid, app=app, request_id="r1")
    again = await client.create_session(uid, app=app, request_id="r1")
    assert again.session_id == first.session_id
    assert await listed(client, app=app) == [first.session_id]
    await client.delete_session(first.session_id)
    assert await raw.zcard(app_index(app)) == 0
    assert await raw.zcard(user_app_index(uid, app)) == 0


# --- hostile inputs -------------------------------------------------------------------------------


async def test_bad_apps_are_invalid_argument_naming_the_field_and_write_nothing(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    for bad in ("a b", "x" * 129, "{x}", "ü", "a/b"):
        error = await raises(
            InvalidArgumentError, client.create_session(uid, session_id=f"{uid}-bad", app=bad)
        )
        assert violated_fields(error) == {"app"}
        error = await raises(InvalidArgumentError, client.list_sessions(app=bad))
        assert violated_fields(error) == {"app"}
        error = await raises(InvalidArgumentError, client.list_sessions(uid, app=bad))
        assert violated_fields(error) == {"app"}
    assert await raw.exists([f"meta:{{{uid}-bad}}", f"user_sessions:{{{uid}}}"]) == 0
    error = await raises(InvalidArgumentError, client.list_sessions())
    assert violated_fields(error) == {"user_id"}
    assert "unless app is set" in str(error)


async def test_an_app_cannot_be_changed_by_update_session(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    s = await client.create_session(uid, app=f"{uid}-app", title="before")
    requests = [
        # Named in the mask, or set without a mask (AIP-134 applies what is set).
        session_service_pb2.UpdateSessionRequest(
            session=session_pb2.Session(session_id=s.session_id, app=f"{uid}-new", title="after"),
            update_mask=field_mask_pb2.FieldMask(paths=["app", "title"]),
        ),
        session_service_pb2.UpdateSessionRequest(
            session=session_pb2.Session(session_id=s.session_id, app=f"{uid}-new", title="after")
        ),
    ]
    for request in requests:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client._stub.UpdateSession(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session.app" in (info.value.details() or "")
    after = await meta(raw, s.session_id)
    assert (after["app"], after["title"]) == (f"{uid}-app", "before")
    assert await raw.exists([app_index(f"{uid}-new")]) == 0


async def test_a_page_token_serves_only_the_listing_it_came_from(client: SessionClient, uid: str) -> None:
    app = f"{uid}-app"
    for _ in range(3):
        await client.create_session(uid, app=app)
    by_app = (await client.list_sessions(app=app, page_size=1)).next_page_token
    by_user_and_app = (await client.list_sessions(uid, app=app, page_size=1)).next_page_token
    by_user = (await client.list_sessions(uid, page_size=1)).next_page_token
    assert all((by_app, by_user_and_app, by_user))
    misuses: list[tuple[str | None, str | None, str]] = [
        (None, f"{uid}-other", by_app),  # another app
        (uid, app, by_app),  # the app's token on a user's listing
        (uid, None, by_user_and_app),
        (None, app, by_user_and_app),
        (uid, app, by_user),
        (f"{uid}-x", app, by_user_and_app),  # another user
    ]
    for user_id, its_app, token in misuses:
        error = await raises(
            InvalidArgumentError, client.list_sessions(user_id, app=its_app, page_token=token)
        )
        assert violated_fields(error) == {"page_token"}
        assert "was issued for another" in str(error)
    assert len((await client.list_sessions(app=app, page_token=by_app)).sessions) == 2


# --- cluster: the app's index is a step of its own --------------------------------------------------


@pytest.mark.cluster_only
async def test_in_a_cluster_an_append_with_a_failed_index_step_stays_listed_and_is_repaired(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}-app"
    lagging = await client.create_session(uid, app=app)
    other = await client.create_session(f"{uid}-o", app=app)
    score = await raw.zscore(app_index(app), lagging.session_id)
    fail_index_step(monkeypatch, server.store, "touch")
    appended = await client.append(lagging.session_id, [user("stored; the index steps failed")])
    monkeypatch.undo()
    assert await raw.zscore(app_index(app), lagging.session_id) == score  # stale
    # Still listed; the listing raises the lagging score it met, and orders by last_active next.
    assert sorted(await listed(client, app=app)) == sorted([lagging.session_id, other.session_id])
    repaired = appended.session.last_active.ToNanoseconds() / 1e9
    assert await raw.zscore(app_index(app), lagging.session_id) == pytest.approx(repaired, abs=1e-6)
    assert await listed(client, app=app) == [lagging.session_id, other.session_id]
    assert await listed(client, uid, app=app) == [lagging.session_id]
    assert await raw.zscore(user_app_index(uid, app), lagging.session_id) == pytest.approx(repaired, abs=1e-6)


@pytest.mark.cluster_only
async def test_in_a_cluster_a_held_back_delete_step_is_skipped_pruned_and_harmless_late(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}-app"
    keep = await client.create_session(uid, app=app)
    gone = await client.create_session(uid, app=app)
    index_steps, held = hold_unindex(monkeypatch, server)
    await client.delete_session(gone.session_id)
    monkeypatch.undo()
    assert held[0][3] == app
    assert await raw.zscore(app_index(app), gone.session_id) is not None  # left behind
    assert await listed(client, app=app) == [keep.session_id]  # skipped
    await age_entries(raw, app_index(app), [gone.session_id])
    await age_entries(raw, user_app_index(uid, app), [gone.session_id])
    assert await listed(client, app=app) == [keep.session_id]
    assert await listed(client, uid, app=app) == [keep.session_id]
    assert await raw.zscore(app_index(app), gone.session_id) is None  # pruned
    assert await raw.zscore(user_app_index(uid, app), gone.session_id) is None
    await index_steps.unindex(*held[0])  # the late step: nothing left to remove, nothing broken
    assert await listed(client, app=app) == [keep.session_id]


@pytest.mark.cluster_only
async def test_in_a_cluster_a_create_cut_off_after_its_index_steps_is_never_listed(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}-app"
    live = await client.create_session(uid, app=app)
    fail_script(monkeypatch, server.store, session_scripts.CREATE)
    await raises(UnavailableError, client.create_session(uid, session_id=f"{uid}-dead", app=app))
    monkeypatch.undo()
    assert await raw.zscore(app_index(app), f"{uid}-dead") is not None  # entered first
    assert await listed(client, app=app) == [live.session_id]
    await age_entries(raw, app_index(app), [f"{uid}-dead"])
    assert await listed(client, app=app) == [live.session_id]
    assert await raw.zscore(app_index(app), f"{uid}-dead") is None


# --- tokens that grant apps -----------------------------------------------------------------------

APP = f"travel-{RUN}"
OTHER_APP = f"support-{RUN}"
TRAVEL_SERVICE = "travel-service-" + uuid.uuid4().hex  # every user, confined to APP
TRAVEL_ALICE = "travel-alice-" + uuid.uuid4().hex  # alice, confined to APP
ADMIN = "admin-" + uuid.uuid4().hex  # every user, every app
EVERY_USER = "every-user-" + uuid.uuid4().hex  # every user, no apps= (today's meaning)
JUST_ALICE = "just-alice-" + uuid.uuid4().hex  # alice, no apps=


@pytest.fixture(scope="module")
async def apps_target(
    settings: Settings, valkey_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    path = tmp_path_factory.mktemp("apps-auth") / "tokens"
    path.write_text(
        f"{TRAVEL_SERVICE} * apps={APP}\n"
        f"{TRAVEL_ALICE} {ALICE} apps={APP}\n"
        f"{ADMIN} * apps=*\n"
        f"{EVERY_USER} *\n"
        f"{JUST_ALICE} {ALICE},{BOB}\n"
    )
    async with serving(settings, valkey_url, auth_tokens_file=str(path)) as running:
        yield f"127.0.0.1:{running.port}"


async def test_listing_an_app_across_users_needs_the_app_and_every_user_in_the_grant(
    apps_target: str, uid: str
) -> None:
    async with client_for(apps_target, ADMIN) as admin:
        mine = await admin.create_session(ALICE, app=APP, title=uid)
        theirs = await admin.create_session(BOB, app=APP, title=uid)
    for token in (TRAVEL_SERVICE, ADMIN):
        async with client_for(apps_target, token) as caller:
            seen = [s.session_id async for s in caller.iter_sessions(app=APP)]
            assert seen[:2] == [theirs.session_id, mine.session_id]
    refusals = [
        (EVERY_USER, APP, "does not name the app"),  # no apps=: not across users
        (TRAVEL_SERVICE, OTHER_APP, "does not name the app"),
        (TRAVEL_ALICE, APP, "limited to some users"),
        (JUST_ALICE, APP, "does not name the app"),
    ]
    for token, app, says in refusals:
        async with client_for(apps_target, token) as caller:
            error = await raises(PermissionDeniedError, caller.list_sessions(app=app))
            assert says in str(error), (token, str(error))


async def test_a_grant_with_apps_creates_sessions_only_in_them_and_writes_nothing_else(
    apps_target: str, raw: GlideClient, uid: str
) -> None:
    async with (
        client_for(apps_target, TRAVEL_SERVICE) as service,
        client_for(apps_target, JUST_ALICE) as alice,
    ):
        made = await service.create_session(ALICE, session_id=f"{ALICE}/{uid}-ok", app=APP)
        assert made.app == APP
        for app, says in ((OTHER_APP, "does not name it"), ("", "set app")):
            error = await raises(
                PermissionDeniedError, service.create_session(ALICE, session_id=f"{ALICE}/{uid}-no", app=app)
            )
            assert says in str(error)
            assert str(error).startswith("PERMISSION_DENIED: app:")
        assert await raw.exists([f"meta:{{{ALICE}/{uid}-no}}"]) == 0
        assert await raw.zscore(app_index(OTHER_APP), f"{ALICE}/{uid}-no") is None
        assert await raw.zscore(f"user_sessions:{{{ALICE}}}", f"{ALICE}/{uid}-no") is None
        # Without apps=, today's meaning: any app, or none.
        assert (await alice.create_session(ALICE, app=OTHER_APP)).app == OTHER_APP
        assert (await alice.create_session(ALICE)).app == ""


async def test_a_grant_with_apps_touches_only_its_apps_sessions(apps_target: str, uid: str) -> None:
    async with client_for(apps_target, ADMIN) as admin:
        travel = await admin.create_session(ALICE, session_id=f"{ALICE}/{uid}-t", app=APP)
        support = await admin.create_session(ALICE, session_id=f"{ALICE}/{uid}-s", app=OTHER_APP)
        plain = await admin.create_session(ALICE, session_id=f"{ALICE}/{uid}-p")
        bobs = await admin.create_session(BOB, session_id=f"{BOB}/{uid}-t", app=APP)
    async with client_for(apps_target, TRAVEL_ALICE) as confined:
        assert (await confined.get_session(travel.session_id)).app == APP
        await confined.append(travel.session_id, [user("in the app")])
        assert (await confined.get_session(travel.session_id, read_mask=["title"])).title == ""
        await confined.update_state(travel.session_id, {"k": 1})
        for outside in (support, plain, bobs):  # another app, no app, another user
            sid = outside.session_id
            await raises(NotFoundError, confined.get_session(sid))
            await raises(NotFoundError, confined.get_session(sid, read_mask=["title"]))
            await raises(NotFoundError, confined.append(sid, [user("x")]))
            await raises(NotFoundError, confined.list_messages(sid))
            await raises(NotFoundError, confined.get_state(sid))
            await raises(NotFoundError, confined.fork_session(sid))
            await raises(NotFoundError, confined.pop_message(sid))
            await raises(NotFoundError, confined.delete_session(sid))
        in_app = [s async for s in confined.iter_sessions(ALICE, app=APP)]
        assert travel.session_id in {s.session_id for s in in_app}
        assert {s.app for s in in_app} == {APP}
        error = await raises(PermissionDeniedError, confined.list_sessions(ALICE))
        assert "set app" in str(error)
        await raises(PermissionDeniedError, confined.list_sessions(ALICE, app=OTHER_APP))
        fork = (await confined.fork_session(travel.session_id)).session
        assert fork.app == APP
    async with client_for(apps_target, TRAVEL_SERVICE) as service:
        assert (await service.get_session(bobs.session_id)).user_id == BOB  # every user, in the app
        await raises(NotFoundError, service.get_session(support.session_id))
    async with client_for(apps_target, JUST_ALICE) as alice:
        # Without apps=: every session of its users, whatever the app.
        listed_ids = {s.session_id async for s in alice.iter_sessions(ALICE)}
        assert {travel.session_id, support.session_id, plain.session_id} <= listed_ids
        assert (await alice.get_session(support.session_id)).app == OTHER_APP
        assert (await alice.get_session(support.session_id)).messages_stored == 0
    async with client_for(apps_target, ADMIN) as admin:
        # Untouched by the refused calls.
        for outside in (support, plain, bobs):
            assert (await admin.get_session(outside.session_id)).message_count == 0


# --- an app's state ---------------------------------------------------------------------------------


async def test_an_apps_state_is_shared_by_its_sessions_and_outlives_them(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}-app"
    assert await client.update_state(app=app, values={"banner": "Spring sale", "n": 2}) == {
        "banner": "Spring sale",
        "n": 2,
    }
    assert await client.get_state(app=app, keys=["n", "absent"]) == {"n": 2}
    assert await raw.hget(f"app_state:{{{app}}}", "banner") == b'"Spring sale"'
    assert await raw.ttl(f"app_state:{{{app}}}") == -1  # no expiry
    s = await client.create_session(uid, app=app)
    await client.delete_session(s.session_id)
    assert await client.get_state(app=app) == {"banner": "Spring sale", "n": 2}
    assert await client.update_state(app=app, remove=["banner", "n"]) == {}
    assert await raw.exists([f"app_state:{{{app}}}"]) == 0
    # The user's state and the app's are apart.
    await client.update_state(user_id=app, values={"mine": 1})
    assert await client.get_state(app=app) == {}


async def test_an_apps_state_has_the_limits_of_every_state(
    client: SessionClient, raw: GlideClient, uid: str
) -> None:
    app = f"{uid}-app"
    for bad_scope in ("a b", "x" * 129, ""):
        request = session_service_pb2.GetStateRequest(scope=session_service_pb2.StateScope(app=bad_scope))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client._stub.GetState(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scope.app" in (info.value.details() or "")
    error = await raises(InvalidArgumentError, client.update_state(app=app, values={"a\nb": 1}))
    assert violated_fields(error) == {"delta.set['a\\nb']"}
    await client.update_state(app=app, values={f"k{i}": i for i in range(600)})
    await raises(StateFullError, client.update_state(app=app, values={f"more{i}": i for i in range(401)}))
    assert len(await client.get_state(app=app)) == 600  # nothing of the refused change


async def test_an_apps_state_needs_a_grant_naming_the_app(apps_target: str, raw: GlideClient) -> None:
    for token in (TRAVEL_SERVICE, TRAVEL_ALICE, ADMIN):  # the app named (users do not matter), or apps=*
        async with client_for(apps_target, token) as caller:
            assert await caller.update_state(app=APP, values={"seen_by": token[:6]}) == {"seen_by": token[:6]}
    for token, app in ((EVERY_USER, APP), (JUST_ALICE, APP), (TRAVEL_SERVICE, OTHER_APP)):
        async with client_for(apps_target, token) as caller:
            error = await raises(PermissionDeniedError, caller.get_state(app=app))
            assert "does not name it" in str(error)
            await raises(PermissionDeniedError, caller.update_state(app=app, values={"x": 1}))
    assert await raw.hgetall(f"app_state:{{{OTHER_APP}}}") == {}
    assert await raw.hget(f"app_state:{{{APP}}}", "x") is None


async def test_the_cli_creates_lists_and_keeps_state_by_app(target: str, uid: str) -> None:
    app = f"{uid}-app"
    base = ("--address", target, "--json")
    made = (await cli(*base, "create", "--user", uid, "--app", app)).json()
    assert made["app"] == app
    listed_ids = [s["session_id"] for s in (await cli(*base, "ls", "--app", app)).json()["sessions"]]
    assert listed_ids == [made["session_id"]]
    assert (await cli(*base, "ls", "--user", uid, "--app", f"{app}-x")).json() == {"sessions": []}
    assert (await cli(*base, "ls")).code != 0
    state = await cli(*base, "state", "--app", app, "--set", "banner=sale")
    assert state.json() == {"state": {"banner": "sale"}}
    assert (await cli(*base, "state", "--app", app, "--user", uid)).code != 0
