"""The FastAPI app: `uvicorn app.main:app` (settings from LGG_* environment variables, see app/core/config.py)."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from app.api.deps import declare_api_key
from app.api.errors import add_error_handlers
from app.api.limits import BodyLimitMiddleware
from app.api.overload import AdmissionMiddleware
from app.api.routes import dicom_node, dicomweb, health, models, nifti, predict, series, viewer
from app.api.security import ApiKeyMiddleware, RedactCredentials, SecurityHeadersMiddleware
from app.api.shutdown import CloseWhenDrainingMiddleware, drain_on_sigterm
from app.core.admission import Admission
from app.core.config import Settings
from app.core.dicom_node import start_dicom_node
from app.core.onnx_sessions import read_model_card
from app.core.service import InferenceService
from app.core.telemetry import HttpMetricsMiddleware, ServiceMetrics
from app.core.work_priority import lower_work_threads

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around a file of max_upload_bytes


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    lower_work_threads(settings.work_niceness)  # before the service starts any thread
    # Fast and fatal: a missing file or a wrong checksum stops the process before it listens.
    card = read_model_card(settings.model_dir)
    log.info("model card %s verified in %s", card.version, settings.model_dir)
    service = app.state.service = InferenceService(settings, card, app.state.metrics, app.state.admission)
    loading = asyncio.create_task(service.load(), name="load-models")
    node = app.state.dicom_node = await start_dicom_node(settings, service, app.state.metrics.registry)
    restore_sigterm = drain_on_sigterm(service, settings)
    try:
        yield
    finally:
        restore_sigterm()
        if node is not None:
            await node.stop()
        await service.stop()
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        app.state.metrics.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("app").setLevel(settings.log_level)
    logging.getLogger("uvicorn.access").addFilter(RedactCredentials())
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the app itself, not from a CDN (offline sites).
    app = FastAPIOffline(
        title="LGG brain MRI tumor service",
        version="0.1.0",
        description="Detects lower-grade glioma FLAIR abnormalities in brain MRI slices and segments them. "
        "Research and engineering demonstration; NOT a medical device.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    metrics = app.state.metrics = ServiceMetrics()
    metrics.admission_capacity.set(settings.max_in_flight_slices)
    app.state.admission = Admission(settings.max_in_flight_slices, metrics.in_flight.set, metrics.rejected.inc)
    add_error_handlers(app)
    # Middleware, innermost first: admission, closing connections while draining, body caps, API key, CORS,
    # security headers, metrics (outermost: counts the 401s, 413s and 503s too).
    app.add_middleware(
        AdmissionMiddleware,
        admission=app.state.admission,
        timeout_s=settings.request_timeout_s,
        on_timeout=metrics.timed_out.inc,
    )
    app.add_middleware(CloseWhenDrainingMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        limits_by_path={
            "/v1/predict/batch": settings.max_batch_bytes,
            "/v1/series": settings.max_batch_bytes,
            "/v1/nifti": settings.max_batch_bytes,
        },
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
        )
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(declare_api_key)] if settings.api_key is not None else [])
    v1.include_router(predict.router)
    v1.include_router(models.router)
    v1.include_router(series.router)
    v1.include_router(nifti.router)
    v1.include_router(dicomweb.router)
    v1.include_router(dicom_node.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(viewer.router)
    return app


app = create_app()
