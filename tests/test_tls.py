"""TLS and mTLS with a throwaway CA: grpcurl and the Python client against a real server; a
certificate that no tokens file line names is refused before its request is read, while a listed
one's calls are logged, counted, traced, error-mapped and held to the watch quota as any call."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_client import (
    NO_RETRY,
    NotFoundError,
    PermissionDeniedError,
    SessionClient,
    UnauthenticatedError,
    UnavailableError,
    user,
)
from chatsession_server.api.auth import AuthInterceptor, CertificateGate
from chatsession_server.api.observer import ACCESS_LOGGER
from chatsession_server.api.telemetry import Telemetry
from chatsession_server.api.tls import exposure_warnings, server_credentials
from chatsession_server.app import RunningServer, start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import eventually, grpcurl, raises, serving, watch
from tests.pki import CertificateAuthority, Issued

RUN = uuid.uuid4().hex[:8]
ALICE, BOB = f"alice-{RUN}", f"bob-{RUN}"
BOB_TOKEN = "bob-token-" + uuid.uuid4().hex
SPIFFE_BOB = "spiffe://example.org/bob"
HEALTH = "grpc.health.v1.Health/Check"
SERVICE = "chatsession.v1.SessionService"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued
    alice: Issued  # CN=svc-alice
    bob: Issued  # CN=svc-bob-uri, URI SAN spiffe://example.org/bob
    nobody: Issued  # signed by the CA, named in no tokens file line
    stranger: Issued  # CN=svc-alice, signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "ca")
    other = CertificateAuthority(directory, "other-ca")
    return Pki(
        ca=ca,
        server=ca.issue("server", server=True),
        alice=ca.issue("svc-alice"),
        bob=ca.issue("svc-bob-uri", uris=(SPIFFE_BOB,)),
        nobody=ca.issue("svc-nobody"),
        stranger=other.issue("svc-alice"),
    )


@pytest.fixture(scope="module")
async def tls_target(settings: Settings, valkey_url: str, pki: Pki) -> AsyncIterator[str]:
    async with serving(
        settings, valkey_url, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key)
    ) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
async def mtls_target(
    settings: Settings, valkey_url: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    tokens = tmp_path_factory.mktemp("mtls") / "tokens"
    tokens.write_text(f"cert:CN=svc-alice {ALICE}\ncert:SAN={SPIFFE_BOB} {BOB}\n{BOB_TOKEN} {BOB}\n")
    async with serving(
        settings,
        valkey_url,
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.cert),
        auth_tokens_file=str(tokens),
    ) as running:
        yield f"127.0.0.1:{running.port}"


def tls_client(
    target: str, pki: Pki, identity: Issued | None = None, token: str | None = None
) -> SessionClient:
    return SessionClient(
        target,
        retry=NO_RETRY,
        timeout=5,
        token=token,
        root_certificates=pki.ca.cert_pem,
        private_key=identity.key_pem if identity else None,
        certificate_chain=identity.cert_pem if identity else None,
    )


# --- TLS ---------------------------------------------------------------------------------------


async def test_python_client_over_tls(tls_target: str, pki: Pki, uid: str) -> None:
    async with tls_client(tls_target, pki) as client:
        created = await client.create_session(ALICE, session_id=uid, title="over TLS")
        assert (await client.get_session(created.session_id)).title == "over TLS"
    ready_made = grpc.ssl_channel_credentials(pki.ca.cert_pem)
    async with SessionClient(tls_target, credentials=ready_made, tls=True, retry=NO_RETRY) as client:
        assert (await client.get_session(created.session_id)).title == "over TLS"


async def test_plaintext_or_untrusting_client_cannot_talk_to_a_tls_server(tls_target: str, pki: Pki) -> None:
    async with SessionClient(tls_target, retry=NO_RETRY, timeout=5) as plaintext:
        await raises(UnavailableError, plaintext.list_sessions(ALICE))
    other_ca = pki.stranger.cert.parent / "other-ca.pem"
    async with SessionClient(
        tls_target, retry=NO_RETRY, timeout=5, root_certificates=other_ca.read_bytes()
    ) as untrusting:
        await raises(UnavailableError, untrusting.list_sessions(ALICE))


async def test_grpcurl_over_tls(tls_target: str, pki: Pki) -> None:
    code, out = await grpcurl("-cacert", str(pki.ca.cert), tls_target, "list")
    assert code == 0, out
    assert "chatsession.v1.SessionService" in out.split()
    code, out = await grpcurl("-cacert", str(pki.ca.cert), tls_target, HEALTH)
    assert code == 0, out
    assert "SERVING" in out
    # grpcurl keeps dialling until its connect timeout: a failure cannot come sooner.
    code, out = await grpcurl("-connect-timeout", "1", "-plaintext", tls_target, HEALTH)
    assert code != 0, out


# --- mTLS --------------------------------------------------------------------------------------


async def test_mtls_requires_a_client_certificate_from_the_client_ca(mtls_target: str, pki: Pki) -> None:
    for identity in (None, pki.stranger):
        async with tls_client(mtls_target, pki, identity, token=BOB_TOKEN) as client:
            await raises(UnavailableError, client.list_sessions(BOB))
    async with tls_client(mtls_target, pki, pki.nobody, token=BOB_TOKEN) as client:
        await client.list_sessions(BOB)  # the certificate opens the connection, the token names bob

    ca = ("-cacert", str(pki.ca.cert))
    code, out = await grpcurl("-connect-timeout", "1", *ca, mtls_target, HEALTH)
    assert code != 0, out
    code, out = await grpcurl(
        *ca, "-cert", str(pki.alice.cert), "-key", str(pki.alice.key), mtls_target, HEALTH
    )
    assert code == 0, out
    assert "SERVING" in out


async def test_certificate_subject_stands_for_a_token(mtls_target: str, pki: Pki, uid: str) -> None:
    async with (
        tls_client(mtls_target, pki, pki.alice) as alice,
        tls_client(mtls_target, pki, pki.bob) as bob,
        tls_client(mtls_target, pki, pki.nobody) as nobody,
    ):
        mine = await alice.create_session(ALICE, session_id=f"{ALICE}/{uid}-a")
        theirs = await bob.create_session(BOB, session_id=f"{BOB}/{uid}-b")  # by its URI subjectAltName
        assert (await alice.get_session(mine.session_id)).user_id == ALICE
        await raises(NotFoundError, alice.get_session(theirs.session_id))
        await raises(PermissionDeniedError, alice.list_sessions(BOB))
        await raises(NotFoundError, bob.get_session(mine.session_id))
        error = await raises(UnauthenticatedError, nobody.get_session(mine.session_id))
        assert "no credentials" in error.message

    # A bearer token, when sent, decides: alice's certificate with bob's token acts as bob.
    async with tls_client(mtls_target, pki, pki.alice, token=BOB_TOKEN) as as_bob:
        assert (await as_bob.get_session(theirs.session_id)).user_id == BOB
        await raises(NotFoundError, as_bob.get_session(mine.session_id))

    cert = ("-cacert", str(pki.ca.cert), "-cert", str(pki.alice.cert), "-key", str(pki.alice.key))
    body = f'{{"session_id": "{mine.session_id}"}}'
    code, out = await grpcurl(*cert, "-d", body, mtls_target, "chatsession.v1.SessionService/GetSession")
    assert code == 0, out
    assert ALICE in out


# --- a certificate is checked before the request is read ---------------------------------------


@dataclass
class Gated:
    """An mTLS server with cert: lines and a token, everything that wraps a call switched on."""

    running: RunningServer
    target: str
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader


def write_tokens(tokens: Path) -> None:
    tokens.write_text(f"cert:CN=svc-alice {ALICE}\ncert:SAN={SPIFFE_BOB} {BOB}\n{BOB_TOKEN} {BOB}\n")


@asynccontextmanager
async def gated_server(
    settings: Settings, valkey_url: str, pki: Pki, tokens: Path, **overrides: Any
) -> AsyncIterator[Gated]:
    """With access log (when its logger is at INFO before the start), metrics and tracing on, and
    --max-request-bytes at 1 MiB: a request over it is RESOURCE_EXHAUSTED once gRPC reads it."""
    write_tokens(tokens)
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    telemetry = Telemetry(
        meter_provider=MeterProvider(metric_readers=[metrics]), tracer_provider=tracer_provider
    )
    configured = dataclasses.replace(
        settings,
        listen="127.0.0.1:0",
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.cert),
        auth_tokens_file=str(tokens),
        max_request_bytes=MIB,
        **overrides,
    )
    running = await start_server(configured, ValkeyAddress.parse(valkey_url), telemetry=telemetry)
    try:
        yield Gated(running, f"127.0.0.1:{running.port}", spans, metrics)
    finally:
        await running.stop(1.0)


def mtls_channel(target: str, pki: Pki, identity: Issued) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem, identity.key_pem, identity.cert_pem)
    return grpc.aio.secure_channel(target, credentials, options=[("grpc.max_send_message_length", 64 * MIB)])


async def raw_call(
    channel: grpc.aio.Channel, method: str, body: bytes, *, token: str | None = None
) -> grpc.aio.AioRpcError:
    """The error of a call of `method` with `body` as its request bytes (WatchMessages: of its
    first read)."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    path = f"/{SERVICE}/{method}"
    # Without serializers: the bytes go as they are, the replies come as bytes.
    streaming: Any = channel.unary_stream(path)
    unary: Any = channel.unary_unary(path)
    try:
        if method == "WatchMessages":
            await streaming(body, metadata=metadata, timeout=10).read()
        else:
            await unary(body, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"{method} succeeded")


async def test_a_certificate_no_line_names_is_refused_before_its_request_is_read(
    settings: Settings, valkey_url: str, pki: Pki, tmp_path: Path
) -> None:
    # Over the server's --max-request-bytes: a call gRPC reads is RESOURCE_EXHAUSTED, whoever
    # sent it; only a call refused before its request is read can be UNAUTHENTICATED.
    too_large = b"\x0a" + b"x" * (2 * MIB)
    async with (
        gated_server(settings, valkey_url, pki, tmp_path / "tokens") as gated,
        mtls_channel(gated.target, pki, pki.nobody) as nobody,
        mtls_channel(gated.target, pki, pki.alice) as alice,
    ):
        for method in ("AppendMessages", "GetSession", "WatchMessages"):
            refused = await raw_call(nobody, method, too_large)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, (method, refused)
            assert "no credentials" in (refused.details() or "")
            # The same bytes from a certificate that names a caller, or with a token: read.
            for channel, token in ((alice, None), (nobody, BOB_TOKEN)):
                read = await raw_call(channel, method, too_large, token=token)
                assert read.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, token, read)
            # A token decides over any certificate: an unknown one is refused from the metadata.
            for channel in (alice, nobody):
                unknown = await raw_call(channel, method, too_large, token="not-a-token-of-this-server")
                assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED, (method, unknown)
                assert "unknown token" in (unknown.details() or "")
        # A refused watch never held a place.
        assert gated.running.watch_quota.watchers == 0
        async with tls_client(gated.target, pki, pki.alice) as client:
            assert await client.list_sessions(ALICE) is not None  # the server is still well


async def test_a_certificate_call_that_sends_no_request_is_answered_as_grpc_answers_a_unary_one(
    settings: Settings, valkey_url: str, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call ended by its client without a message (possible on the wire, not from a stub): with
    a token gRPC's own unary path reads it and never answers; read by the certificate gate it is
    the same, and neither leaves an error in the log."""
    caplog.set_level(logging.DEBUG)
    async with (
        gated_server(settings, valkey_url, pki, tmp_path / "tokens") as gated,
        mtls_channel(gated.target, pki, pki.alice) as alice,
    ):
        for token in (BOB_TOKEN, None):
            metadata = () if token is None else (("authorization", f"Bearer {token}"),)
            for method in ("GetSession", "WatchMessages"):
                nothing: Any = alice.stream_unary(f"/{SERVICE}/{method}")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await nothing(iter(()), metadata=metadata, timeout=0.5)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (token, method)
        # And the server goes on serving that connection.
        await session_service_pb2_grpc.SessionServiceStub(alice).ListSessions(
            pb.ListSessionsRequest(user_id=ALICE)
        )
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_listed_certificate_works_for_every_kind_of_call(
    settings: Settings, valkey_url: str, pki: Pki, tmp_path: Path, uid: str
) -> None:
    async with (
        gated_server(settings, valkey_url, pki, tmp_path / "tokens") as gated,
        tls_client(gated.target, pki, pki.alice) as alice,
        tls_client(gated.target, pki, pki.bob) as bob,
    ):
        session_id = f"{ALICE}/{uid}"
        await alice.create_session(ALICE, session_id=session_id, title="by certificate")
        await alice.append(session_id, [user("one"), user("two")], request_id="turn-1")
        assert [m.content for m in (await alice.list_messages(session_id)).messages] == ["one", "two"]
        assert (await alice.get_context(session_id)).messages[-1].content == "two"
        assert session_id in [s.session_id for s in (await alice.list_sessions(ALICE)).sessions]
        await raises(NotFoundError, bob.get_session(session_id))  # bob's certificate acts for bob

        # A server stream: what was there, then what comes while it is open.
        events = alice.watch(session_id, after_seq=0)
        try:
            seen = [(await asyncio.wait_for(anext(events), 10)).message.content for _ in range(2)]
            await alice.append(session_id, [user("three")])
            seen.append((await asyncio.wait_for(anext(events), 10)).message.content)
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # an async generator
        assert seen == ["one", "two", "three"]

        # Bytes that do not parse: INVALID_ARGUMENT naming no field, unary and streaming alike.
        async with mtls_channel(gated.target, pki, pki.alice) as channel:
            for method in ("GetSession", "WatchMessages"):
                error = await raw_call(channel, method, b"\xff\xff\xff")
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
                status = rpc_status.from_call(error)
                assert status is not None
                request = error_details_pb2.BadRequest()
                assert [detail.Unpack(request) for detail in status.details] == [True]
                assert [v.field for v in request.field_violations] == [""]
                assert "does not parse" in (error.details() or "")


async def test_a_certificate_callers_calls_are_logged_counted_and_traced(
    settings: Settings,
    valkey_url: str,
    pki: Pki,
    tmp_path: Path,
    uid: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)  # before the start: the access log is on
    session_id = f"{ALICE}/{uid}"
    async with gated_server(settings, valkey_url, pki, tmp_path / "tokens") as gated:
        async with tls_client(gated.target, pki, pki.alice) as alice:
            await alice.create_session(ALICE, session_id=session_id)
        async with (
            mtls_channel(gated.target, pki, pki.alice) as alice_channel,
            mtls_channel(gated.target, pki, pki.nobody) as nobody_channel,
        ):
            stub = session_service_pb2_grpc.SessionServiceStub(alice_channel)
            await stub.GetSession(pb.GetSessionRequest(session_id=session_id))
            watched = await watch(stub, session_id)
            watched.cancel()
            await raw_call(alice_channel, "GetSession", b"\xff\xff\xff")
            stranger = session_service_pb2_grpc.SessionServiceStub(nobody_channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stranger.GetSession(pb.GetSessionRequest(session_id=session_id))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await raw_call(
                nobody_channel,
                "WatchMessages",
                pb.WatchMessagesRequest(session_id=session_id).SerializeToString(),
            )

            def logged() -> list[tuple[str, str, str, str]]:
                # The observer's fields, as the JSON log writes them (`extra=`).
                lines = [vars(r)["access"] for r in caplog.records if r.name == ACCESS_LOGGER]
                return [
                    (line["method"].rpartition("/")[2], line["code"], line["session_id"], line["user"])
                    for line in lines
                    if line["method"].endswith(("/GetSession", "/WatchMessages"))
                ]

            expected = [
                ("GetSession", "OK", session_id, ALICE),
                ("WatchMessages", "CANCELLED", session_id, ALICE),
                ("GetSession", "INVALID_ARGUMENT", "", ""),  # refused before auth, as with a token
                ("GetSession", "UNAUTHENTICATED", "", ""),
                ("WatchMessages", "UNAUTHENTICATED", "", ""),
            ]
            await eventually(lambda: sorted(logged()) == sorted(expected))
            assert gated.running.watch_quota.watchers == 0

    counted: dict[tuple[str, str], int] = {}
    data = gated.metrics.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "rpc.server.call.duration":
                    for point in metric.data.data_points:
                        attributes = point.attributes or {}
                        key = (str(attributes["rpc.method"]), str(attributes["rpc.response.status_code"]))
                        counted[key] = counted.get(key, 0) + int(getattr(point, "count", 0))
    assert counted[("GetSession", "OK")] == 1
    assert counted[("GetSession", "INVALID_ARGUMENT")] == 1
    assert counted[("GetSession", "UNAUTHENTICATED")] == 1
    assert counted[("WatchMessages", "CANCELLED")] == 1
    assert counted[("WatchMessages", "UNAUTHENTICATED")] == 1

    codes: dict[str, list[int]] = {}
    for span in gated.spans.get_finished_spans():
        assert span.attributes is not None
        codes.setdefault(span.name.rpartition("/")[2], []).append(
            int(str(span.attributes["rpc.grpc.status_code"]))
        )
    # The request that does not parse is refused by the error mapping, outside the span, as any is.
    assert sorted(codes["GetSession"]) == [0, 16]
    assert sorted(codes["WatchMessages"]) == [1, 16]


async def test_certificate_callers_watches_hold_places_in_the_watch_quota(
    settings: Settings, valkey_url: str, pki: Pki, tmp_path: Path, uid: str
) -> None:
    session_id = f"{ALICE}/{uid}"
    async with gated_server(
        settings, valkey_url, pki, tmp_path / "tokens", max_watchers_per_connection=1
    ) as gated:
        async with tls_client(gated.target, pki, pki.alice) as alice:
            await alice.create_session(ALICE, session_id=session_id)
        request = pb.WatchMessagesRequest(session_id=session_id).SerializeToString()
        async with (
            mtls_channel(gated.target, pki, pki.alice) as alice_channel,
            mtls_channel(gated.target, pki, pki.nobody) as nobody_channel,
        ):
            held = await watch(session_service_pb2_grpc.SessionServiceStub(alice_channel), session_id)
            assert gated.running.watch_quota.watchers == 1
            full = await raw_call(alice_channel, "WatchMessages", request)
            assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-watchers-per-connection" in (full.details() or "")
            # A certificate that names nobody is told only that, and holds no place.
            refused = await raw_call(nobody_channel, "WatchMessages", request)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert gated.running.watch_quota.watchers == 1
            held.cancel()
            await eventually(lambda: gated.running.watch_quota.watchers == 0)


def test_the_certificate_gate_will_not_take_a_stream_it_would_have_to_iterate(tmp_path: Path) -> None:
    """It runs a stream as the coroutine that writes it (the error mapping's): one made another
    way fails the call rather than pass unread or unauthenticated."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens)
    gate = CertificateGate(AuthInterceptor(str(tokens), (), client_certificates=True))

    async def iterated(request: Any, context: Any) -> AsyncIterator[Any]:
        yield request

    with pytest.raises(TypeError, match="written by a coroutine"):
        gate.wrap(grpc.unary_stream_rpc_method_handler(iterated), f"/{SERVICE}/WatchMessages")


# --- start-up errors ---------------------------------------------------------------------------


def test_bad_tls_files_are_one_line_start_up_errors(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key, ca = str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)
    cases = [
        ((str(tmp_path / "missing.pem"), key, ""), "cannot read --tls-cert"),
        ((cert, str(tmp_path / "missing.key"), ""), "cannot read --tls-key"),
        ((cert, str(pki.alice.key), ""), "the key does not match the certificate"),
        ((str(garbage), key, ""), "not a PEM certificate chain"),
        ((cert, "", ""), "--tls-cert and --tls-key go together"),
        (("", "", ca), "--tls-cert and --tls-key go together"),
        ((cert, key, str(garbage)), "--tls-client-ca"),
        ((cert, key, str(tmp_path / "missing-ca.pem")), "cannot read --tls-client-ca"),
    ]
    for (cert_path, key_path, ca_path), says in cases:
        with pytest.raises(RuntimeError) as info:
            server_credentials(cert_path, key_path, ca_path)
        assert says in str(info.value), (cert_path, key_path, ca_path)
        assert "\n" not in str(info.value)
    assert server_credentials("", "", "") is None
    assert server_credentials(cert, key, ca) is not None


async def test_start_server_refuses_a_mismatched_key_before_connecting(pki: Pki) -> None:
    # An unreachable Valkey: the bad key must be reported first, at once.
    settings = Settings(listen="127.0.0.1:0", tls_cert=str(pki.server.cert), tls_key=str(pki.alice.key))
    with pytest.raises(RuntimeError, match="the key does not match"):
        await start_server(settings, ValkeyAddress.parse("valkey://127.0.0.1:1"))


def test_client_rejects_both_credentials_and_pem(pki: Pki) -> None:
    with pytest.raises(ValueError, match="either credentials"):
        SessionClient(
            "localhost:1",
            root_certificates=pki.ca.cert_pem,
            credentials=grpc.ssl_channel_credentials(),
        )


def test_cert_lines_without_a_client_ca_are_warned_about() -> None:
    warnings = exposure_warnings("127.0.0.1:1", tls=True, mtls=False, auth=True, cert_callers=True)
    assert len(warnings) == 1
    assert "--tls-client-ca is not set" in warnings[0]
    assert exposure_warnings("127.0.0.1:1", tls=True, mtls=True, auth=True, cert_callers=True) == []
