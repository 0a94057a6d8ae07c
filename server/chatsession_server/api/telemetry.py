"""OpenTelemetry: RPC metrics and traces, exported as Prometheus text and/or over OTLP.

Off unless `--metrics-listen` or `--otlp-endpoint` is set: then nothing below is installed and
calls pay nothing for it. Metrics go through the OpenTelemetry SDK (a MeterProvider with a
Prometheus reader on its own registry, served at `/metrics`, and an OTLP reader); traces through
opentelemetry-instrumentation-grpc's grpc.aio server interceptor, which continues the caller's W3C
`traceparent`. The store knows nothing of this: it counts into plain attributes and one callback
(`ValkeyConnection.on_error`, `SessionFeed.resyncs`) that the instruments here read.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from chatsession_server.api.interceptors import Handler, WrappingInterceptor
from chatsession_server.api.status import code_of
from chatsession_server.errors import (
    StoreFull,
    StoreOverloaded,
    StoreTimeout,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    Exporter = OTLPMetricExporter | OTLPSpanExporter
    from chatsession_server.api.pacing import WritePacer
    from chatsession_server.api.quotas import WatchQuota
    from chatsession_server.settings import Settings
    from chatsession_server.store.feed import SessionFeed
    from chatsession_server.store.valkey import ValkeyConnection

METER_NAME = "chatsession_server"
# Seconds; RPCs here take from a fraction of a millisecond to a few (a slow Valkey, a big page).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Codes that make a server span an error (OpenTelemetry's RPC conventions): the caller's own
# mistakes (NOT_FOUND, INVALID_ARGUMENT, ...) are not the server's.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# How long a stopping server waits for the last metrics and spans to reach the collector.
FLUSH_SECONDS = 3.0
TRACE_ID: ContextVar[int] = ContextVar("chatsession_trace_id", default=0)
"""The trace id of the current call's span (0: none), for the access log, which runs outside it."""
VALKEY_ERROR_KINDS: dict[type[Exception], str] = {
    StoreUnavailable: "unavailable",
    StoreTimeout: "timeout",
    StoreOverloaded: "overloaded",
    StoreFull: "out_of_memory",
}


class Telemetry:
    """The meter and tracer providers of one server, and the `/metrics` endpoint if any.

    Tests build one with providers of their own (in-memory readers and exporters);
    `from_settings` builds the exporters the flags ask for."""

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics_http: WSGIServer | None = None,
        exporters: Sequence[Exporter] = (),
    ) -> None:
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self._metrics_http = metrics_http
        self._exporters = exporters
        self.calls = CallMetrics(meter_provider) if meter_provider is not None else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Telemetry | None:
        """None when neither --metrics-listen nor --otlp-endpoint is set. The exporters and the
        resource also honour the standard OTEL_* variables (OTEL_SERVICE_NAME,
        OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, ...)."""
        if not settings.metrics_listen and not settings.otlp_endpoint:
            return None
        resource = Resource.create({"service.name": "chatsession"})
        readers: list[MetricReader] = []
        metrics_http = None
        tracer_provider = None
        exporters: tuple[Exporter, ...] = ()
        if settings.otlp_endpoint:
            # Imported only when asked for: the OTLP exporters pull in their generated protos.
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            metric_exporter = OTLPMetricExporter(endpoint=settings.otlp_endpoint)
            span_exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
            exporters = (metric_exporter, span_exporter)
            readers.append(PeriodicExportingMetricReader(metric_exporter))
            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        if settings.metrics_listen:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry, start_http_server

            # A registry of this server's own: several servers in one process (tests) stay apart.
            registry = CollectorRegistry()
            readers.append(PrometheusMetricReader(registry=registry))
            host, _, port = settings.metrics_listen.rpartition(":")
            try:
                metrics_http, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
            except OSError as exc:
                raise RuntimeError(
                    f"cannot listen on {settings.metrics_listen} for metrics: {exc.strerror or exc}"
                ) from None
        return cls(
            meter_provider=MeterProvider(resource=resource, metric_readers=readers),
            tracer_provider=tracer_provider,
            metrics_http=metrics_http,
            exporters=exporters,
        )

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics` is served on (the one picked, for port 0)."""
        return self._metrics_http.server_port if self._metrics_http is not None else None

    def tracing_interceptors(self, service: str) -> list[aio.ServerInterceptor]:
        """A span per `service` call, continuing the caller's trace; empty without a tracer.

        They go inside the error mapping: the instrumentation iterates streaming handlers as
        async generators (the error mapping's writer is a coroutine), and `SpanStatus` gives
        the span the code the mapping will send."""
        if self.tracer_provider is None:
            return []
        prefix = f"/{service}/"
        # A prefix test, not filters.service_name: that one parses the method anew on every call.
        spans: aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider,
            filter_=lambda details: details.method.startswith(prefix),
        )
        return [spans, SpanStatus(prefix)]

    def observe(
        self, watch_quota: WatchQuota, feed: SessionFeed, connection: ValkeyConnection, pacer: WritePacer
    ) -> None:
        """Instruments that read the server's parts (once connected to Valkey)."""
        if self.meter_provider is None:
            return
        meter = self.meter_provider.get_meter(METER_NAME)

        def gauge(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
            # Collected on the exporter's thread: each reads one int the event loop keeps.
            return lambda options: [Observation(read())]

        meter.create_observable_up_down_counter(
            "chatsession.watchers",
            callbacks=[gauge(lambda: watch_quota.watchers)],
            unit="{stream}",
            description="WatchMessages streams open in this process",
        )
        meter.create_observable_up_down_counter(
            "chatsession.watch.subscriptions",
            callbacks=[gauge(lambda: feed.subscriptions)],
            unit="{channel}",
            description="sessions whose pub/sub channel this process holds for its watchers",
        )
        meter.create_observable_counter(
            "chatsession.watch.resyncs",
            callbacks=[gauge(lambda: feed.resyncs)],
            unit="{resync}",
            description="times watchers of a session were sent back to the LIST for appends pub/sub missed",
        )
        meter.create_observable_counter(
            "chatsession.watch.writes_paced",
            callbacks=[gauge(lambda: pacer.paced)],
            unit="{write}",
            description="watch replies that waited a pass of the event loop for their turn to be written",
        )
        meter.create_observable_gauge(
            "chatsession.valkey.up",
            callbacks=[gauge(lambda: int(connection.reachable))],
            description="1 while Valkey answers, 0 while calls fail at once (known down, standalone)",
        )
        errors = meter.create_counter(
            "chatsession.valkey.errors",
            unit="{error}",
            description="Valkey calls that failed, by kind",
        )
        attributes = {kind: {"error.type": kind} for kind in (*VALKEY_ERROR_KINDS.values(), "other")}

        def count(exc: Exception) -> None:
            errors.add(1, attributes[VALKEY_ERROR_KINDS.get(type(exc), "other")])

        connection.on_error = count

    def shutdown(self, flush_seconds: float = FLUSH_SECONDS) -> None:
        """Stop serving `/metrics`; export what is left, for up to `flush_seconds`."""
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        flushing = threading.Thread(target=self._flush, name="chatsession-telemetry-flush")
        flushing.start()
        flushing.join(flush_seconds)
        if flushing.is_alive():
            # A collector that refuses connections would hold the SDK in its retries for many
            # seconds: shutting the exporters down ends their waits.
            for exporter in self._exporters:
                exporter.shutdown()
            flushing.join()

    def _flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


class CallMetrics:
    """`rpc.server.call.duration`: one histogram, by service, method and status code (its count
    is the number of calls)."""

    def __init__(self, meter_provider: MeterProvider) -> None:
        self._duration = meter_provider.get_meter(METER_NAME).create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="time from a call's start to its status (streams: to their end)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._attributes: dict[tuple[str, grpc.StatusCode], dict[str, str]] = {}

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (method, code)
        attributes = self._attributes.get(key)
        if attributes is None:  # one dict per method and code, not one per call
            service, _, name = method.lstrip("/").partition("/")
            attributes = self._attributes[key] = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.response.status_code": code.name,
            }
        self._duration.record(seconds, attributes)


class SpanStatus(WrappingInterceptor):
    """Puts the call's status code on its span: domain errors become statuses outside the span
    (in the error mapping), so the code is worked out here from the same table. And keeps the
    span's trace id in `TRACE_ID` for the access log."""

    def __init__(self, service_prefix: str) -> None:
        super().__init__()
        self._prefix = service_prefix

    def applies(self, method: str, handler: Handler) -> bool:
        return method.startswith(self._prefix)

    def wrap(self, handler: Handler, method: str) -> Handler:
        # Any stream that is iterated (an async generator, or a function returning an async
        # iterator as the watch quota's does), not a coroutine that writes.
        iterated = not inspect.iscoroutinefunction(handler.unary_stream)
        return self.rebuilt(handler, unary=_marking_unary, stream=_marking_stream if iterated else None)


# The behaviours are coroutines and async iterators; grpc's stubs type them as sync.
def _marking_unary(respond: Any) -> Any:
    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        _keep_trace_id()
        try:
            return await respond(request, context)
        except BaseException as exc:
            _mark_span(exc, context)
            raise

    return unary


def _marking_stream(produce: Any) -> Any:
    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        _keep_trace_id()
        items = produce(request, context)
        try:
            async for item in items:
                yield item
                del item  # an idle stream does not hold its last reply
        except BaseException as exc:
            _mark_span(exc, context)
            raise
        finally:  # as the error mapping's: not contextlib.aclosing, an object per stream
            await items.aclose()

    return stream


def _keep_trace_id() -> None:
    TRACE_ID.set(trace.get_current_span().get_span_context().trace_id)


def _mark_span(exc: BaseException, context: aio.ServicerContext[Any, Any]) -> None:
    code = code_of(exc, context, mapped=False)
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code.name))
