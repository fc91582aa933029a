"""POST /v1/nifti: a NIfTI volume (FLAIR alone, one 4-D file, or 3 channel files) -> the mask NIfTI, or JSON."""

import logging
import time
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import DeadlineDep, ServiceDep, SettingsDep
from app.api.routes.predict import ERRORS, model_versions, ms
from app.api.routes.series import SeriesPrediction, to_series_prediction
from app.api.schemas import MaskFormat
from app.core.analysis import analyse_series, series_limits
from app.core.nifti import NIFTI_MEDIA_TYPE, mask_nifti, read_nifti
from app.core.series import Upload

log = logging.getLogger(__name__)

router = APIRouter(prefix="/nifti", tags=["nifti"])


class NiftiOutput(StrEnum):
    nifti = "nifti"
    json = "json"


FilesField = Annotated[
    list[UploadFile],
    File(
        description="`.nii` or `.nii.gz`: one 3-D FLAIR volume, one 4-D volume with 3 channels (pre-contrast, "
        "FLAIR, post-contrast), or 3 files of 3-D volumes in that order on the same grid."
    ),
]


@router.post(
    "",
    response_model=SeriesPrediction,
    responses={
        **ERRORS,
        200: {
            "content": {NIFTI_MEDIA_TYPE: {}},
            "description": "The mask as a gzipped NIfTI (uint8 0/1, the input's grid and affine; headers "
            "X-Tumor-Volume-mL and X-Tumor-Voxels), or with output=json the per-slice results.",
        },
    },
    summary="Segment the tumor in a NIfTI volume; mask NIfTI with the input's affine and the volume in mL",
)
async def predict_nifti(
    files: FilesField,
    service: ServiceDep,
    settings: SettingsDep,
    deadline: DeadlineDep,
    output: Annotated[NiftiOutput, Query(description="nifti (the mask file) or json.")] = NiftiOutput.nifti,
    largest_component: Annotated[
        bool, Query(description="Keep only the largest 3-D (26-)connected tumor region, as Buda et al. do.")
    ] = False,
    mask_format: Annotated[MaskFormat, Query(description="With output=json: each slice's mask.")] = MaskFormat.rle,
) -> SeriesPrediction | Response:
    started = time.perf_counter()
    uploads = [Upload(f.filename, await f.read(), f.content_type) for f in files]
    deadline.check("decoding")
    volume = await run_in_threadpool(read_nifti, uploads, series_limits(settings))
    del uploads
    analysis = await analyse_series(service, volume.series, largest_component, deadline)
    log.info("nifti: %d slices, %d tumor voxels", len(analysis.masks), analysis.tumor_voxels)
    deadline.check("encoding")
    if output is NiftiOutput.nifti:
        volume_ml = analysis.tumor_volume_ml
        return Response(
            await run_in_threadpool(mask_nifti, analysis.masks, volume),
            media_type=NIFTI_MEDIA_TYPE,
            headers={
                "Content-Disposition": 'attachment; filename="tumor-mask.nii.gz"',
                "X-Tumor-Voxels": str(analysis.tumor_voxels),
                "X-Tumor-Volume-mL": "" if volume_ml is None else f"{volume_ml:.6f}",
            },
        )
    result = await run_in_threadpool(
        to_series_prediction,
        volume.series,
        analysis.predictions,
        analysis.masks,
        mask_format,
        False,
        largest_component,
        model_versions(service.card),
    )
    result.total_ms = ms(time.perf_counter() - started)
    return result
