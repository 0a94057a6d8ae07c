"""Limits and quotas through a real server, channel and Valkey: open watches per connection and per
process, live sessions per user; and hostile load: a request of many empty messages (well inside
the 4 MiB limit) neither stalls the server's loop nor grows it, and a caller without credentials
(a token, or under mTLS a certificate that names a caller) cannot make the server parse its
requests."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from glide import GlideClient
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatsession.v1 import session_pb2, session_service_pb2_grpc
from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import NO_RETRY, SessionClient, user
from chatsession_client.errors import ResourceExhaustedError
from chatsession_server.app import RunningServer
from chatsession_server.settings import Settings
from tests.helpers import (
    connections,
    eventually,
    raises,
    serving,
    session_keys_exist,
    subscribe_calls,
    subscribers,
    watch,
)
from tests.pki import CertificateAuthority
from tests.processes import ServerProcess

PER_CONNECTION = 3
PER_PROCESS = 5
MESSAGES = 400_000


@pytest.fixture
async def quota_server(settings: Settings, valkey_url: str) -> AsyncIterator[RunningServer]:
    async with serving(
        settings, valkey_url, max_watchers=PER_PROCESS, max_watchers_per_connection=PER_CONNECTION
    ) as running:
        yield running


async def refused_watch(stub: session_service_pb2_grpc.SessionServiceStub, session_id: str) -> Any:
    """The QuotaFailure violation of a watch that must be refused with RESOURCE_EXHAUSTED."""
    call = stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10)
    return quota_violation(info.value)


def quota_violation(error: grpc.aio.AioRpcError) -> error_details_pb2.QuotaFailure.Violation:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    status = rpc_status.from_call(error)
    assert status is not None
    failures = []
    for detail in status.details:
        failure = error_details_pb2.QuotaFailure()
        assert detail.Unpack(failure)
        failures.append(failure)
    assert [len(f.violations) for f in failures] == [1], status
    violation: error_details_pb2.QuotaFailure.Violation = failures[0].violations[0]
    return violation


def test_quota_settings_come_from_flags_and_environment() -> None:
    defaults = Settings()
    assert (defaults.max_watchers, defaults.max_watchers_per_connection) == (20_000, 5000)
    assert defaults.max_sessions_per_user == 0
    s = Settings.from_sources(
        ["--max-watchers", "7", "--max-sessions-per-user", "3"],
        {"CHATSESSION_MAX_WATCHERS_PER_CONNECTION": "2"},
    )
    assert (s.max_watchers, s.max_watchers_per_connection, s.max_sessions_per_user) == (7, 2, 3)
    for name, bad in (
        ("max_watchers", 0),
        ("max_watchers_per_connection", -1),
        ("max_sessions_per_user", -1),
    ):
        change: dict[str, Any] = {name: bad}
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(defaults, **change)


async def test_watches_per_connection_are_limited_and_a_cancel_frees_a_place(
    quota_server: RunningServer, raw: GlideClient, uid: str
) -> None:
    target = f"127.0.0.1:{quota_server.port}"
    async with SessionClient(target, retry=NO_RETRY) as client:
        watched = (await client.create_session(uid)).session_id
        unwatched = (await client.create_session(uid)).session_id
        probe = (await client.create_session(uid)).session_id
    async with connections(target, 2) as (first, second):
        calls = [await watch(first, watched) for _ in range(PER_CONNECTION)]
        assert quota_server.watch_quota.watchers == PER_CONNECTION
        subscribes_before = await subscribe_calls(raw)

        violation = await refused_watch(first, unwatched)
        assert violation.quota_id == "max_watchers_per_connection"
        assert violation.quota_value == PER_CONNECTION
        assert violation.subject.startswith("connection ipv")
        assert "--max-watchers-per-connection" in violation.description
        assert quota_server.watch_quota.watchers == PER_CONNECTION
        # Refused before the watch joined the feed: nothing was subscribed for it. A watch admitted
        # after it (of another session, on another connection) is live once its own subscription
        # round is done, which would have carried the refused one's channel too; it is subscribed.
        probing = await watch(second, probe)
        assert await subscribers(raw, f"watch:{{{probe}}}") == 1
        assert await subscribers(raw, f"watch:{{{unwatched}}}") == 0
        assert await subscribe_calls(raw) == subscribes_before + 1  # the probe's
        probing.cancel()
        await eventually(lambda: quota_server.watch_quota.watchers == PER_CONNECTION)

        # Another connection has places of its own.
        other = await watch(second, unwatched)
        assert quota_server.watch_quota.watchers == PER_CONNECTION + 1

        calls.pop().cancel()
        await eventually(lambda: quota_server.watch_quota.watchers == PER_CONNECTION)
        calls.append(await watch(first, watched))

        # The watchers that were let in are served as usual.
        async with SessionClient(target, retry=NO_RETRY) as client:
            await client.append(watched, [user("to all three")])
        events = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), 10)
        assert [e.message.content for e in events] == ["to all three"] * PER_CONNECTION
        for call in [*calls, other]:
            call.cancel()
        await eventually(lambda: quota_server.watch_quota.watchers == 0)


async def test_watches_per_process_are_limited_over_all_connections(
    quota_server: RunningServer, uid: str
) -> None:
    target = f"127.0.0.1:{quota_server.port}"
    async with SessionClient(target, retry=NO_RETRY) as client:
        session_id = (await client.create_session(uid)).session_id
    async with connections(target, 3) as (first, second, third):
        calls = [await watch(first, session_id) for _ in range(PER_CONNECTION)]
        calls += [await watch(second, session_id) for _ in range(PER_PROCESS - PER_CONNECTION)]
        assert quota_server.watch_quota.watchers == PER_PROCESS
        for stub in (second, third):  # both have room on their connection, the server has none
            violation = await refused_watch(stub, session_id)
            assert violation.quota_id == "max_watchers"
            assert violation.quota_value == PER_PROCESS
            assert "--max-watchers" in violation.description
        assert quota_server.watch_quota.watchers == PER_PROCESS

        calls.pop(0).cancel()  # a place on the first connection frees a place in the server
        await eventually(lambda: quota_server.watch_quota.watchers == PER_PROCESS - 1)
        calls.append(await watch(third, session_id))
        for call in calls:
            call.cancel()
        await eventually(lambda: quota_server.watch_quota.watchers == 0)


async def test_watches_that_end_on_their_own_give_their_place_back(
    quota_server: RunningServer, uid: str
) -> None:
    target = f"127.0.0.1:{quota_server.port}"
    async with SessionClient(target, retry=NO_RETRY) as client:
        session_id = (await client.create_session(uid)).session_id
        async with connections(target, 1) as (stub,):
            # Refused by the watch itself, after it was admitted: FAILED_PRECONDITION, NOT_FOUND.
            for request in (
                pb.WatchMessagesRequest(session_id=session_id, after_seq=99),
                pb.WatchMessagesRequest(session_id=f"{uid}-missing"),
            ):
                for _ in range(PER_CONNECTION + 1):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.WatchMessages(request).read()
                    assert info.value.code() in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.NOT_FOUND,
                    )
            assert quota_server.watch_quota.watchers == 0
            calls = [await watch(stub, session_id) for _ in range(PER_CONNECTION)]
            await client.delete_session(session_id)  # ends every watch of it with NOT_FOUND
            for call in calls:
                assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.NOT_FOUND
            assert quota_server.watch_quota.watchers == 0


async def test_servers_in_one_process_count_their_own_watchers(
    quota_server: RunningServer, settings: Settings, valkey_url: str, uid: str
) -> None:
    async with serving(settings, valkey_url, max_watchers=1) as other:
        target = f"127.0.0.1:{other.port}"
        async with SessionClient(target, retry=NO_RETRY) as client:
            session_id = (await client.create_session(uid)).session_id
        async with connections(target, 1) as (stub,):
            call = await watch(stub, session_id)
            assert (other.watch_quota.watchers, quota_server.watch_quota.watchers) == (1, 0)
            call.cancel()
            await eventually(lambda: other.watch_quota.watchers == 0)


async def test_callers_turned_away_by_authentication_are_not_counted(
    settings: Settings, valkey_url: str, tmp_path: Path, uid: str
) -> None:
    token = "quota-token-" + uuid.uuid4().hex
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} *\n")
    async with serving(
        settings, valkey_url, auth_tokens_file=str(tokens), max_watchers=1, max_watchers_per_connection=1
    ) as running:
        target = f"127.0.0.1:{running.port}"
        async with SessionClient(target, retry=NO_RETRY, token=token) as client:
            session_id = (await client.create_session(uid)).session_id
        async with connections(target, 1) as (stub,):
            call = await watch(stub, session_id, token)
            # The server is full, but an unknown caller hears only that it is unknown.
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.WatchMessages(pb.WatchMessagesRequest(session_id=session_id)).read()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert running.watch_quota.watchers == 1
            call.cancel()
            await eventually(lambda: running.watch_quota.watchers == 0)


async def test_sessions_per_user_are_limited_at_create(
    settings: Settings, valkey_url: str, raw: GlideClient, uid: str
) -> None:
    alice, bob = f"{uid}-alice", f"{uid}-bob"
    async with (
        serving(settings, valkey_url, max_sessions_per_user=2) as running,
        SessionClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as client,
    ):
        first = await client.create_session(alice, request_id="first")
        second = await client.create_session(alice, request_id="second")
        refused = f"{uid}-third"
        error = await raises(ResourceExhaustedError, client.create_session(alice, session_id=refused))
        assert "--max-sessions-per-user" in error.message
        assert [(v.quota_id, v.quota_value) for v in error.quota_violations] == [("max_sessions_per_user", 2)]
        assert await session_keys_exist(raw, refused) == 0
        assert await raw.zscore(f"user_sessions:{{{alice}}}", refused) is None
        assert [s.session_id async for s in client.iter_sessions(alice)] == [
            second.session_id,
            first.session_id,
        ]
        # A retry of a create that went through is a replay, not a new session.
        assert (await client.create_session(alice, request_id="second")).session_id == second.session_id
        # Each user counts apart; a deleted or expired session frees its place.
        await client.create_session(bob)
        await client.delete_session(first.session_id)
        short = await client.create_session(alice, ttl_seconds=1)
        await raises(ResourceExhaustedError, client.create_session(alice))

        async def expired() -> bool:
            return await session_keys_exist(raw, short.session_id) == 0

        await eventually(expired)
        assert await session_keys_exist(raw, short.session_id) == 0
        await client.create_session(alice, session_id=refused)
        assert {s.session_id async for s in client.iter_sessions(alice)} == {second.session_id, refused}


async def test_the_quota_failure_of_a_refused_create_names_the_user_and_limit(
    settings: Settings, valkey_url: str, uid: str
) -> None:
    async with (
        serving(settings, valkey_url, max_sessions_per_user=1) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        await stub.CreateSession(pb.CreateSessionRequest(user_id=uid))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSession(pb.CreateSessionRequest(user_id=uid))
        violation = quota_violation(info.value)
        assert (violation.quota_id, violation.quota_value) == ("max_sessions_per_user", 1)
        assert violation.subject == f"user {uid}"


# -- hostile load


async def start_server_process(*args: str) -> tuple[ServerProcess, int]:
    server = await ServerProcess.start("--listen", "127.0.0.1:0", *args)
    [serving] = await server.wait_for(r"serving on [\d.]+:(\d+)")
    return server, int(serving.group(1))


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


@pytest.mark.standalone_only
async def test_a_request_of_many_empty_messages_does_not_stall_the_server() -> None:
    server, port = await start_server_process()
    proc = server.proc
    try:
        target = f"127.0.0.1:{port}"
        async with SessionClient(target) as client:
            s = await client.create_session("u")
            before_mb = peak_rss_mb(proc.pid)
            entry = pb.AppendMessagesRequest(messages=[session_pb2.Message()]).SerializeToString()
            hostile = pb.AppendMessagesRequest(session_id=s.session_id).SerializeToString() + entry * MESSAGES
            async with grpc.aio.insecure_channel(target) as channel:
                raw_append: Any = channel.unary_unary("/chatsession.v1.SessionService/AppendMessages")
                call = asyncio.ensure_future(raw_append(hostile, timeout=120))
                # GetSession after GetSession for as long as the hostile call is out, from before
                # it reaches the server until its answer: one of them is always waiting meanwhile.
                waits: list[float] = []
                while not waits or not call.done():
                    started = time.monotonic()
                    await client.get_session(s.session_id)
                    waits.append(time.monotonic() - started)
                waited = max(waits)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
            grown_mb = peak_rss_mb(proc.pid) - before_mb
    finally:
        proc.send_signal(signal.SIGTERM)
        await server.exit_code(20)
    print(
        f"{len(waits)} GetSession calls, the longest waited {waited:.1f} s; "
        f"server peak RSS grew {grown_mb} MB"
    )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert waited < 1.0, f"an unrelated GetSession waited {waited:.1f} s"
    assert grown_mb < 100, f"server peak RSS grew {grown_mb} MB"


async def hostile_appends(
    calls: int, megabytes: int, *flags: str, credentials: grpc.ChannelCredentials | None = None
) -> tuple[set[grpc.StatusCode], int]:
    """The codes of `calls` concurrent AppendMessages requests of `megabytes` MB of empty messages
    (2 bytes each: under --max-request-bytes, 4 MiB, up to 4 MB) to a server process started with
    `flags`, and how many MB its peak RSS grew meanwhile."""
    server, port = await start_server_process(*flags)
    proc = server.proc
    try:
        before_mb = peak_rss_mb(proc.pid)
        entry = pb.AppendMessagesRequest(messages=[session_pb2.Message()]).SerializeToString()
        hostile = pb.AppendMessagesRequest(session_id="x").SerializeToString() + entry * (megabytes * 500_000)
        target = f"127.0.0.1:{port}"
        async with (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        ) as channel:
            raw_append: Any = channel.unary_unary("/chatsession.v1.SessionService/AppendMessages")
            errors = await asyncio.gather(
                *(raw_append(hostile, timeout=60) for _ in range(calls)), return_exceptions=True
            )
        grown_mb = peak_rss_mb(proc.pid) - before_mb
    finally:
        proc.send_signal(signal.SIGTERM)
        await server.exit_code(20)
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors), errors
    return {e.code() for e in errors if isinstance(e, grpc.aio.AioRpcError)}, grown_mb


@pytest.mark.standalone_only
async def test_an_unauthenticated_caller_cannot_make_the_server_parse_its_requests(tmp_path: Path) -> None:
    """A caller without a valid token is refused from the metadata (in `handler_call_details`)
    before its request is deserialized: two concurrent 2 MB requests grow the server's peak RSS
    by less than 50 MB (authenticated inside the handler, after parsing, 4 requests of 4 MiB took
    a server from 67 MB to 1018 MB)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-of-the-only-caller alice\n")
    codes, grown_mb = await hostile_appends(2, 2, "--auth-tokens-file", str(tokens))
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    assert grown_mb < 50, f"server peak RSS grew {grown_mb} MB for two unauthenticated calls"


@pytest.mark.standalone_only
async def test_a_certificate_that_names_no_caller_cannot_make_the_server_read_its_requests(
    tmp_path: Path,
) -> None:
    """Under mTLS, a client whose certificate the CA signed but no `cert:` line names (any
    workload of a service mesh) is refused before its request is read: four concurrent requests
    of 4 MB grow the server's peak RSS by less than 50 MB (when the certificate was matched after
    gRPC had read and parsed them, by 1065 MB)."""
    ca = CertificateAuthority(tmp_path, "ca")
    server_identity, workload = ca.issue("server", server=True), ca.issue("some-mesh-workload")
    tokens = tmp_path / "tokens"
    tokens.write_text("cert:CN=the-only-caller alice\n")
    codes, grown_mb = await hostile_appends(
        4,
        4,
        "--auth-tokens-file", str(tokens),
        "--tls-cert", str(server_identity.cert), "--tls-key", str(server_identity.key),
        "--tls-client-ca", str(ca.cert),
        credentials=grpc.ssl_channel_credentials(ca.cert_pem, workload.key_pem, workload.cert_pem),
    )  # fmt: skip
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    assert grown_mb < 50, f"server peak RSS grew {grown_mb} MB for four calls of an unlisted certificate"
