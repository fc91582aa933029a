"""POST /v1/dicomweb/series: pull a series from a PACS (WADO-RS), segment it, store the SEG back (STOW-RS)."""

import io
import logging
import time

import pydicom
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import DeadlineDep, ServiceDep, SettingsDep
from app.api.routes.predict import ERRORS, ms
from app.api.schemas import DicomwebResult
from app.core.analysis import segment_dicom, series_limits
from app.core.dicomweb import retrieve_series, store_seg

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


class DicomwebRequest(BaseModel):
    dicomweb_url: str = Field(
        pattern=r"^https?://[^\s/]+", description="The PACS's DICOMweb base URL, e.g. http://pacs:8042/dicom-web."
    )
    study_instance_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    series_instance_uid: str = Field(max_length=64, pattern=UID_PATTERN)
    store: bool = Field(True, description="STOW-RS the SEG back to the same PACS.")
    largest_component: bool = Field(False, description="Keep only the largest 3-D tumor region.")


@router.post(
    "/series",
    response_model=DicomwebResult,
    responses={
        **ERRORS,
        403: {"description": "The URL is not among LGG_DICOMWEB_ALLOWED_URLS"},
        404: {"description": "The PACS has no such series"},
        502: {"description": "PACS error"},
    },
    summary="Segment a series held by a PACS (WADO-RS) and store the DICOM SEG back (STOW-RS)",
)
async def dicomweb_series(
    body: DicomwebRequest, service: ServiceDep, settings: SettingsDep, deadline: DeadlineDep
) -> DicomwebResult:
    started = time.perf_counter()
    allowed = [p.strip() for p in settings.dicomweb_allowed_urls.split(",") if p.strip()]
    if allowed and not any(body.dicomweb_url.startswith(prefix) for prefix in allowed):
        raise HTTPException(403, "this DICOMweb URL is not among LGG_DICOMWEB_ALLOWED_URLS")
    uploads = await run_in_threadpool(
        retrieve_series,
        body.dicomweb_url,
        body.study_instance_uid,
        body.series_instance_uid,
        settings.max_batch_bytes,
        deadline,
    )
    analysis, seg = await segment_dicom(service, uploads, series_limits(settings), deadline, body.largest_component)
    del uploads
    if body.store:
        await run_in_threadpool(store_seg, body.dicomweb_url, seg, deadline)
    header = pydicom.dcmread(io.BytesIO(seg), stop_before_pixels=True)
    log.info("dicomweb: %d slices, %d tumor voxels, stored %s", len(analysis.masks), analysis.tumor_voxels, body.store)
    return DicomwebResult(
        slice_count=len(analysis.masks),
        tumor_slices=int(analysis.masks.any(axis=(1, 2)).sum()),
        tumor_volume_voxels=analysis.tumor_voxels,
        tumor_volume_ml=analysis.tumor_volume_ml,
        seg_series_instance_uid=str(header.SeriesInstanceUID),
        seg_sop_instance_uid=str(header.SOPInstanceUID),
        seg_series_number=int(header.SeriesNumber),
        stored=body.store,
        total_ms=ms(time.perf_counter() - started),
    )
