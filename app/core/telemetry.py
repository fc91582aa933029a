"""Prometheus metrics, one registry per app so tests and several apps in one process stay apart.

Names follow Prometheus conventions (base units, `_total` counters); the HTTP ones match
prometheus-fastapi-instrumentator's, so existing dashboards work.

Several uvicorn workers (`--workers N`): with PROMETHEUS_MULTIPROC_DIR set in the environment (it must be set
before prometheus_client is imported, so by whoever starts uvicorn), prometheus_client's multiprocess mode
keeps every worker's values in files there and /metrics sums them over the workers, whichever answers the
scrape. Without it, one process: its own registry, process and platform metrics included.
"""

import os
import time
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.pipeline import BatchTimings, SlicePrediction

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess_dir() -> Path | None:
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def forget_dead_workers(directory: Path) -> None:
    """A worker that died without shutting down (killed, crashed) left its live gauges: drop them (its counters
    stay, so totals never go down)."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        if not pid_alive(pid):
            mark_process_dead(pid, str(directory))


class ServiceMetrics:
    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is not None:  # before the first metric: each opens its file there
            self.multiprocess_dir.mkdir(parents=True, exist_ok=True)  # e.g. under an emptyDir /tmp
            forget_dead_workers(self.multiprocess_dir)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.http_requests = Counter(
            "http_requests_total", "HTTP requests by route template, method and status.",
            ["handler", "method", "status"], registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "http_request_duration_seconds", "HTTP request latency, first byte in to last byte out.",
            ["handler", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "lgg_inference_duration_seconds", "One ONNX Runtime call (a whole batch), by model.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "lgg_inference_batch_size", "Slices per ONNX Runtime call, by model.",
            ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "lgg_pipeline_stage_duration_seconds", "Per-slice preprocessing and postprocessing time.",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "lgg_queue_wait_seconds", "Time a slice waited for its batch to start.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.slices = Counter("lgg_slices_processed_total", "Slices run through the classifier.", registry=r)
        self.tumors = Counter("lgg_tumors_detected_total", "Slices the classifier flagged as tumor.", registry=r)
        # Several workers: in flight and the bound are summed over the live workers; ready only when all are.
        self.in_flight = Gauge(
            "lgg_in_flight_slices", "Slices admitted and not yet answered.", multiprocess_mode="livesum", registry=r
        )
        self.admission_capacity = Gauge(
            "lgg_admission_capacity_slices", "The bound on slices in flight.", multiprocess_mode="livesum", registry=r
        )
        self.rejected = Counter(
            "lgg_rejected_requests_total", "Requests refused with 503: the bound on slices in flight was reached.",
            registry=r,
        )  # fmt: skip
        self.timed_out = Counter(
            "lgg_timed_out_requests_total", "Requests answered 504 and DICOM node series failed: their time budget "
            "(LGG_REQUEST_TIMEOUT_S) ran out.", registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "lgg_ready", "1 when the models are loaded and warmed up.", multiprocess_mode="livemin", registry=r
        )
        self.model_info = Info("lgg_model", "The served model card version, file hashes and providers.", registry=r)

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's registry, or every worker's values summed."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(self.multiprocess_dir))
        registry.register(self.model_info)  # an Info is not shared between processes; every worker has the same
        return generate_latest(registry)

    def close(self) -> None:
        """At this worker's exit: its live gauges stop counting (multiprocess mode)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), str(self.multiprocess_dir))

    def observe_batch(self, timings: BatchTimings) -> None:
        """Pipeline callback, once per batch."""
        self.slices.inc(timings.batch_size)
        self.tumors.inc(timings.segmented)
        self.inference_duration.labels("classifier").observe(timings.classifier_s)
        self.batch_size.labels("classifier").observe(timings.batch_size)
        if timings.segmented:
            self.inference_duration.labels("segmenter").observe(timings.segmenter_s)
            self.batch_size.labels("segmenter").observe(timings.segmented)

    def observe_slices(self, predictions: list[SlicePrediction]) -> None:
        for prediction in predictions:
            self.stage_duration.labels("preprocess").observe(prediction.preprocess_s)
            self.stage_duration.labels("postprocess").observe(prediction.postprocess_s)


class HttpMetricsMiddleware:
    """Counts every request by its route template (not the raw path, which would explode label cardinality)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            template = getattr(scope.get("route"), "path", None)
            # A matched static route's path is its own template (the route object lacks the router prefixes);
            # routes with parameters keep their template so label values stay few.
            handler = "unmatched" if template is None else template if "{" in template else scope["path"]
            self.metrics.http_requests.labels(handler, scope["method"], str(status)).inc()
            self.metrics.http_duration.labels(handler, scope["method"]).observe(time.perf_counter() - started)
