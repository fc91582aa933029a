"""Probes and metrics: no API key, so orchestrators and Prometheus need no secret."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import ServiceDep
from app.api.schemas import ErrorBody, Status
from app.core.service import State

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, responses={503: {"model": ErrorBody}}, summary="Liveness")
async def healthz(service: ServiceDep) -> Status | JSONResponse:
    # Failed model loading cannot heal by itself: report unhealthy so the orchestrator restarts the process.
    if service.state is State.FAILED:
        return JSONResponse({"detail": service.failure}, status_code=503)
    return Status(status="alive")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}}, summary="Readiness")
async def readyz(service: ServiceDep) -> Status | JSONResponse:
    # 503 while loading, when saturated (a load balancer routes around) and from SIGTERM on (it stops routing here).
    reason = service.not_ready_reason
    if reason is None:
        return Status(status="ready")
    return JSONResponse({"detail": reason}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)")
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
