"""Wiring: Valkey connection, store, servicer, health and reflection, start and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatsession.v1 import session_service_pb2, session_service_pb2_grpc
from chatsession_server.api.auth import AuthInterceptor, AuthorizedStorage
from chatsession_server.api.interceptors import ErrorMappingInterceptor
from chatsession_server.api.limits import MAX_LABELS, Limits
from chatsession_server.api.page_token import PageTokens
from chatsession_server.api.quotas import SessionQuota, WatchQuota
from chatsession_server.api.servicer import SessionServicer
from chatsession_server.api.tls import exposure_warnings, server_credentials
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.ports import SessionStorage
from chatsession_server.settings import Settings, ValkeyAddress
from chatsession_server.store import SessionStore, ValkeyConnection
from chatsession_server.store.feed import SessionFeed
from chatsession_server.store.keys import page_token_secret_key
from chatsession_server.store.secrets import shared_secret
from chatsession_server.store.valkey import AnyConfig, glide_config

log = logging.getLogger(__name__)

SERVICE_NAME = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # Replies are not capped here: a reply too big for a client fails on the client's side
        # (RESOURCE_EXHAUSTED) either way, and a cap here would add a traceback per call to our log.
        # Keep idle connections (and, later, idle watch streams) alive through proxies.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # grpc.aio picks up new calls one at a time; beyond 1000 waiting calls gRPC core cancels
        # them at random (soft limit) or all (hard limit). Thousands of watchers reconnecting at
        # once after a restart are normal here, so the limits follow the setting.
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
    ]


@dataclass
class RunningServer:
    """A started gRPC server and what it owns; `stop()` releases all of it."""

    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    connection: ValkeyConnection
    store: SessionStore
    feed: SessionFeed
    watch_quota: WatchQuota
    auth: AuthInterceptor | None = None

    async def stop(self, grace: float) -> None:
        # NOT_SERVING first, so load balancers stop sending new calls while we drain.
        await self.health.enter_graceful_shutdown()
        # Watches would hold the drain open forever: end them now (UNAVAILABLE: go elsewhere).
        await self.feed.close()
        await self.server.stop(grace)
        await self.connection.close()


async def start_server(settings: Settings, valkey: ValkeyAddress) -> RunningServer:
    """Connect to Valkey and start serving on `settings.listen` (port 0 picks a free port)."""
    # Security files first: a bad one fails start-up before anything is connected.
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    auth = (
        AuthInterceptor(
            settings.auth_tokens_file, open_services=(HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
        )
        if settings.auth_tokens_file
        else None
    )
    if credentials is not None:
        log.info("TLS on%s", ", client certificates required" if settings.tls_client_ca else "")
    if auth is not None:
        log.info("callers from %s: %d", settings.auth_tokens_file, len(auth.callers))
    for warning in exposure_warnings(
        settings.listen,
        tls=credentials is not None,
        mtls=bool(settings.tls_client_ca),
        auth=auth is not None,
        cert_callers=auth is not None and auth.callers.has_certificates,
    ):
        log.warning("%s", warning)

    def config(name: str) -> AnyConfig:
        return glide_config(
            valkey,
            cluster=settings.valkey_cluster,
            request_timeout_ms=settings.valkey_timeout_ms,
            connect_timeout_ms=settings.valkey_connect_timeout_ms,
            inflight_limit=settings.valkey_inflight_limit,
            client_name=name,
        )

    connection = await ValkeyConnection.connect(
        valkey,
        config("chatsession"),
        wait_replicas=settings.valkey_wait_replicas,
        wait_timeout_ms=settings.valkey_wait_timeout_ms,
    )
    try:
        token_key = settings.page_token_key.encode() or await shared_secret(
            connection, page_token_secret_key()
        )
    except BaseException:
        await connection.close()
        raise
    feed = await SessionFeed.start(
        config("chatsession-watch"),
        connection,
        buffer=settings.watch_buffer_events,
        poll_seconds=settings.watch_poll_seconds,
        sweep_seconds=min(1.0, settings.watch_heartbeat_seconds / 4),
    )
    store = SessionStore(
        connection,
        max_ttl_seconds=settings.max_ttl_seconds,
        idempotency_limit=settings.idempotency_keys_per_session,
        max_labels=MAX_LABELS,
    )
    interceptors: list[aio.ServerInterceptor] = [ErrorMappingInterceptor(f"/{SERVICE_NAME}/")]
    if auth is not None:
        interceptors.append(auth)
    # After auth: a caller that is turned away does not hold a place.
    watch_quota = WatchQuota(
        f"/{SERVICE_NAME}/WatchMessages",
        max_watchers=settings.max_watchers,
        max_per_connection=settings.max_watchers_per_connection,
    )
    interceptors.append(watch_quota)
    server = aio.server(interceptors=interceptors, options=grpc_options(settings))
    storage: SessionStorage = store
    if settings.max_sessions_per_user:
        storage = SessionQuota(storage, settings.max_sessions_per_user)
    if auth is not None:  # outermost: PERMISSION_DENIED before anything is counted
        storage = AuthorizedStorage(storage)
    servicer = SessionServicer(
        storage,
        feed,
        Limits.from_settings(settings),
        PageTokens(token_key),
        heartbeat_seconds=settings.watch_heartbeat_seconds,
    )
    session_service_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = (
            server.add_insecure_port(settings.listen)
            if credentials is None
            else server.add_secure_port(settings.listen, credentials)
        )
    except RuntimeError as exc:
        await feed.close()
        await connection.close()
        raise RuntimeError(f"cannot listen on {settings.listen}: {exc}") from exc
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, connection, store, feed, watch_quota, auth)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and release everything (embedded Valkey included)."""
    embedded: EmbeddedValkey | None = None
    valkey = settings.valkey
    if valkey is None:
        embedded = EmbeddedValkey()
        embedded.start()
        log.info(
            "no Valkey URL configured: started an embedded valkey-server at %s (data is not kept)",
            embedded.url,
        )
        valkey = ValkeyAddress.parse(embedded.url)
    try:
        running = await start_server(settings, valkey)
        host = settings.listen.rpartition(":")[0]
        log.info("chatsession serving on %s:%d (Valkey %s)", host, running.port, valkey.redacted())
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        if running.auth is not None:
            loop.add_signal_handler(signal.SIGHUP, running.auth.reload)
        await stopping.wait()
        log.info("shutting down: draining for up to %.1fs", settings.grace_seconds)
        await running.stop(settings.grace_seconds)
    finally:
        if embedded is not None:
            with contextlib.suppress(Exception):
                embedded.stop()
    log.info("stopped")
