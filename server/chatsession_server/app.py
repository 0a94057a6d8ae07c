"""Wiring: Valkey connection, store, servicer, health and reflection, start and graceful stop.

Start-up is two steps, so that health answers while Valkey is awaited: `open_server` listens
(health NOT_SERVING, SessionService calls UNAVAILABLE), then `ListeningServer.connect` waits for
Valkey, wires the store and turns SERVING. `start_server` does both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import glide
import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatsession.v1 import session_service_pb2, session_service_pb2_grpc
from chatsession_server.api.auth import AuthInterceptor, AuthorizedStorage, CertificateGate
from chatsession_server.api.convert import SharedWatchReplies, serialized_or
from chatsession_server.api.interceptors import ErrorMappingInterceptor
from chatsession_server.api.limits import MAX_LABELS, Limits
from chatsession_server.api.observer import CallObserver, access_log
from chatsession_server.api.pacing import WritePacer
from chatsession_server.api.page_token import PageTokens
from chatsession_server.api.quotas import SessionQuota, WatchQuota
from chatsession_server.api.servicer import SessionServicer
from chatsession_server.api.telemetry import Telemetry
from chatsession_server.api.tls import exposure_warnings, server_credentials
from chatsession_server.embedded import EmbeddedValkey
from chatsession_server.errors import StoreTimeout, StoreUnavailable
from chatsession_server.listen_address import claim_listen_port
from chatsession_server.memory import trim_every
from chatsession_server.ports import SessionStorage
from chatsession_server.settings import COMPRESSION_ALGORITHMS, Settings, ValkeyAddress
from chatsession_server.store.feed import SessionFeed
from chatsession_server.store.keys import KeySpace
from chatsession_server.store.secrets import shared_secret
from chatsession_server.store.session_store import SessionStore
from chatsession_server.store.valkey import AnyConfig, ValkeyConnection, glide_config
from chatsession_server.store.valkey_tls import connect_failure

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ValkeyNotAnswering(RuntimeError):
    """Valkey did not answer within --valkey-startup-timeout: it may come back, unlike a refused
    password or certificate (a worker that meets this is restarted; see supervisor.CANNOT_START)."""


# Waiting for Valkey at start: retry delays double from the first to the last.
FIRST_RETRY_SECONDS = 0.2
MAX_RETRY_SECONDS = 2.0
REPLY_COMPRESSION = {
    "identity": grpc.Compression.NoCompression,
    "deflate": grpc.Compression.Deflate,
    "gzip": grpc.Compression.Gzip,
}
# Failures that mean "Valkey is not (yet) there": wait and try again.
_NOT_YET = (OSError, TimeoutError, StoreUnavailable, StoreTimeout, glide.GlideError)


def grpc_options(settings: Settings, *, share_port: bool = False) -> list[tuple[str, int]]:
    options = [
        # gRPC turns SO_REUSEPORT on by default: a second server on a busy port would bind and
        # silently share it. Only the workers of one supervisor share a port.
        ("grpc.so_reuseport", int(share_port)),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # Replies are not capped here: a reply too big for a client fails on the client's side
        # (RESOURCE_EXHAUSTED) either way, and a cap here would add a traceback per call to our log.
        # Keep idle connections (idle watch streams too) alive through proxies.
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_ping_interval_ms),
        ("grpc.http2.max_pings_without_data", 0),
        # A call compressed with an algorithm not in the set is UNIMPLEMENTED.
        (
            "grpc.compression_enabled_algorithms_bitset",
            sum(1 << COMPRESSION_ALGORITHMS.index(name) for name in settings.accepted_compression),
        ),
        # grpc.aio picks up new calls one at a time; beyond 1000 waiting calls gRPC core cancels
        # them at random (soft limit) or all (hard limit). Thousands of watchers reconnecting at
        # once after a restart are normal here, so the limits follow the setting.
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
    ]
    if not settings.http2_bdp_probe:
        # Without probing, a call's HTTP/2 window stays at gRPC's 64 KiB until its handler asks for
        # the request, which then opens the window to the whole message: a call refused before it
        # is read (auth) brings in at most that much, however large the message it announced.
        options.append(("grpc.http2.bdp_probe", 0))
    if settings.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", settings.max_concurrent_streams))
    return options


class _SessionServiceSlot(grpc.GenericRpcHandler):
    """Where SessionService is registered: its handlers once Valkey answers, UNAVAILABLE until then.

    gRPC takes handlers only before the server starts, and the server starts (for health) before
    the servicer's store exists. Calls are then found through this generic handler rather than
    gRPC's registered-method table, at the cost of one dict lookup.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def fill(self, servicer: SessionServicer) -> None:
        capture = _HandlerCapture()
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(servicer, cast(aio.Server, capture))
        handlers = dict(capture.handlers)
        watch = handlers["WatchMessages"]
        assert watch.unary_stream is not None
        assert watch.response_serializer is not None
        # The servicer's watches send each message as bytes serialized once for all of them.
        handlers["WatchMessages"] = grpc.unary_stream_rpc_method_handler(
            watch.unary_stream,
            request_deserializer=watch.request_deserializer,
            response_serializer=serialized_or(watch.response_serializer),
        )
        self._handlers = {f"/{SERVICE_NAME}/{name}": h for name, h in handlers.items()}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        if self._handlers:
            return self._handlers.get(method)
        return _NOT_READY if method.startswith(f"/{SERVICE_NAME}/") else None


class _HandlerCapture:
    """Stands in for the server to collect the method handlers the generated code makes."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = handlers


async def _not_ready(request: bytes, context: aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "starting: waiting for Valkey")


# A unary handler answers the streaming WatchMessages too: it ends the call before any reply.
_NOT_READY: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(cast(Any, _not_ready))


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
    pacer: WritePacer
    auth: AuthInterceptor | None = None
    telemetry: Telemetry | None = None
    watch_replies: SharedWatchReplies | None = None

    async def stop(self, grace: float) -> None:
        # NOT_SERVING first, so load balancers stop sending new calls while we drain.
        await self.health.enter_graceful_shutdown()
        # Watches would hold the drain open forever: end them now (UNAVAILABLE: go elsewhere).
        await self.feed.close()
        await self.server.stop(grace)
        await self.connection.close()
        if self.telemetry is not None:  # last: the drained calls are counted and exported
            await asyncio.to_thread(self.telemetry.shutdown)


@dataclass
class ListeningServer:
    """A started gRPC server answering health (NOT_SERVING) and reflection, not yet connected."""

    server: aio.Server
    port: int
    health: health.aio.HealthServicer
    slot: _SessionServiceSlot
    auth: AuthInterceptor | None
    watch_quota: WatchQuota
    pacer: WritePacer
    telemetry: Telemetry | None = None

    async def abandon(self) -> None:
        """Stop at once, never having served (start-up failed or was cancelled)."""
        await self.server.stop(None)
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.shutdown)

    async def connect(self, settings: Settings, valkey: ValkeyAddress) -> RunningServer:
        """Wait for Valkey (up to `valkey_startup_timeout`), wire the service, turn SERVING."""
        key_space = KeySpace(settings.key_prefix)
        connection, feed, token_key = await _connect_when_valkey_answers(settings, valkey, key_space)
        store = SessionStore(
            connection,
            idempotency_limit=settings.idempotency_keys_per_session,
            max_labels=MAX_LABELS,
            max_session_bytes=settings.max_session_bytes,
            max_fork_bytes=settings.max_fork_bytes,
            max_fork_messages=settings.max_fork_messages,
            max_state_keys=settings.max_state_keys,
            max_state_bytes=settings.max_state_bytes,
            max_ttl_seconds=settings.max_ttl_seconds,
            key_space=key_space,
        )
        storage: SessionStorage = store
        if settings.max_sessions_per_user:
            storage = SessionQuota(storage, settings.max_sessions_per_user)
        if self.auth is not None:  # outermost: PERMISSION_DENIED before anything is counted
            storage = AuthorizedStorage(storage, scoped_ids=not settings.global_session_ids)
        servicer = SessionServicer(
            storage,
            feed,
            Limits.from_settings(settings),
            PageTokens(token_key),
            heartbeat_seconds=settings.watch_heartbeat_seconds,
            watch_buffer_bytes=settings.watch_buffer_bytes,
        )
        self.slot.fill(servicer)
        if self.telemetry is not None:
            self.telemetry.observe(self.watch_quota, feed, connection, self.pacer)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return RunningServer(
            self.server,
            self.port,
            self.health,
            connection,
            store,
            feed,
            self.watch_quota,
            self.pacer,
            self.auth,
            self.telemetry,
            servicer.watch_replies,
        )


async def open_server(
    settings: Settings, *, share_port: bool = False, telemetry: Telemetry | None = None
) -> ListeningServer:
    """Listen on `settings.listen` (port 0 picks a free port) with health NOT_SERVING.

    `telemetry`: providers of the caller's own (tests); by default what the settings ask for."""
    # Security files first: a bad one fails start-up before anything listens or connects.
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    auth = (
        AuthInterceptor(
            settings.auth_tokens_file,
            open_services=(HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
            client_certificates=bool(settings.tls_client_ca),
        )
        if settings.auth_tokens_file
        else None
    )
    if credentials is not None:
        log.info("TLS on%s", ", client certificates required" if settings.tls_client_ca else "")
    if auth is not None:
        log.info("callers from %s: %d", settings.auth_tokens_file, len(auth.callers))
    settings.valkey_root_certificates()  # an unreadable CA file fails start-up now, not later
    if settings.valkey_tls_insecure:
        log.warning(
            "--valkey-tls-insecure: the Valkey server's certificate is not checked (for testing only)"
        )
    for warning in exposure_warnings(
        settings.listen,
        tls=credentials is not None,
        mtls=bool(settings.tls_client_ca),
        auth=auth is not None,
        cert_callers=auth is not None and auth.callers.has_certificates,
    ):
        log.warning("%s", warning)
    if telemetry is None:
        telemetry = Telemetry.from_settings(settings)  # a metrics address in use fails here, in one line
    try:
        return await _listen(settings, credentials, auth, telemetry, share_port=share_port)
    except BaseException:
        if telemetry is not None:
            telemetry.shutdown()
        raise


async def _listen(
    settings: Settings,
    credentials: grpc.ServerCredentials | None,
    auth: AuthInterceptor | None,
    telemetry: Telemetry | None,
    *,
    share_port: bool,
) -> ListeningServer:
    interceptors: list[aio.ServerInterceptor] = []
    if auth is not None and settings.tls_client_ca:
        # Before all the others: a call that only its client certificate can authenticate is
        # checked before its request is read, then handed to the handler they build, unchanged.
        interceptors.append(CertificateGate(auth))
    metrics = telemetry.calls if telemetry is not None else None
    # Access-log lines are INFO: below that level the observer is not installed for them.
    log_calls = settings.access_log and access_log.isEnabledFor(logging.INFO)
    if metrics is not None or log_calls:
        # Outermost of those that wrap a call: it sees the code the caller gets, whatever set it.
        interceptors.append(CallObserver(metrics, access_log=log_calls))
    pacer = WritePacer(settings.watch_write_bytes_per_pass)
    interceptors.append(ErrorMappingInterceptor(f"/{SERVICE_NAME}/", pacer))
    if telemetry is not None:
        interceptors.extend(telemetry.tracing_interceptors(SERVICE_NAME))
    if auth is not None:
        interceptors.append(auth)
    # After auth: a caller that is turned away does not hold a place.
    watch_quota = WatchQuota(
        f"/{SERVICE_NAME}/WatchMessages",
        max_watchers=settings.max_watchers,
        max_per_connection=settings.max_watchers_per_connection,
    )
    interceptors.append(watch_quota)
    server = aio.server(
        interceptors=interceptors,
        options=grpc_options(settings, share_port=share_port),
        compression=REPLY_COMPRESSION[settings.default_compression],
    )
    slot = _SessionServiceSlot()
    server.add_generic_rpc_handlers([slot])
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = (
            server.add_insecure_port(settings.listen)
            if credentials is None
            else server.add_secure_port(settings.listen, credentials)
        )
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {settings.listen}: {exc}") from exc
    await server.start()
    return ListeningServer(server, port, health_servicer, slot, auth, watch_quota, pacer, telemetry)


async def start_server(
    settings: Settings, valkey: ValkeyAddress, *, telemetry: Telemetry | None = None
) -> RunningServer:
    """Listen on `settings.listen` (port 0 picks a free port), connect to Valkey, serve."""
    listening = await open_server(settings, telemetry=telemetry)
    try:
        return await listening.connect(settings, valkey)
    except BaseException:
        await listening.abandon()
        raise


async def _connect_when_valkey_answers(
    settings: Settings, valkey: ValkeyAddress, key_space: KeySpace
) -> tuple[ValkeyConnection, SessionFeed, bytes]:
    """Connect, retrying with backoff for up to `valkey_startup_timeout`; one log line per failed try."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.valkey_startup_timeout
    delay = FIRST_RETRY_SECONDS
    attempt = 1
    while True:
        try:
            return await _connect(settings, valkey, key_space)
        except _NOT_YET as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            left = deadline - loop.time()
            if left <= 0:
                raise ValkeyNotAnswering(
                    f"Valkey at {valkey.redacted()} did not answer within "
                    f"{settings.valkey_startup_timeout:g}s: {reason}"
                ) from None
            wait = min(delay, left)
            log.warning(
                "Valkey at %s not answering (attempt %d: %s); next try in %.1fs",
                valkey.redacted(), attempt, reason, wait,
            )  # fmt: skip
            await asyncio.sleep(wait)
            delay = min(2 * delay, MAX_RETRY_SECONDS)
            attempt += 1


async def _connect(
    settings: Settings, valkey: ValkeyAddress, key_space: KeySpace
) -> tuple[ValkeyConnection, SessionFeed, bytes]:
    """The store's connection, the watch feed, and the key that signs page tokens."""
    # GLIDE's create() blocks the event loop for the whole connect timeout when nothing answers:
    # a plain TCP connect first keeps the loop (and health) responsive while Valkey is away.
    # Any seed of a cluster will do.
    await _any_accepts(valkey.nodes, settings.valkey_connect_timeout_ms / 1000)
    root_certificates = settings.valkey_root_certificates()

    def config(name: str) -> AnyConfig:
        return glide_config(
            valkey,
            cluster=settings.valkey_cluster,
            request_timeout_ms=settings.valkey_timeout_ms,
            connect_timeout_ms=settings.valkey_connect_timeout_ms,
            inflight_limit=settings.valkey_inflight_limit,
            client_name=name,
            root_certificates=root_certificates,
            insecure_tls=settings.valkey_tls_insecure,
        )

    try:
        connection = await ValkeyConnection.connect(
            valkey,
            config("chatsession"),
            wait_replicas=settings.valkey_wait_replicas,
            wait_timeout_ms=settings.valkey_wait_timeout_ms,
        )
    except (StoreUnavailable, StoreTimeout) as exc:
        # A wrong password or certificate ends start-up at once, in one line; anything else may
        # be a Valkey still starting: the caller waits and tries again.
        refused = await connect_failure(
            valkey, exc, root_certificates=root_certificates, insecure_tls=settings.valkey_tls_insecure
        )
        if refused:
            raise RuntimeError(refused) from None
        raise
    try:
        token_key = settings.page_token_key.encode() or await shared_secret(
            connection, key_space.page_token_secret()
        )
        feed = await SessionFeed.start(
            config("chatsession-watch"),
            connection,
            buffer_bytes=settings.watch_buffer_bytes,
            poll_seconds=settings.watch_poll_seconds,
            sweep_seconds=min(1.0, settings.watch_heartbeat_seconds / 4),
            key_space=key_space,
        )
    except BaseException:
        await connection.close()
        raise
    return connection, feed, token_key


async def _any_accepts(nodes: Sequence[tuple[str, int]], timeout: float) -> None:
    """Returns once one of `nodes` accepts a TCP connection; raises the last failure otherwise."""
    failure: BaseException = OSError("no Valkey node given")
    for host, port in nodes:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            failure = exc
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise failure


async def serve(settings: Settings, *, share_port: bool = False) -> None:
    """Run until SIGTERM/SIGINT, then drain and release everything (embedded Valkey included).

    `share_port`: a supervised worker, sharing the port with its siblings (and given a Valkey URL).
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if not share_port and settings.listen_port:
        claim_listen_port(settings.listen_host, settings.listen_port)  # before an embedded Valkey starts
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
        listening = await open_server(settings, share_port=share_port)
        host = settings.listen_host
        log.info("listening on %s:%d; connecting to Valkey at %s", host, listening.port, valkey.redacted())
        if listening.telemetry is not None and listening.telemetry.metrics_port is not None:
            log.info("metrics at http://%s:%d/metrics", settings.metrics_listen.rpartition(":")[0],
                     listening.telemetry.metrics_port)  # fmt: skip
        try:
            running = await _unless_stopped(listening.connect(settings, valkey), stopping)
        except BaseException:
            await listening.abandon()
            raise
        if running is None:
            await listening.abandon()
        else:
            log.info("chatsession serving on %s:%d (Valkey %s)", host, running.port, valkey.redacted())
            # What start-up allocated (modules, protobuf descriptors, GLIDE) lives as long as the
            # process: out of the collector's sight, full collections stop walking it.
            gc.freeze()
            if running.auth is not None:
                loop.add_signal_handler(signal.SIGHUP, running.auth.reload)
            trimming = (
                asyncio.ensure_future(trim_every(settings.memory_trim_seconds))
                if settings.memory_trim_seconds
                else None
            )
            await stopping.wait()
            if trimming is not None:
                trimming.cancel()
            log.info("shutting down: draining for up to %.1fs", settings.grace_seconds)
            await running.stop(settings.grace_seconds)
    finally:
        if embedded is not None:
            with contextlib.suppress(Exception):
                embedded.stop()
    log.info("stopped")


async def _unless_stopped(work: Awaitable[T], stopping: asyncio.Event) -> T | None:
    """`work`'s result, or None if `stopping` is set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()
