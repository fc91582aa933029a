"""POST /v1/series: every slice of one series, in anatomical order, with the tumor volume; or a DICOM SEG."""

import base64
import io
import logging
import time
from enum import StrEnum
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.api.deps import DeadlineDep, ServiceDep, SettingsDep
from app.api.routes.predict import ERRORS, model_versions, ms
from app.api.schemas import MaskFormat, ModelVersions, SeriesPrediction, SliceResult, VoxelSpacing
from app.core.analysis import analyse_series, series_limits
from app.core.codecs import FLAIR_CHANNEL, mask_to_png_base64, mask_to_rle
from app.core.dicom_seg import build_segmentation
from app.core.pipeline import SlicePrediction
from app.core.series import Series, Upload, read_series

log = logging.getLogger(__name__)

router = APIRouter(prefix="/series", tags=["series"])

DICOM_MEDIA_TYPE = "application/dicom"


class SeriesOutput(StrEnum):
    json = "json"
    seg = "seg"


FilesField = Annotated[
    list[UploadFile],
    File(
        description="The series, the field repeated: DICOM files of one series, a zip of them, one multi-frame "
        "DICOM file, or PNG/TIFF slices whose file names end with their slice number."
    ),
]


def encode_mask(mask: np.ndarray, mask_format: MaskFormat) -> dict | None:
    if not mask.any() or mask_format is MaskFormat.none:
        return None
    return mask_to_rle(mask) if mask_format is MaskFormat.rle else mask_to_png_base64(mask)


def flair_png_base64(pixels: np.ndarray) -> str:
    """The slice's FLAIR channel as the models saw it, a gray PNG in base64."""
    buffer = io.BytesIO()
    Image.fromarray(pixels if pixels.ndim == 2 else pixels[..., FLAIR_CHANNEL]).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_series_prediction(
    series: Series,
    predictions: list[SlicePrediction],
    masks: np.ndarray,
    mask_format: MaskFormat,
    include_images: bool,
    largest_component: bool,
    versions: ModelVersions,
) -> SeriesPrediction:
    voxels = int(masks.sum())
    spacing = None
    if series.voxel_volume_ml is not None:
        row_mm, column_mm = series.pixel_spacing_mm
        spacing = VoxelSpacing(
            row_mm=row_mm, column_mm=column_mm, slice_mm=series.slice_spacing_mm, slice_from=series.slice_spacing_from
        )
    results = [
        SliceResult(
            index=index,
            sop_instance_uid=slice_.sop_instance_uid,
            frame_number=slice_.frame_number,
            filename=slice_.filename,
            tumor_detected=prediction.tumor_detected,
            tumor_probability=prediction.tumor_probability,
            mask=encode_mask(mask, mask_format),
            area_pixels=int(mask.sum()),
            image=flair_png_base64(slice_.pixels) if include_images else None,
        )
        for index, (slice_, prediction, mask) in enumerate(zip(series.slices, predictions, masks, strict=True))
    ]
    return SeriesPrediction(
        slices=results,
        slice_count=len(results),
        ordered_by=series.ordered_by,
        image_size=list(masks.shape[1:]),
        largest_component=largest_component,
        tumor_slices=int(masks.any(axis=(1, 2)).sum()),
        tumor_volume_voxels=voxels,
        tumor_volume_ml=voxels * series.voxel_volume_ml if series.voxel_volume_ml is not None else None,
        voxel_spacing=spacing,
        models=versions,
        total_ms=0.0,
    )


@router.post(
    "",
    response_model=SeriesPrediction,
    responses={
        **ERRORS,
        200: {"content": {DICOM_MEDIA_TYPE: {}}, "description": "JSON, or with output=seg a DICOM SEG file."},
    },
    summary="Detect and segment a tumor in every slice of a series; tumor volume; optional DICOM SEG",
)
async def predict_series(
    files: FilesField,
    service: ServiceDep,
    settings: SettingsDep,
    deadline: DeadlineDep,
    output: Annotated[SeriesOutput, Query(description="json, or seg for a DICOM SEG (DICOM input only).")] = (
        SeriesOutput.json
    ),
    largest_component: Annotated[
        bool, Query(description="Keep only the largest 3-D (26-)connected tumor region, as Buda et al. do.")
    ] = False,
    mask_format: Annotated[MaskFormat, Query(description="How to return each slice's mask.")] = MaskFormat.rle,
    include_images: Annotated[bool, Query(description="Add each slice's 8-bit FLAIR as a PNG (viewers).")] = False,
) -> SeriesPrediction | Response:
    started = time.perf_counter()
    uploads = [Upload(f.filename, await f.read(), f.content_type) for f in files]
    series = await run_in_threadpool(read_series, uploads, series_limits(settings), deadline)
    del uploads
    analysis = await analyse_series(service, series, largest_component, deadline)
    predictions, masks = analysis.predictions, analysis.masks
    # Counts and geometry only: nothing that identifies the patient is logged.
    log.info("series: %d slices ordered by %s, %d tumor voxels", len(masks), series.ordered_by, int(masks.sum()))
    deadline.check("encoding")
    if output is SeriesOutput.seg:
        seg = await run_in_threadpool(build_segmentation, series, masks, service.card)
        return Response(
            seg,
            media_type=DICOM_MEDIA_TYPE,
            headers={"Content-Disposition": 'attachment; filename="tumor-seg.dcm"'},
        )
    result = await run_in_threadpool(
        to_series_prediction,
        series,
        predictions,
        masks,
        mask_format,
        include_images,
        largest_component,
        model_versions(service.card),
    )
    result.total_ms = ms(time.perf_counter() - started)
    return result
