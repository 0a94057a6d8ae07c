"""The one place the store reaches Valkey through: a GLIDE client plus error translation.

Holds a `GlideClient` (standalone) or a `GlideClusterClient`: they have the same command
methods, so the rest of the store only asks `cluster` where the two modes really differ (the
per-user index and usage, see owner_index.py, and the pub/sub flavour, see feed.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeAlias, TypeVar

import glide
from glide import (
    AdvancedGlideClientConfiguration,
    AdvancedGlideClusterClientConfiguration,
    BackoffStrategy,
    Batch,
    BatchOptions,
    ClusterBatch,
    ClusterBatchOptions,
    GlideClient,
    GlideClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    NodeAddress,
    Script,
    ServerCredentials,
    SlotKeyRoute,
    SlotType,
    TlsAdvancedConfiguration,
)

from chatsession_server.errors import (
    StoreFull,
    StoreOverloaded,
    StoreTimeout,
    StoreUnavailable,
    WriteNotReplicated,
)
from chatsession_server.settings import ValkeyAddress

log = logging.getLogger(__name__)
T = TypeVar("T")
AnyClient: TypeAlias = GlideClient | GlideClusterClient
AnyConfig: TypeAlias = GlideClientConfiguration | GlideClusterClientConfiguration
AnyBatch: TypeAlias = Batch | ClusterBatch

# Once Valkey is known down (standalone), calls fail at once and a probe asks it every
# PROBE_INTERVAL_SECONDS; the first answer lets calls through again.
PROBE_INTERVAL_SECONDS = 0.1
PROBE_TIMEOUT_SECONDS = 0.3
# GLIDE reconnects with these delays (ms: factor * base^attempt, capped at num_of_retries), so a
# returning Valkey is back in use within a few hundred milliseconds, not GLIDE's seconds.
RECONNECT = {"num_of_retries": 5, "factor": 10, "exponent_base": 2}

_TRANSIENT = (
    "connection refused",
    "broken pipe",
    "moved:",
    "ask:",
    "tryagain",
    "clusterdown",
    "loading",
    "readonly",
    "masterdown",
)

# False within reads_for_watchers(): the calls' failures say nothing of whether Valkey is up.
_TELLS_HEALTH: contextvars.ContextVar[bool] = contextvars.ContextVar("chatsession_tells_health", default=True)


@contextlib.contextmanager
def reads_for_watchers() -> Iterator[None]:
    """Calls made within never mark Valkey unreachable (standalone): a watch's read of a large
    page, or the feed's poll, may time out while Valkey is busy serving it, and that must not make
    every other call of the process fail UNAVAILABLE. They still fail at once while Valkey is
    known down, and report their own timeout or error as any call does."""
    token = _TELLS_HEALTH.set(False)
    try:
        yield
    finally:
        _TELLS_HEALTH.reset(token)


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
        text = str(exc).lower()
        if "command not allowed when used memory" in text:  # OOM at maxmemory
            raise StoreFull(f"Valkey is out of memory and refuses writes: {exc}") from exc
        if "inflight requests" in text:  # our own client's limit: busy, not down
            raise StoreOverloaded(f"too many Valkey requests in flight: {exc}") from exc
        # Overload, refused connections and a cluster changing hands (failover, resharding,
        # a node loading its data) surface as plain RequestErrors: all are worth a retry.
        if any(sign in text for sign in _TRANSIENT):
            raise StoreUnavailable(f"Valkey is unavailable: {exc}") from exc
        raise


def glide_config(
    address: ValkeyAddress,
    *,
    cluster: bool,
    request_timeout_ms: int,
    connect_timeout_ms: int,
    inflight_limit: int,
    client_name: str = "chatsession",
    root_certificates: bytes | None = None,
    insecure_tls: bool = False,
) -> AnyConfig:
    """A fresh GLIDE configuration for `address` (each client needs its own object).

    With TLS (valkeys://) the server's certificate is checked against `root_certificates` (PEM),
    or the system's roots when None; `insecure_tls` checks nothing (for testing only).
    """
    credentials = None
    if address.password is not None:
        credentials = ServerCredentials(password=address.password, username=address.username)
    nodes = [NodeAddress(host, port) for host, port in address.nodes]
    tls = (
        TlsAdvancedConfiguration(use_insecure_tls=insecure_tls, root_pem_cacerts=root_certificates)
        if address.use_tls
        else None
    )
    common: dict[str, Any] = {
        "use_tls": address.use_tls,
        "credentials": credentials,
        "database_id": address.database or None,
        "request_timeout": request_timeout_ms,
        "client_name": client_name,
        "inflight_requests_limit": inflight_limit,
        "reconnect_strategy": BackoffStrategy(**RECONNECT),
    }
    if cluster:
        advanced = AdvancedGlideClusterClientConfiguration(
            connection_timeout=connect_timeout_ms, tls_config=tls
        )
        return GlideClusterClientConfiguration(nodes, advanced_config=advanced, **common)
    standalone = AdvancedGlideClientConfiguration(connection_timeout=connect_timeout_ms, tls_config=tls)
    return GlideClientConfiguration(nodes, advanced_config=standalone, **common)


async def create_client(config: AnyConfig) -> AnyClient:
    """Connect a GLIDE client of the configuration's kind (inside the running loop)."""
    with translate_errors():
        if isinstance(config, GlideClusterClientConfiguration):
            return await GlideClusterClient.create(config)
        return await GlideClient.create(config)


class ValkeyConnection:
    """A connected GLIDE client and the few primitives the store needs.

    `wait_replicas` > 0: every write waits (WAIT) until that many replicas of its primary have
    it, and fails with WriteNotReplicated otherwise (see `replicated`).
    """

    def __init__(
        self,
        client: AnyClient,
        address: ValkeyAddress,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, GlideClusterClient)
        self._address = address
        self._down: asyncio.Task[None] | None = None  # the probe, while Valkey is known down
        self._closed = False
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        # Told of each failed call (telemetry counts them by kind); the store knows no metrics.
        self.on_error: Callable[[Exception], None] = lambda exc: None

    @classmethod
    async def connect(
        cls, address: ValkeyAddress, config: AnyConfig, *, wait_replicas: int = 0, wait_timeout_ms: int = 1000
    ) -> ValkeyConnection:
        """Connect (call it inside the server's running loop: GLIDE binds to the first loop it sees)."""
        client = await create_client(config)
        return cls(client, address, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._request(make)
        except Exception as exc:
            self.on_error(exc)
            raise

    @property
    def reachable(self) -> bool:
        """False while Valkey is known down (standalone: calls fail at once until it answers)."""
        return self._down is None

    async def _request(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one request; tell "Valkey is gone" (UNAVAILABLE) from "Valkey is slow" (timeout).

        Standalone: while Valkey is down GLIDE only reports timeouts, so a timeout triggers a
        TCP probe. Once Valkey is known down, calls fail at once (no one waits out the request
        timeout) until a probe every PROBE_INTERVAL_SECONDS finds it answering again. A cluster
        has no single node to probe, and one node down must not fail the others' slots: GLIDE
        follows the topology (failovers included) and its errors pass through as they are.
        Within reads_for_watchers() a call's failure passes through too: it marks nothing down.
        """
        if self.cluster:
            with translate_errors():
                return await make()
        if self._down is not None:
            raise StoreUnavailable("Valkey is unreachable")
        if not _TELLS_HEALTH.get():
            with translate_errors():
                return await make()
        try:
            with translate_errors():
                return await make()
        except StoreTimeout:
            if await self._answers():
                raise
            self._mark_down()
            raise StoreUnavailable("Valkey is unreachable") from None
        except StoreOverloaded:
            raise
        except StoreUnavailable:
            self._mark_down()
            raise

    def _mark_down(self) -> None:
        if self._down is None and not self._closed:
            log.warning("Valkey at %s is unreachable: calls fail at once until it answers", self._where)
            self._down = asyncio.create_task(self._probe_until_up(), name="chatsession-valkey-probe")

    @property
    def _where(self) -> str:
        return f"{self._address.host}:{self._address.port}"

    async def _probe_until_up(self) -> None:
        try:
            while not await self._answers():  # noqa: ASYNC110 (a remote condition: polled)
                await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            log.info("Valkey at %s answers again", self._where)
        finally:
            self._down = None

    async def _answers(self) -> bool:
        """Valkey accepts a connection and (without TLS) answers a PING."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_connection(self._address.host, self._address.port)
                try:
                    if self._address.use_tls:
                        return True
                    writer.write(b"PING\r\n")
                    reply = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (TimeoutError, OSError):
            return False
        # Any answer will do (an auth error too), except from a server not ready to serve.
        return reply[:1] in (b"+", b"-") and not reply.startswith((b"-LOADING", b"-BUSY"))

    def batch(self, *, atomic: bool) -> AnyBatch:
        """A transaction (atomic: one slot in a cluster) or a pipeline (any keys)."""
        return ClusterBatch(is_atomic=atomic) if self.cluster else Batch(is_atomic=atomic)

    async def run(self, batch: AnyBatch, *, timeout_ms: int | None = None) -> list[Any]:
        client = self.client
        if isinstance(client, GlideClusterClient):
            assert isinstance(batch, ClusterBatch)
            cluster_options = ClusterBatchOptions(timeout=timeout_ms) if timeout_ms else None
            result = await self._call(
                lambda: client.exec(batch, raise_on_error=True, options=cluster_options)
            )
        else:
            assert isinstance(batch, Batch)
            options = BatchOptions(timeout=timeout_ms) if timeout_ms else None
            result = await self._call(lambda: client.exec(batch, raise_on_error=True, options=options))
        return list(result or [])

    async def script(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """EVALSHA; every key must be in one slot (GLIDE routes the call to its primary)."""
        return await self._call(lambda: self.client.invoke_script(script, keys=list(keys), args=list(args)))

    async def replicated(self, key: str) -> None:
        """Returns once the writes so far on the connection to `key`'s primary have reached
        `wait_replicas` replicas; raises WriteNotReplicated when fewer confirmed in time.

        WAIT counts the writes of the connection it runs on: GLIDE keeps one connection per node,
        the one our write went through, so it covers that write (and holds that connection's
        other requests while it waits: the price of the option, see README)."""
        if self._wait_replicas <= 0:
            return
        command = ["WAIT", str(self._wait_replicas), str(self._wait_timeout_ms)]
        client = self.client
        if isinstance(client, GlideClusterClient):
            route = SlotKeyRoute(SlotType.PRIMARY, key)
            acked = await self._call(lambda: client.custom_command(command, route=route))
        else:
            acked = await self._call(lambda: client.custom_command(command))
        if int(acked) < self._wait_replicas:
            raise WriteNotReplicated(
                f"the write reached {int(acked)} of {self._wait_replicas} replicas in time; "
                "retry with the same request_id"
            )

    async def ping(self) -> None:
        await self._call(self.client.ping)

    async def close(self) -> None:
        self._closed = True
        if self._down is not None:
            self._down.cancel()
        with contextlib.suppress(Exception):
            await self.client.close()
