"""POST /v1/predict (JSON), /v1/predict/mask.png, /v1/predict/overlay.png and /v1/predict/batch."""

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import DeadlineDep, ServiceDep, SettingsDep
from app.api.schemas import BatchItem, BatchPrediction, ErrorBody, MaskFormat, ModelVersions, Prediction, Timings
from app.core.codecs import (
    ImageRejected,
    bounding_box,
    decode_image,
    mask_to_png,
    mask_to_png_base64,
    mask_to_rle,
    overlay_png,
)
from app.core.config import Settings
from app.core.deadline import Deadline
from app.core.limits import ImageLimits, PixelBudget
from app.core.onnx_sessions import ModelCard
from app.core.pipeline import SlicePrediction

router = APIRouter(prefix="/predict", tags=["predict"])

ERRORS = {
    code: {"model": ErrorBody, "description": description}
    for code, description in {
        400: "Empty, malformed or undecodable image",
        401: "Missing or wrong API key",
        413: "File, request, image dimensions or decoded pixels of the request too large",
        415: "Not DICOM, TIFF, PNG, JPEG or WebP (or a DICOM compression no installed decoder reads)",
        422: "Missing or invalid field",
        503: "Models still loading, or every DICOM decoder busy",
        504: "The request took more than its time budget (LGG_REQUEST_TIMEOUT_S)",
    }.items()
}
PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "A PNG the size of the input slice."}}
FileField = Annotated[
    UploadFile,
    File(
        description="One slice: DICOM, TIFF, PNG, JPEG or WebP; RGB in kaggle_3m channel order or single-channel FLAIR."
    ),
]
MaskFormatQuery = Annotated[MaskFormat, Query(description="How to return the mask.")]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes (parsed into memory by the multipart parser), capped: ImageRejected 413 beyond."""
    data = await upload.read()
    if len(data) > settings.max_upload_bytes:
        raise ImageRejected(413, f"file is {len(data)} bytes, more than the limit of {settings.max_upload_bytes}")
    return data


async def read_slice(upload: UploadFile, settings: Settings, deadline: Deadline) -> np.ndarray:
    """One upload, capped and decoded off the event loop; raises ImageRejected with the status to answer."""
    data = await read_upload(upload, settings)
    deadline.check("decoding")
    return await run_in_threadpool(decode_image, data, ImageLimits.from_settings(settings), upload.content_type)


def model_versions(card: ModelCard) -> ModelVersions:
    return ModelVersions(
        card_version=card.version,
        classifier_sha256=card.classifier.sha256,
        segmenter_sha256=card.segmenter.sha256,
    )


def to_prediction(
    slice_: np.ndarray, prediction: SlicePrediction, mask_format: MaskFormat, versions: ModelVersions
) -> Prediction:
    mask = prediction.mask
    encoded = None
    if mask is not None and mask_format is MaskFormat.rle:
        encoded = mask_to_rle(mask)
    elif mask is not None and mask_format is MaskFormat.png:
        encoded = mask_to_png_base64(mask)
    return Prediction(
        tumor_detected=prediction.tumor_detected,
        tumor_probability=prediction.tumor_probability,
        mask=encoded,
        bbox=bounding_box(mask) if mask is not None else None,
        area_pixels=np.count_nonzero(mask) if mask is not None else 0,
        image_size=list(slice_.shape[:2]),
        models=versions,
    )


async def predict_one(
    upload: UploadFile, service: ServiceDep, settings: Settings, deadline: Deadline
) -> tuple[np.ndarray, SlicePrediction]:
    slice_ = await read_slice(upload, settings, deadline)
    [prediction] = await service.predict([slice_], deadline)
    deadline.check("encoding")
    return slice_, prediction


@router.post("", response_model=Prediction, responses=ERRORS, summary="Detect and segment a tumor in one slice")
async def predict(
    file: FileField,
    service: ServiceDep,
    settings: SettingsDep,
    deadline: DeadlineDep,
    mask_format: MaskFormatQuery = MaskFormat.rle,
) -> Prediction:
    started = time.perf_counter()
    slice_ = await read_slice(file, settings, deadline)
    decoded = time.perf_counter()
    [prediction] = await service.predict([slice_], deadline)
    deadline.check("encoding")
    predicted = time.perf_counter()
    versions = model_versions(service.card)
    if mask_format is MaskFormat.png:  # a PNG encode takes milliseconds: off the event loop
        result = await run_in_threadpool(to_prediction, slice_, prediction, mask_format, versions)
    else:  # RLE and the model take ~0.05 ms: less than a trip to the thread pool and back
        result = to_prediction(slice_, prediction, mask_format, versions)
    finished = time.perf_counter()
    batch = prediction.batch
    computing_s = prediction.preprocess_s + batch.classifier_s + batch.segmenter_s + prediction.postprocess_s
    result.timings = Timings(
        decode_ms=ms(decoded - started),
        preprocess_ms=ms(prediction.preprocess_s),
        wait_ms=ms(max(0.0, predicted - decoded - computing_s)),
        classifier_ms=ms(batch.classifier_s),
        segmenter_ms=ms(batch.segmenter_s),
        postprocess_ms=ms(prediction.postprocess_s),
        encode_ms=ms(finished - predicted),
        total_ms=ms(finished - started),
        batch_size=batch.batch_size,
    )
    return result


def image_response(content: bytes, prediction: SlicePrediction) -> Response:
    headers = {
        "X-Tumor-Detected": str(prediction.tumor_detected).lower(),
        "X-Tumor-Probability": f"{prediction.tumor_probability:.6f}",
    }
    return Response(content, media_type="image/png", headers=headers)


@router.post(
    "/mask.png",
    response_class=Response,
    responses={**PNG_RESPONSE, **ERRORS},
    summary="The tumor mask as a 1-bit PNG (all background when no tumor)",
)
async def predict_mask_png(
    file: FileField, service: ServiceDep, settings: SettingsDep, deadline: DeadlineDep
) -> Response:
    slice_, prediction = await predict_one(file, service, settings, deadline)
    mask = prediction.mask if prediction.mask is not None else np.zeros(slice_.shape[:2], bool)
    return image_response(await run_in_threadpool(mask_to_png, mask), prediction)


@router.post(
    "/overlay.png",
    response_class=Response,
    responses={**PNG_RESPONSE, **ERRORS},
    summary="The slice's FLAIR channel with the tumor outlined in red",
)
async def predict_overlay_png(
    file: FileField, service: ServiceDep, settings: SettingsDep, deadline: DeadlineDep
) -> Response:
    slice_, prediction = await predict_one(file, service, settings, deadline)
    return image_response(await run_in_threadpool(overlay_png, slice_, prediction.mask), prediction)


@router.post("/batch", response_model=BatchPrediction, responses=ERRORS, summary="Many slices in one request")
async def predict_batch(
    files: Annotated[list[UploadFile], File(description="Slices, the field repeated once per file.")],
    service: ServiceDep,
    settings: SettingsDep,
    deadline: DeadlineDep,
    mask_format: MaskFormatQuery = MaskFormat.rle,
) -> BatchPrediction:
    started = time.perf_counter()
    if len(files) > settings.max_batch_files:
        detail = f"{len(files)} files in one request, more than the limit of {settings.max_batch_files}"
        raise HTTPException(413, detail)
    items = [BatchItem(filename=f.filename, status_code=200) for f in files]
    uploads: dict[int, bytes] = {}
    for index, upload in enumerate(files):
        try:
            uploads[index] = await read_upload(upload, settings)
        except ImageRejected as error:  # this file fails alone
            items[index].status_code, items[index].detail = error.status_code, error.detail
    limits = ImageLimits.from_settings(settings)
    content_types = [f.content_type for f in files]

    def decode_all() -> dict[int, np.ndarray]:  # one trip to the thread pool for all files, not one per file
        budget = PixelBudget(settings.max_request_pixels)  # all files of the request together
        slices = {}
        for index, data in deadline.each(uploads.items(), "decoding"):
            try:
                slices[index] = decode_image(data, limits, content_types[index], budget)
            except ImageRejected as error:  # this file fails alone
                items[index].status_code, items[index].detail = error.status_code, error.detail
        return slices

    slices = await run_in_threadpool(decode_all)
    predictions = await service.predict(list(slices.values()), deadline)
    deadline.check("encoding")
    versions = model_versions(service.card)

    def encode_all() -> None:  # one trip to the thread pool for the whole request, not one per slice
        for (index, slice_), prediction in zip(slices.items(), predictions, strict=True):
            items[index].prediction = to_prediction(slice_, prediction, mask_format, versions)

    await run_in_threadpool(encode_all)
    return BatchPrediction(
        results=items,
        succeeded=len(slices),
        failed=len(files) - len(slices),
        total_ms=ms(time.perf_counter() - started),
    )
