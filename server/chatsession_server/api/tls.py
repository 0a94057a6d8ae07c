"""TLS and mTLS server credentials from PEM files, checked at start-up; warnings for an exposed server."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import grpc


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None without `cert`. With `client_ca`, clients must
    present a certificate it signed. Unreadable or mismatched files raise a one-line RuntimeError."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise RuntimeError("--tls-cert and --tls-key go together (--tls-client-ca needs both)")
    cert_pem, key_pem = _read("--tls-cert", cert), _read("--tls-key", key)
    ca_pem = _read("--tls-client-ca", client_ca) if client_ca else None
    # gRPC reports unusable PEM only when a client connects; OpenSSL here says so at start-up.
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        why = (
            "the key does not match the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "not a PEM certificate chain and an unencrypted PEM private key"
        )
        raise RuntimeError(f"--tls-cert {cert} / --tls-key {key}: {why}") from None
    if ca_pem is not None:
        try:
            check.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise RuntimeError(f"--tls-client-ca {client_ca}: no PEM CA certificate in it") from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warnings(listen: str, *, tls: bool, mtls: bool, auth: bool, cert_callers: bool) -> list[str]:
    """What an operator must hear about at start-up, one line each."""
    warnings = []
    if cert_callers and not mtls:
        warnings.append(
            "the auth tokens file has cert: lines but --tls-client-ca is not set: no client certificate "
            "is asked for, so they match nobody"
        )
    if is_loopback(listen):
        return warnings
    if not auth:
        warnings.append(
            f"NO CALLER AUTHENTICATION: listening on {listen} without --auth-tokens-file; anyone who can "
            "reach this port can read, change and delete every user's sessions"
        )
    if not tls:
        warnings.append(
            f"NO TLS: listening on {listen} without --tls-cert; messages and tokens cross the network "
            "in plaintext"
        )
    return warnings
