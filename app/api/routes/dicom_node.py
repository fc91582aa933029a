"""/v1/dicom-node: the DICOM node's state, the series kept in its spool after a failure, and their retry."""

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from app.core.dicom_node import DicomNode

router = APIRouter(prefix="/dicom-node", tags=["dicom-node"])


class NodeState(BaseModel):
    ae_title: str
    port: int = Field(description="The DICOM port listened on.")
    destination_ae_title: str = Field(description="Where SEGs are sent by C-STORE.")
    spool_bytes: int
    series: dict[str, int] = Field(description="Series in the spool: incoming, processing, failed.")


class FailedSeriesItem(BaseModel):
    batch: str = Field(description="The spool's id for this series (a hash, no DICOM UID).")
    instances: int
    bytes: int
    error: str = Field(description="Why the last attempt failed.")
    attempts: int
    failed_at: float = Field(description="Unix time of the last failure.")


def node(request: Request) -> DicomNode:
    running = getattr(request.app.state, "dicom_node", None)
    if running is None:
        raise HTTPException(404, "the DICOM node is off (set LGG_DICOM_NODE=true and LGG_DICOM_DESTINATION)")
    return running


NODE_OFF = {404: {"description": "The DICOM node is off (LGG_DICOM_NODE), or no such failed series"}}


@router.get(
    "", response_model=NodeState, responses=NODE_OFF, summary="The DICOM node's AE, port, destination and spool"
)
def node_state(request: Request) -> NodeState:
    running = node(request)
    return NodeState(
        ae_title=running.settings.dicom_ae_title,
        port=running.port,
        destination_ae_title=running.destination.ae_title,
        spool_bytes=running.spool.bytes,
        series=running.spool.counts(),
    )


@router.get(
    "/failed",
    response_model=list[FailedSeriesItem],
    responses=NODE_OFF,
    summary="Series kept in the spool after a failure",
)
def failed_series(request: Request) -> list[FailedSeriesItem]:
    return [FailedSeriesItem(**vars(item)) for item in node(request).spool.list_failed()]


@router.post("/failed/{batch}/retry", status_code=202, responses=NODE_OFF, summary="Run a failed series again")
def retry_series(batch: str, request: Request) -> dict[str, str]:
    if not node(request).spool.retry(batch):
        raise HTTPException(404, f"no failed series {batch!r} in the spool")
    return {"batch": batch, "state": "queued"}
