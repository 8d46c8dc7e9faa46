"""Tracing and metrics, set up the same way in every process.

Tracing is configured only by the standard OpenTelemetry variables
(OTEL_TRACES_EXPORTER = zipkin | otlp | console | none, OTEL_EXPORTER_ZIPKIN_ENDPOINT,
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG],
OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*). With none set, a process of the local
stack exports to the stack's Zipkin if it runs; otherwise nothing is set up
and the API stays a no-op, which costs next to nothing. W3C trace context and
baggage ride on every gRPC hop; the image name travels as baggage.

Metrics are Prometheus text on an HTTP port per service, read from the
stores' own counters at scrape time (nothing added to the read path but a
latency histogram).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator

from opentelemetry import baggage, context, trace

log = logging.getLogger(__name__)

tracer = trace.get_tracer("imagestream")
IMAGE_BAGGAGE = "imagestream.image"
_enabled = False


def local_zipkin_endpoint() -> str | None:
    """The local stack's Zipkin, if it is running."""
    from imagestream import config
    from imagestream.proc import alive

    pidfile = config.home() / "run" / "zipkin.pid"
    try:
        if alive(int(pidfile.read_text())):
            return f"http://127.0.0.1:{config.get('zipkin_port')}/api/v2/spans"
    except (OSError, ValueError):
        pass
    return None


def setup_tracing(service_name: str) -> bool:
    """Install the SDK if an exporter is configured (or the local Zipkin runs); True if tracing is on."""
    global _enabled
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = None  # nothing written to os.environ: child processes decide for themselves
    if not exporter_name:
        endpoint = local_zipkin_endpoint()
        if endpoint is None:
            return False
        exporter_name = "zipkin"
    if exporter_name == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        exporter = ZipkinExporter(endpoint=endpoint)  # None: OTEL_EXPORTER_ZIPKIN_ENDPOINT
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_ENDPOINT
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: want zipkin, otlp, console or none")
    # OTEL_SERVICE_NAME, if set, wins over the program's own name; OTEL_RESOURCE_ATTRIBUTES adds to it
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))  # sampler: OTEL_TRACES_SAMPLER[_ARG]
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _instrument_libraries()
    _enabled = True
    log.info("tracing on: %s exporter, service %s", exporter_name, name)
    return True


def _instrument_libraries() -> None:
    from opentelemetry.instrumentation.grpc import (GrpcAioInstrumentorClient, GrpcAioInstrumentorServer,
                                                    GrpcInstrumentorClient)

    GrpcAioInstrumentorServer().instrument()
    GrpcAioInstrumentorClient().instrument()
    # synchronous calls too (the snapshotter's attach from a worker thread): their trace goes on to the callee
    GrpcInstrumentorClient().instrument()
    if "redis" in sys.modules:  # only where Redis is used (the zonal cache): the import costs 0.15 s a process
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor().instrument()
    # Cassandra: the contrib instrumentation times only the submission of execute_async, not the
    # query, so the Cassandra backend spans each query itself (chunk_store/cassandra_backend.py).


def shutdown() -> None:
    if _enabled:
        provider = trace.get_tracer_provider()
        with contextlib.suppress(Exception):
            provider.shutdown()  # type: ignore[attr-defined]


@contextlib.contextmanager
def image_context(image: str) -> Iterator[None]:
    """Carry the image name to every tier of the reads below (W3C baggage)."""
    if not _enabled or not image:
        yield
        return
    token = context.attach(baggage.set_baggage(IMAGE_BAGGAGE, image))
    try:
        yield
    finally:
        context.detach(token)


def current_image() -> str:
    value = baggage.get_baggage(IMAGE_BAGGAGE)
    return str(value) if value else ""


def annotate(**attributes: object) -> None:
    """Set attributes on the current span (a no-op when tracing is off)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"imagestream.{k}": v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def new_trace(name: str, **attributes: object) -> Iterator[trace.Span]:
    """A span that starts a trace of its own (background work is not a child of the reads that caused it)."""
    with tracer.start_as_current_span(name, context=context.Context()) as span:
        if span.is_recording():
            span.set_attributes({f"imagestream.{k}": v for k, v in attributes.items()})
        yield span


# -- metrics ---------------------------------------------------------------

def serve_metrics(listen: str, collect: Callable[[], Iterator[object]]) -> None:
    """Prometheus text on http://listen/metrics; `collect` yields metric families at scrape time."""
    import prometheus_client
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield from collect()

    prometheus_client.REGISTRY.register(_Collector())
    host, _, port = listen.rpartition(":")
    server, _ = prometheus_client.start_http_server(int(port), addr=host or "0.0.0.0")
    log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", server.server_port)  # port 0: the kernel's pick


FETCH_SECONDS = None


def fetch_histogram():  # type: ignore[no-untyped-def]
    """imagestream_upstream_fetch_seconds{tier}: how long a miss waited for the next tier."""
    global FETCH_SECONDS
    if FETCH_SECONDS is None:
        import prometheus_client

        FETCH_SECONDS = prometheus_client.Histogram(
            "imagestream_upstream_fetch_seconds", "Time a cache miss waited for the next tier, by tier",
            ["tier"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
    return FETCH_SECONDS


def tier_families(tiers: dict[str, object]) -> Iterator[object]:
    """Counter and gauge families from each tier's Stats (and sizes where the store has them)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    requests = CounterMetricFamily("imagestream_chunk_requests", "Chunk reads by tier and result", labels=["tier", "result"])
    served = CounterMetricFamily("imagestream_chunk_served_bytes", "Compressed bytes served, by tier", labels=["tier"])
    corrupt = CounterMetricFamily("imagestream_corrupt_chunks_dropped", "Chunks dropped for not matching their digest",
                                  labels=["tier"])
    evictions = CounterMetricFamily("imagestream_cache_evictions", "Chunks evicted to make room", labels=["tier"])
    size = GaugeMetricFamily("imagestream_cache_size_bytes", "Bytes held by a cache tier", labels=["tier"])
    capacity = GaugeMetricFamily("imagestream_cache_capacity_bytes", "Bound of a cache tier", labels=["tier"])
    for tier, store in tiers.items():
        stats = store.stats  # type: ignore[attr-defined]
        requests.add_metric([tier, "hit"], stats.hits)
        requests.add_metric([tier, "miss"], stats.misses)
        served.add_metric([tier], stats.bytes_served)
        corrupt.add_metric([tier], stats.corrupt_dropped)
        evictions.add_metric([tier], stats.evictions)
        if hasattr(store, "size_bytes"):
            size.add_metric([tier], store.size_bytes)  # type: ignore[attr-defined]
            capacity.add_metric([tier], getattr(store, "capacity_bytes", None) or 0)
    yield from (requests, served, corrupt, evictions, size, capacity)


class Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
