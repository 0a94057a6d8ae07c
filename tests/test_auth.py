"""Caller authentication and per-user authorization through a real server, Valkey and channel."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from glide import GlideClient

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import (
    AlreadyExistsError,
    ChatSessionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SessionClient,
    UnauthenticatedError,
    system,
    user,
)
from chatsession_server.api.auth import load_callers
from chatsession_server.api.tls import is_loopback
from chatsession_server.app import start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    CAROL,
    SERVICE_TOKEN,
    client_for,
    grpcurl,
    meta,
    raises,
    serving,
    stored_messages,
    violated_fields,
)
from tests.processes import ROOT, ServerProcess


@pytest.fixture(scope="module")
async def auth_target(settings: Settings, valkey_url: str, tokens_file: Path) -> AsyncIterator[str]:
    async with serving(settings, valkey_url, auth_tokens_file=str(tokens_file)) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
async def alice(auth_target: str) -> AsyncIterator[SessionClient]:
    async with client_for(auth_target, ALICE_TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
async def bob(auth_target: str) -> AsyncIterator[SessionClient]:
    async with client_for(auth_target, BOB_TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
async def service(auth_target: str) -> AsyncIterator[SessionClient]:
    async with client_for(auth_target, SERVICE_TOKEN) as c:
        yield c


async def first_event(client: SessionClient, session_id: str) -> pb.WatchMessagesResponse:
    async for event in client.watch(session_id, after_seq=0):
        return event
    raise AssertionError("the watch ended without an event")


# --- the tokens file ---------------------------------------------------------------------------


def test_tokens_file_grants(tokens_file: Path) -> None:
    callers = load_callers(str(tokens_file))
    assert len(callers) == 3
    grants = sorted(callers.by_token_digest.values(), key=lambda g: sorted(g.users))
    assert [(sorted(g.users), g.every_user) for g in grants] == [
        ([], True),
        ([ALICE, CAROL], False),
        ([BOB], False),
    ]
    assert ALICE_TOKEN.encode() not in repr(callers).encode()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (f"{ALICE_TOKEN}", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice bob", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice,,bob", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} *,alice", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice apps=", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice apps=a,,b", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice apps={{x}}", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice apps=a,*", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice roles=a", "expected '<token> <user_id>"),
        (f"{ALICE_TOKEN} alice apps=a apps=b", "expected '<token> <user_id>"),
        ("short-secret alice", "shorter than 16"),
        (f"{ALICE_TOKEN}é alice", "printable ASCII"),
        (f"{ALICE_TOKEN} alice", "the same token"),
        ("cert:OU=team alice", "cert:CN=<common name>"),
        ("cert:CN= alice", "cert:CN=<common name>"),
    ],
)
def test_malformed_line_is_one_line_error_naming_the_line_not_the_token(
    tmp_path: Path, line: str, says: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# header\n{ALICE_TOKEN} alice\n\n{line}\n")
    with pytest.raises(RuntimeError) as info:
        load_callers(str(path))
    message = str(info.value)
    assert f"{path}, line 4: " in message
    assert says in message
    assert "\n" not in message
    assert ALICE_TOKEN not in message
    assert "short-secret" not in message


def test_unreadable_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"cannot read auth tokens file .*missing: No such file"):
        load_callers(str(tmp_path / "missing"))


# --- authentication ----------------------------------------------------------------------------


async def test_missing_or_unknown_token_is_unauthenticated_and_writes_nothing(
    auth_target: str, alice: SessionClient, raw: GlideClient
) -> None:
    own = await alice.create_session(ALICE, title="mine")
    assert await raw.exists([f"meta:{{{own.session_id}}}"])  # the read below sees a session
    for token in (None, "not-a-known-token-at-all", ALICE_TOKEN + "x"):
        async with client_for(auth_target, token) as c:
            error = await raises(UnauthenticatedError, c.get_session(own.session_id))
            assert ("no credentials" if token is None else "unknown token") in error.message
            await raises(UnauthenticatedError, c.create_session(ALICE, session_id=f"{own.session_id}-2"))
            await raises(UnauthenticatedError, c.list_sessions(ALICE))
            await raises(UnauthenticatedError, c.append(own.session_id, [user("sneaky")]))
            await raises(UnauthenticatedError, c.delete_session(own.session_id))
            await raises(UnauthenticatedError, first_event(c, own.session_id))
    assert not await raw.exists([f"meta:{{{own.session_id}-2}}"])
    assert await stored_messages(raw, own.session_id) == []
    assert (await alice.get_session(own.session_id)).title == "mine"
    await alice.append(own.session_id, [user("hers")])  # the same read sees an accepted append
    assert [m["content"] for m in await stored_messages(raw, own.session_id)] == ["hers"]


@pytest.mark.parametrize(
    "header", [f"Basic {ALICE_TOKEN}", ALICE_TOKEN, "Bearer ", f"Bearer {ALICE_TOKEN}, Bearer x"]
)
async def test_malformed_authorization_header_is_unauthenticated(auth_target: str, header: str) -> None:
    async with grpc.aio.insecure_channel(auth_target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListSessions(
                pb.ListSessionsRequest(user_id=ALICE), metadata=(("authorization", header),)
            )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_two_authorization_headers_are_unauthenticated(auth_target: str) -> None:
    async with grpc.aio.insecure_channel(auth_target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        headers = (("authorization", f"Bearer {ALICE_TOKEN}"), ("authorization", f"Bearer {BOB_TOKEN}"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListSessions(pb.ListSessionsRequest(user_id=ALICE), metadata=headers)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one" in (info.value.details() or "")


async def test_health_and_reflection_need_no_token(auth_target: str) -> None:
    code, out = await grpcurl("-plaintext", auth_target, "list")
    assert code == 0, out
    assert "chatsession.v1.SessionService" in out.split()
    code, out = await grpcurl("-plaintext", auth_target, "describe", "chatsession.v1.SessionService")
    assert code == 0, out
    code, out = await grpcurl("-plaintext", auth_target, "grpc.health.v1.Health/Check")
    assert code == 0, out
    assert "SERVING" in out

    body = json.dumps({"user_id": ALICE, "page_size": 1})
    method = "chatsession.v1.SessionService/ListSessions"
    code, out = await grpcurl("-plaintext", "-d", body, auth_target, method)
    assert code != 0
    assert "Unauthenticated" in out
    header = f"authorization: Bearer {ALICE_TOKEN}"
    code, out = await grpcurl("-plaintext", "-H", header, "-d", body, auth_target, method)
    assert code == 0, out


# --- authorization -----------------------------------------------------------------------------


async def test_another_users_session_is_not_found_and_stays_unchanged(
    alice: SessionClient, bob: SessionClient, raw: GlideClient, uid: str
) -> None:
    session = await bob.create_session(BOB, session_id=f"{BOB}/{uid}", title="bob's", ttl_seconds=3600)
    await bob.append(session.session_id, [user("private", tokens=2)])
    before = (await meta(raw, session.session_id), await stored_messages(raw, session.session_id))
    missing = await raises(NotFoundError, alice.get_session(f"{uid}-nobody"))

    attempts = {
        "get": alice.get_session(session.session_id),
        "update": alice.update_session(session.session_id, title="mine now", ttl_seconds=1),
        "delete": alice.delete_session(session.session_id),
        "append": alice.append(session.session_id, [user("hijack")]),
        "list_messages": alice.list_messages(session.session_id),
        "watch": first_event(alice, session.session_id),
        "get_masked": alice.get_session(session.session_id, read_mask=["title"]),
        "get_context": alice.get_context(session.session_id),
        "compact": alice.compact_messages(session.session_id, 1, system("mine now")),
        "clear": alice.clear_messages(session.session_id),
        "truncate": alice.truncate_messages(session.session_id, 0, return_removed=True),
        "pop": alice.pop_message(session.session_id),
    }
    for name, attempt in attempts.items():
        error = await raises(NotFoundError, attempt)
        # Word for word what a session that does not exist gets: nothing tells them apart.
        assert error.message == missing.message.replace(f"{uid}-nobody", session.session_id), name
    await alice.delete_session(session.session_id, allow_missing=True)  # "gone" as far as alice knows

    assert (await meta(raw, session.session_id), await stored_messages(raw, session.session_id)) == before
    assert await raw.ttl(f"meta:{{{session.session_id}}}") > 3000
    assert (await bob.get_session(session.session_id)).title == "bob's"
    assert not await raw.exists([f"summary:{{{session.session_id}}}"])
    await bob.compact_messages(session.session_id, 1, system("his"))  # the same read sees his summary
    assert await raw.exists([f"summary:{{{session.session_id}}}"])


async def test_listing_or_creating_for_another_user_is_permission_denied(
    alice: SessionClient, bob: SessionClient, raw: GlideClient, uid: str
) -> None:
    await bob.create_session(BOB, session_id=f"{BOB}/{uid}-b")
    assert await raw.exists([f"meta:{{{BOB}/{uid}-b}}"])  # the read below sees a session
    index_before = await raw.zcard(f"user_sessions:{{{BOB}}}")

    error = await raises(PermissionDeniedError, alice.list_sessions(BOB))
    assert BOB in error.message
    await raises(PermissionDeniedError, alice.create_session(BOB, session_id=f"{BOB}/{uid}-forged"))

    assert not await raw.exists([f"meta:{{{BOB}/{uid}-forged}}"])
    assert await raw.zcard(f"user_sessions:{{{BOB}}}") == index_before


async def test_a_caller_may_act_for_each_of_its_users(alice: SessionClient, uid: str) -> None:
    for owner in (ALICE, CAROL):
        session = await alice.create_session(owner, session_id=f"{owner}/{uid}", title="t")
        await alice.append(session.session_id, [user("hello", tokens=1)])
        assert (await first_event(alice, session.session_id)).message.content == "hello"
        assert [m.content for m in (await alice.list_messages(session.session_id)).messages] == ["hello"]
        assert (await alice.update_session(session.session_id, title="t2")).title == "t2"
        assert session.session_id in [s.session_id async for s in alice.iter_sessions(owner)]
        await alice.delete_session(session.session_id)
        await raises(NotFoundError, alice.get_session(session.session_id))


async def test_star_may_act_for_every_user(
    service: SessionClient, bob: SessionClient, raw: GlideClient, uid: str
) -> None:
    session = await bob.create_session(BOB, session_id=f"{BOB}/{uid}-s")
    await service.append(session.session_id, [user("from the service")])
    assert (await service.get_session(session.session_id)).message_count == 1
    assert session.session_id in [s.session_id async for s in service.iter_sessions(BOB)]
    created = await service.create_session(ALICE, session_id=f"{uid}-for-alice")
    assert created.user_id == ALICE
    assert await raw.exists([f"meta:{{{session.session_id}}}"])  # the read below sees it before
    await service.delete_session(session.session_id)
    assert not await raw.exists([f"meta:{{{session.session_id}}}"])


# --- session ids a caller chooses ---------------------------------------------------------------


async def test_a_limited_caller_learns_nothing_from_another_users_session_ids(
    alice: SessionClient, bob: SessionClient, service: SessionClient, raw: GlideClient, uid: str
) -> None:
    # Bob's sessions under every kind of id: in his namespace, and a global one (made by a
    # caller that may act for everyone). Alice tries each, and ids nobody has: the answers match
    # word for word, and nothing is written.
    await bob.create_session(BOB, session_id=f"{BOB}/{uid}")
    await service.create_session(BOB, session_id=f"{uid}-global")
    own = await alice.create_session(ALICE, session_id=f"{ALICE}/{uid}")

    def create(user_id: str) -> Any:
        return lambda session_id: alice.create_session(user_id, session_id=session_id)

    def fork(session_id: str) -> Any:
        return alice.fork_session(own.session_id, new_session_id=session_id)

    bobs, free_of_bob = f"{BOB}/{uid}", f"{BOB}/{uid}-free"
    taken_and_free = [
        ("create global", create(ALICE), f"{uid}-global", f"{uid}-free"),
        ("create as bob", create(BOB), bobs, free_of_bob),
        ("create in bob's", create(ALICE), bobs, free_of_bob),
        ("fork global", fork, f"{uid}-global", f"{uid}-free"),
        ("fork to bob's", fork, bobs, free_of_bob),
    ]
    for name, attempt, taken, free in taken_and_free:
        on_taken = await raises(ChatSessionError, attempt(taken))
        on_free = await raises(ChatSessionError, attempt(free))
        assert on_taken.code == on_free.code != grpc.StatusCode.ALREADY_EXISTS, name
        assert on_taken.message == on_free.message.replace(free, taken), name
        assert not await raw.exists([f"meta:{{{free}}}"]), name
    assert (await service.get_session(f"{uid}-global")).user_id == BOB  # untouched
    assert (await bob.get_session(f"{BOB}/{uid}")).user_id == BOB


async def test_a_limited_caller_chooses_ids_in_its_users_namespaces(
    alice: SessionClient, raw: GlideClient, uid: str
) -> None:
    mine = await alice.create_session(ALICE, session_id=f"{ALICE}/{uid}/chat", title="t")
    assert mine.session_id == f"{ALICE}/{uid}/chat"
    assert (await alice.create_session(CAROL, session_id=f"{CAROL}/{uid}")).user_id == CAROL
    await raises(AlreadyExistsError, alice.create_session(ALICE, session_id=mine.session_id))  # its own
    fork = await alice.fork_session(mine.session_id, new_session_id=f"{ALICE}/{uid}/fork")
    assert (fork.session.session_id, fork.session.user_id) == (f"{ALICE}/{uid}/fork", ALICE)
    # Carol is alice's too, but a fork is its source owner's: carol's namespace is not for it.
    error = await raises(
        InvalidArgumentError, alice.fork_session(mine.session_id, new_session_id=f"{CAROL}/{uid}-f")
    )
    assert violated_fields(error) == {"new_session_id"}
    assert not await raw.exists([f"meta:{{{CAROL}/{uid}-f}}"])
    made = await alice.create_session(ALICE)  # or no id at all: the server makes one
    assert "/" not in made.session_id
    assert (await alice.fork_session(made.session_id)).session.user_id == ALICE
    denied = await raises(PermissionDeniedError, alice.create_session(ALICE, session_id=f"{uid}-mine"))
    assert "'<user_id>/<name>'" in denied.message


async def test_global_session_ids_lets_limited_callers_choose_any_id_and_see_taken_ones(
    settings: Settings, valkey_url: str, tokens_file: Path, uid: str
) -> None:
    async with serving(
        settings, valkey_url, auth_tokens_file=str(tokens_file), global_session_ids=True
    ) as running:
        target = f"127.0.0.1:{running.port}"
        async with client_for(target, ALICE_TOKEN) as alice, client_for(target, BOB_TOKEN) as bob:
            await bob.create_session(BOB, session_id=f"{uid}-global")
            assert (await alice.create_session(ALICE, session_id=f"{uid}-own")).user_id == ALICE
            # The documented trade: a taken id is ALREADY_EXISTS, whoever has it.
            await raises(AlreadyExistsError, alice.create_session(ALICE, session_id=f"{uid}-global"))
            await raises(NotFoundError, alice.get_session(f"{uid}-global"))  # and still unreadable


# --- reload and logs ---------------------------------------------------------------------------


async def test_reload_swaps_tokens_and_a_bad_file_keeps_the_old_ones(
    settings: Settings, valkey_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    new_token = "new-alice-token-" + uuid.uuid4().hex
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE_TOKEN} {ALICE}\n")
    async with serving(settings, valkey_url, auth_tokens_file=str(path)) as running:
        target = f"127.0.0.1:{running.port}"
        assert running.auth is not None
        async with client_for(target, ALICE_TOKEN) as old, client_for(target, new_token) as new:
            await old.list_sessions(ALICE)
            await raises(UnauthenticatedError, new.list_sessions(ALICE))

            path.write_text(f"# rotated\n{new_token} {ALICE}\n")
            assert running.auth.reload()
            await raises(UnauthenticatedError, old.list_sessions(ALICE))
            await new.list_sessions(ALICE)

            caplog.clear()
            path.write_text(f"{ALICE_TOKEN} {ALICE}\n{new_token}\n")
            assert not running.auth.reload()
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1
            assert "line 2" in errors[0].getMessage()
            assert "keeping the previous 1 callers" in errors[0].getMessage()
            await new.list_sessions(ALICE)  # the table before the bad file still holds
            await raises(UnauthenticatedError, old.list_sessions(ALICE))
    assert ALICE_TOKEN not in caplog.text
    assert new_token not in caplog.text


@pytest.mark.parametrize(
    ("listen", "auth", "expected"),
    [
        ("0.0.0.0:0", False, {"NO CALLER AUTHENTICATION", "NO TLS"}),
        ("0.0.0.0:0", True, {"NO TLS"}),
        ("127.0.0.1:0", False, set()),
    ],
)
async def test_exposed_listener_warns_loudly(
    valkey_cluster: bool,
    valkey_url: str,
    tokens_file: Path,
    caplog: pytest.LogCaptureFixture,
    listen: str,
    auth: bool,
    expected: set[str],
) -> None:
    caplog.set_level(logging.WARNING, logger="chatsession_server")
    settings = Settings(
        listen=listen, auth_tokens_file=str(tokens_file) if auth else "", valkey_cluster=valkey_cluster
    )
    running = await start_server(settings, ValkeyAddress.parse(valkey_url))
    await running.stop(0)
    found = {head for head in ("NO CALLER AUTHENTICATION", "NO TLS") if head in caplog.text}
    assert found == expected
    assert all(r.levelno == logging.WARNING for r in caplog.records if "NO " in r.getMessage())


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.9.9.9:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.0.0.5:1", False),
        ("chat.internal:1", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


# --- the real process --------------------------------------------------------------------------


async def test_sighup_reloads_the_tokens_file_of_a_running_process(tmp_path: Path) -> None:
    new_token = "rotated-token-" + uuid.uuid4().hex
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE_TOKEN} {ALICE}\n")
    # The environment variable works too.
    server = await ServerProcess.start(
        "--listen", "127.0.0.1:0", env={"CHATSESSION_AUTH_TOKENS_FILE": str(path)}
    )
    try:
        [serving] = await server.wait_for(r"serving on [\d.]+:(\d+)")
        target = f"127.0.0.1:{serving.group(1)}"
        async with client_for(target, ALICE_TOKEN) as old, client_for(target, new_token) as new:
            await old.list_sessions(ALICE)
            path.write_text(f"{new_token} {ALICE}\n")
            server.proc.send_signal(signal.SIGHUP)
            await server.wait_for("reloaded", timeout=20)
            await new.list_sessions(ALICE)
            await raises(UnauthenticatedError, old.list_sessions(ALICE))
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code(20) == 0
        assert ALICE_TOKEN not in server.text
        assert new_token not in server.text
    finally:
        await server.kill()


async def test_malformed_tokens_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# ok\n{ALICE_TOKEN} {ALICE}\n{BOB_TOKEN}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSION_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatsession_server", "--listen", "127.0.0.1:0",
        "--auth-tokens-file", str(path), stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 1, text
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, text
    assert f"{path}, line 3: expected" in errors[0]
    assert "Traceback" not in text
    assert BOB_TOKEN not in text


async def test_without_mtls_a_missing_token_is_refused_before_the_request_is_read(
    settings: Settings, valkey_url: str, tmp_path: Path
) -> None:
    # cert: lines cannot match anyone without --tls-client-ca: a call without a token is refused
    # from its metadata, so even a body that does not parse is UNAUTHENTICATED, not INVALID_ARGUMENT.
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE_TOKEN} {ALICE}\ncert:CN=billing-svc *\n")
    async with (
        serving(settings, valkey_url, auth_tokens_file=str(path)) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        raw_create: Any = channel.unary_unary("/chatsession.v1.SessionService/CreateSession")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_create(b"\xff\xff\xff not protobuf", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_unauthenticated_call_is_refused_before_its_request_arrives(
    auth_target: str,
) -> None:
    # The refusal asks for no request: a call whose request never comes (a client stream that
    # sends nothing and stays open) is answered at once. A handler that read the request first
    # would wait for it until the deadline.
    async with grpc.aio.insecure_channel(auth_target) as channel:
        never_sending: Any = channel.stream_unary("/chatsession.v1.SessionService/AppendMessages")
        waiting = asyncio.Event()

        async def nothing() -> AsyncIterator[bytes]:
            await waiting.wait()  # never set: the request never comes
            yield b""

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await never_sending(nothing(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
