"""The one place the store reaches Valkey through: a GLIDE client plus error translation.

Holds a `GlideClient` today; a `GlideClusterClient` has the same command methods, so cluster
support adds a constructor and `ClusterBatch` here, not changes across the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import glide
from glide import (
    AdvancedGlideClientConfiguration,
    BackoffStrategy,
    Batch,
    BatchOptions,
    GlideClient,
    GlideClientConfiguration,
    NodeAddress,
    Script,
    ServerCredentials,
)

from chatsession_server.errors import StoreTimeout, StoreUnavailable
from chatsession_server.settings import ValkeyAddress

log = logging.getLogger(__name__)
T = TypeVar("T")

# After a probe finds Valkey unreachable, calls fail at once for this long instead of each
# waiting out the request timeout: clients get UNAVAILABLE quickly and back off.
DOWN_HOLD_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 0.3

# glide.TimeoutError / glide.ConnectionError shadow the builtins and do not subclass them.
GlideTimeout = glide.TimeoutError
GlideConnectionError = glide.ConnectionError


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn GLIDE's transport failures into the domain's StoreUnavailable / StoreTimeout."""
    try:
        yield
    except GlideTimeout as exc:
        raise StoreTimeout(f"Valkey did not answer in time: {exc}") from exc
    except (GlideConnectionError, glide.ClosingError) as exc:
        raise StoreUnavailable(f"Valkey is unreachable: {exc}") from exc
    except glide.RequestError as exc:
        text = str(exc)
        # Overload and refused connections surface as plain RequestErrors.
        if "inflight requests" in text or "Connection refused" in text or "broken pipe" in text.lower():
            raise StoreUnavailable(f"Valkey is unavailable: {exc}") from exc
        raise


def glide_config(
    address: ValkeyAddress,
    *,
    request_timeout_ms: int,
    connect_timeout_ms: int,
    inflight_limit: int,
    client_name: str = "chatsession",
) -> GlideClientConfiguration:
    """A fresh GLIDE configuration for `address` (each client needs its own object)."""
    credentials = None
    if address.password is not None:
        credentials = ServerCredentials(password=address.password, username=address.username)
    return GlideClientConfiguration(
        [NodeAddress(address.host, address.port)],
        use_tls=address.use_tls,
        credentials=credentials,
        database_id=address.database or None,
        request_timeout=request_timeout_ms,
        client_name=client_name,
        inflight_requests_limit=inflight_limit,
        reconnect_strategy=BackoffStrategy(num_of_retries=8, factor=50, exponent_base=2),
        advanced_config=AdvancedGlideClientConfiguration(connection_timeout=connect_timeout_ms),
    )


def make_script(code: str) -> Script:
    """A Script (GLIDE keeps its SHA for EVALSHA and reloads it by itself after a restart)."""
    return Script(code)  # type: ignore[no-untyped-call]


class ValkeyConnection:
    """A connected GLIDE client and the few primitives the store needs."""

    def __init__(self, client: GlideClient, address: ValkeyAddress) -> None:
        self.client = client
        self._address = address
        self._down_until = 0.0

    @classmethod
    async def connect(cls, address: ValkeyAddress, config: GlideClientConfiguration) -> ValkeyConnection:
        """Connect (call it inside the server's running loop: GLIDE binds to the first loop it sees)."""
        with translate_errors():
            client = await GlideClient.create(config)
        return cls(client, address)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one request; tell "Valkey is gone" (UNAVAILABLE) from "Valkey is slow" (timeout).

        While Valkey is down GLIDE only reports timeouts, so a timeout triggers a TCP probe.
        """
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("Valkey is unreachable")
        try:
            with translate_errors():
                return await make()
        except StoreTimeout:
            if await self._reachable():
                raise
            self._down_until = time.monotonic() + DOWN_HOLD_SECONDS
            raise StoreUnavailable("Valkey is unreachable") from None
        except StoreUnavailable:
            self._down_until = time.monotonic() + DOWN_HOLD_SECONDS
            raise

    async def _reachable(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self._address.host, self._address.port), PROBE_TIMEOUT_SECONDS
            )
        except (TimeoutError, OSError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def batch(self, *, atomic: bool) -> Batch:
        """A transaction (atomic) or a pipeline; the cluster variant will return a ClusterBatch."""
        return Batch(is_atomic=atomic)

    async def run(self, batch: Batch, *, timeout_ms: int | None = None) -> list[Any]:
        options = BatchOptions(timeout=timeout_ms) if timeout_ms else None
        result = await self._call(lambda: self.client.exec(batch, raise_on_error=True, options=options))
        return list(result or [])

    async def script(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        return await self._call(lambda: self.client.invoke_script(script, keys=list(keys), args=list(args)))

    async def ping(self) -> None:
        await self._call(self.client.ping)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
