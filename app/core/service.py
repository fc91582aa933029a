"""The running service's state: the verified model card, then (after a background load) sessions,
pipeline and runner. Routes ask it for predictions; health routes ask it whether it is ready."""

import asyncio
import logging
import threading
from enum import StrEnum

import numpy as np

from app.core.admission import Admission
from app.core.batching import DirectRunner, DynamicBatcher, InferenceRunner, batch_concurrency
from app.core.config import Settings
from app.core.deadline import Deadline
from app.core.onnx_sessions import LoadedModels, ModelCard, load_models
from app.core.pipeline import Pipeline, SlicePrediction
from app.core.telemetry import ServiceMetrics

log = logging.getLogger(__name__)


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class NotReady(RuntimeError):
    """Predictions were asked for before the models were loaded and warmed up (or after loading failed)."""


class InferenceService:
    def __init__(self, settings: Settings, card: ModelCard, metrics: ServiceMetrics, admission: Admission) -> None:
        self.settings = settings
        self.card = card
        self.metrics = metrics
        self.admission = admission
        self.state = State.LOADING
        self.draining = False  # set on SIGTERM: not ready any more, still answering what arrives
        self.failure: str | None = None
        self.models: LoadedModels | None = None
        self.pipeline: Pipeline | None = None
        self.runner: InferenceRunner | None = None
        self._cancel_loading = threading.Event()

    async def load(self) -> None:
        """Create sessions and warm up in a thread, so /healthz and /readyz answer meanwhile."""
        try:
            models = await asyncio.to_thread(load_models, self.card, self.settings, self._cancel_loading)
        except Exception as error:  # any loading failure leaves a stopped, clearly unhealthy service
            log.exception("model loading failed")
            self.failure, self.state = f"model loading failed: {error}", State.FAILED
            return
        if self._cancel_loading.is_set():
            return
        self.models = models
        self.pipeline = Pipeline(models, self.settings.max_batch_size, on_batch=self.metrics.observe_batch)
        self.runner = (
            DynamicBatcher(
                self.pipeline,
                self.settings.max_batch_size,
                self.settings.max_wait_ms,
                batch_concurrency(self.settings, models.classifier.providers),
                on_queue_wait=self.metrics.queue_wait.observe,
            )
            if self.settings.batching
            else DirectRunner(self.pipeline)
        )
        self.metrics.model_info.info(
            {
                "version": self.card.version,
                "classifier_sha256": self.card.classifier.sha256,
                "segmenter_sha256": self.card.segmenter.sha256,
                "providers": ",".join(models.classifier.providers),
            }
        )
        self.metrics.ready.set(1)
        self.state = State.READY
        log.info("ready: model card %s, batching %s", self.card.version, "on" if self.settings.batching else "off")

    @property
    def not_ready_reason(self) -> str | None:
        """Why a load balancer should not send this process new requests now; None when it may."""
        if self.draining:
            return "shutting down: finishing the requests in flight"
        if self.state is not State.READY:
            return self.failure or "the models are still loading and warming up"
        if self.admission.saturated:
            return f"saturated: {self.admission.in_flight} slices in flight, the bound is {self.admission.capacity}"
        return None

    async def predict(self, slices: list[np.ndarray], deadline: Deadline) -> list[SlicePrediction]:
        """Runs the slices of one admitted request (it holds one unit of admission: one more per further slice,
        released once its work has ended: the runner returns only then, even when the deadline stopped it)."""
        if self.runner is None:
            raise NotReady(self.failure or "the models are still loading and warming up; retry shortly")
        extra = max(0, len(slices) - 1)
        self.admission.acquire(extra, held=1)
        try:
            predictions = await self.runner.predict(slices, deadline)
        finally:
            self.admission.release(extra)
        self.metrics.observe_slices(predictions)
        return predictions

    async def stop(self) -> None:
        self._cancel_loading.set()
        if self.runner is not None:
            await self.runner.stop()
        self.metrics.ready.set(0)
