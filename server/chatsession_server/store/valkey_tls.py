"""Why Valkey refused a connection at start-up, in one line.

GLIDE reports a TLS handshake that fails (a certificate the CA did not sign, a name that does
not match) only as "timed out" once the connection timeout has passed. A handshake of our own
with Python's `ssl`, against the same CA certificates, tells the operator what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from chatsession_server.settings import ValkeyAddress

HANDSHAKE_TIMEOUT_SECONDS = 2.0


async def connect_failure(
    address: ValkeyAddress, error: Exception, *, root_certificates: bytes | None, insecure_tls: bool
) -> str | None:
    """One line on why connecting to `address` failed with `error`, when waiting will not help
    (the password or the TLS certificates are wrong); None when Valkey may just not be up yet.
    Never holds the password."""
    why = str(error.__cause__ or error).strip()
    if any(sign in why for sign in _REFUSED):
        return f"cannot connect to Valkey at {address.redacted()}: {why}"
    if address.use_tls and not insecure_tls:
        tls = await tls_handshake_failure(address.host, address.port, root_certificates)
        if tls:
            return f"cannot connect to Valkey at {address.redacted()}: {tls}"
    return None


_REFUSED = ("WRONGPASS", "NOAUTH", "invalid username-password", "AuthenticationFailed")


async def tls_handshake_failure(host: str, port: int, root_certificates: bytes | None) -> str | None:
    """What a TLS handshake with host:port finds wrong, verified against `root_certificates`
    (PEM; None: the system's); None when the handshake succeeds or nothing answers at all."""
    context = ssl.create_default_context(
        cadata=root_certificates.decode("ascii", "replace") if root_certificates else None
    )
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), HANDSHAKE_TIMEOUT_SECONDS
        )
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the server's certificate does not verify: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except (OSError, TimeoutError):
        return None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
