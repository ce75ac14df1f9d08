"""Prometheus metrics, one registry per app (never the process-global default registry, so two
apps in one process - as in tests - do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.core.states import ACTIVE

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_finished = Counter("t2i_jobs_finished", "Jobs that reached a terminal state", ["status"], registry=self.registry)
        self.step_seconds = Histogram("t2i_step_seconds", "Mean time per denoising step of the job so far, observed at each step", buckets=STEP_BUCKETS, registry=self.registry)
        self.preview_latency = Histogram("t2i_preview_latency_seconds", "Step callback to event published on the loop",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sse_streams = Gauge("t2i_active_sse_streams", "Open SSE streams", registry=self.registry)
        self.ws_connections = Gauge("t2i_websocket_connections", "Open WebSocket connections", registry=self.registry)
        self.variant_lookups = Counter("t2i_image_variant_lookups", "Re-encoded (jpeg/webp) image lookups",
                                       ["outcome"], registry=self.registry)
        self.engine = None  # bound once the engine exists (the lifespan)
        self.retention = None  # server.core.retention.Retention, single node only
        self.registry.register(_EngineCollector(self))
        self.registry.register(_RetentionCollector(self))

    def bind(self, engine) -> None:
        self.engine = engine

    def bind_retention(self, retention) -> None:
        self.retention = retention

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Queue depth and jobs by state, read from the engine at scrape time."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        engine = self._metrics.engine
        counts = engine.counts() if engine is not None else {}
        depth = GaugeMetricFamily("t2i_queue_depth", "Jobs waiting for the GPU")
        depth.add_metric([], counts.get("pending", 0))
        jobs = GaugeMetricFamily("t2i_jobs", "Unfinished jobs by state", labels=["status"])
        for status in ACTIVE:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield depth
        yield jobs


class _RetentionCollector:
    """What retention pruned since start and what is kept, as of its latest run."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        retention = self._metrics.retention
        if retention is None:
            return
        counts = retention.counts
        pruned = CounterMetricFamily("t2i_pruned", "Deleted by retention since start", labels=["kind"])
        for kind, value in counts.pruned.items():
            pruned.add_metric([kind], value)
        yield pruned
        yield GaugeMetricFamily("t2i_kept_jobs", "Job records kept (latest retention run)", value=counts.kept_jobs)
        yield GaugeMetricFamily("t2i_kept_image_bytes", "Bytes of image files kept (latest retention run)",
                                value=counts.kept_bytes)
