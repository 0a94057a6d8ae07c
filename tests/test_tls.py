"""TLS and mTLS with a throwaway CA: grpcurl and the Python client against a real server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from chatsession_client import (
    NO_RETRY,
    NotFoundError,
    PermissionDeniedError,
    SessionClient,
    UnauthenticatedError,
    UnavailableError,
)
from chatsession_server.api.tls import exposure_warnings, server_credentials
from chatsession_server.app import start_server
from chatsession_server.settings import Settings, ValkeyAddress
from tests.helpers import grpcurl, raises, serving
from tests.pki import CertificateAuthority, Issued

RUN = uuid.uuid4().hex[:8]
ALICE, BOB = f"alice-{RUN}", f"bob-{RUN}"
BOB_TOKEN = "bob-token-" + uuid.uuid4().hex
SPIFFE_BOB = "spiffe://example.org/bob"
HEALTH = "grpc.health.v1.Health/Check"


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
