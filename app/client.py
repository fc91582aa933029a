"""A small typed Python client for the tumor service, and decoders for the masks it returns.

    with TumorClient("http://localhost:8000", api_key="...") as client:
        prediction = client.predict("TCGA_CS_4941_19960909_12.tif")
        mask = mask_array(prediction)  # bool HxW, or None when no tumor was detected

Responses are parsed into the service's own response models (app/api/schemas.py). Every failure raises a
ClientError: ServiceError carries the HTTP status and the service's message, ServiceUnreachable says that no
answer came at all.
"""

import base64
import io
import mimetypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import numpy as np
from PIL import Image

from app.api.schemas import (
    BatchPrediction,
    DicomwebResult,
    MaskFormat,
    ModelsInfo,
    PngMask,
    Prediction,
    RleMask,
    SeriesPrediction,
    Status,
)

# A slice to send: a path to an image file, or its bytes (then the name is "slice").
ImageSource = str | os.PathLike[str] | bytes
# Several slices: paths, bytes, or (file name, bytes) pairs.
ImageSources = Sequence[ImageSource | tuple[str, bytes]]
API_KEY_HEADER = "X-API-Key"
READY_POLL_S = 0.25


class ClientError(Exception):
    """Anything that kept a request from getting a successful answer."""


class ServiceUnreachable(ClientError):
    """No HTTP answer: connection refused, DNS failure, timeout."""


class ServiceError(ClientError):
    """The service answered with an error status; `detail` is its message for a person."""

    def __init__(self, status_code: int, detail: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path} answered {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def error_detail(response: httpx.Response) -> str:
    """The service's `{"detail": ...}` message, or the start of whatever else came back."""
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase
    return detail if isinstance(detail, str) else str(detail)


def file_part(image: ImageSource, filename: str | None = None) -> tuple[str, bytes, str]:
    """(name, bytes, content type) for a multipart upload; the type follows the name's extension."""
    if isinstance(image, bytes):
        name, data = filename or "slice", image
    else:
        path = Path(image)
        name, data = filename or path.name, path.read_bytes()
    return name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"


def file_parts(images: ImageSources, field: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart field repeated once per image."""
    return [(field, file_part(i[1], i[0]) if isinstance(i, tuple) else file_part(i)) for i in images]


def rle_to_mask(rle: RleMask) -> np.ndarray:
    """COCO uncompressed RLE (column-major runs, background first) -> bool array of shape `size`."""
    height, width = rle.size
    runs = np.asarray(rle.counts, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(f"RLE counts must be non-negative runs covering {height} x {width} pixels")
    values = np.arange(runs.size) % 2 == 1  # runs alternate background, tumor, background, ...
    return np.repeat(values, runs).reshape((height, width), order="F")


def png_to_mask(png: PngMask) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(png.data))) as image:
        return np.asarray(image.convert("L")) > 0


def decode_mask(mask: RleMask | PngMask | None) -> np.ndarray | None:
    """A mask as the client returns it (in a Prediction or a series' SliceResult) -> bool HxW array, or None."""
    if isinstance(mask, RleMask):
        return rle_to_mask(mask)
    if isinstance(mask, PngMask):
        return png_to_mask(mask)
    return None


def mask_array(prediction: Prediction) -> np.ndarray | None:
    """The prediction's mask as a bool HxW array; None when it carries none (no tumor, or mask_format=none)."""
    return decode_mask(prediction.mask)


@dataclass(frozen=True)
class NiftiMask:
    """POST /v1/nifti's answer: a binary NIfTI, not JSON, so its numbers come from response headers."""

    data: bytes = field(repr=False)  # gzipped NIfTI mask on the input's grid and affine
    tumor_voxels: int
    tumor_volume_ml: float | None  # None when the header has no voxel size


class TumorClient:
    """Synchronous client; one connection pool, closed by `close()` or by leaving the `with` block."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            reason = str(error) or type(error).__name__
            raise ServiceUnreachable(f"{method} {self.http.base_url.join(path)}: {reason}") from error
        if response.is_error:
            raise ServiceError(response.status_code, error_detail(response), method, path)
        return response

    def health(self) -> Status:
        """GET /healthz: the process is alive (ServiceError 503 when its models failed to load)."""
        return Status.model_validate(self.request("GET", "/healthz").json())

    def ready(self) -> bool:
        """GET /readyz: True once the models are loaded and warmed up, False while they are not."""
        try:
            self.request("GET", "/readyz")
        except ServiceError as error:
            if error.status_code == 503:
                return False
            raise
        return True

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Poll /readyz until ready; raises the last ServiceUnreachable, or TimeoutError, after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.ready():
                    return
                last_error: Exception = TimeoutError(f"service not ready after {timeout_s:g} s")
            except ServiceUnreachable as error:
                last_error = error
            if time.monotonic() >= deadline:
                raise last_error
            time.sleep(READY_POLL_S)

    def models(self) -> ModelsInfo:
        """GET /v1/models: the model card, the providers in use, the thresholds and the batching settings."""
        return ModelsInfo.model_validate(self.request("GET", "/v1/models").json())

    def metrics(self) -> str:
        """GET /metrics: Prometheus text exposition."""
        return self.request("GET", "/metrics").text

    def predict(
        self, image: ImageSource, *, filename: str | None = None, mask_format: MaskFormat | str = MaskFormat.rle
    ) -> Prediction:
        """POST /v1/predict: detection and segmentation of one slice."""
        response = self.request(
            "POST",
            "/v1/predict",
            params={"mask_format": MaskFormat(mask_format).value},
            files={"file": file_part(image, filename)},
        )
        return Prediction.model_validate(response.json())

    def predict_batch(self, images: ImageSources, *, mask_format: MaskFormat | str = MaskFormat.rle) -> BatchPrediction:
        """POST /v1/predict/batch: one result per image, in order; a bad image fails alone (its own status)."""
        params = {"mask_format": MaskFormat(mask_format).value}
        response = self.request("POST", "/v1/predict/batch", params=params, files=file_parts(images, "files"))
        return BatchPrediction.model_validate(response.json())

    def predict_series(
        self,
        files: ImageSources,
        *,
        largest_component: bool = False,
        mask_format: MaskFormat | str = MaskFormat.rle,
        include_images: bool = False,
    ) -> SeriesPrediction:
        """POST /v1/series: the slices of one series (DICOM files, a zip of them, a multi-frame DICOM, or numbered
        PNG/TIFF slices) in anatomical order with the tumor volume. Decode each slice's mask with decode_mask()."""
        params = {
            "largest_component": largest_component,
            "mask_format": MaskFormat(mask_format).value,
            "include_images": include_images,
        }
        response = self.request("POST", "/v1/series", params=params, files=file_parts(files, "files"))
        return SeriesPrediction.model_validate(response.json())

    def series_seg(self, files: ImageSources, *, largest_component: bool = False) -> bytes:
        """POST /v1/series?output=seg: a DICOM SEG of the series' tumor (DICOM input only)."""
        params = {"output": "seg", "largest_component": largest_component}
        return self.request("POST", "/v1/series", params=params, files=file_parts(files, "files")).content

    def nifti_mask(self, files: ImageSources, *, largest_component: bool = False) -> NiftiMask:
        """POST /v1/nifti (FLAIR alone, one 4-D file, or 3 files: pre-contrast, FLAIR, post-contrast): the mask as
        a gzipped NIfTI on the input's grid and affine, with the tumor voxels and volume from its headers."""
        params = {"largest_component": largest_component}
        response = self.request("POST", "/v1/nifti", params=params, files=file_parts(files, "files"))
        volume = response.headers.get("X-Tumor-Volume-mL")
        return NiftiMask(response.content, int(response.headers["X-Tumor-Voxels"]), float(volume) if volume else None)

    def dicomweb_series(
        self, dicomweb_url: str, study_instance_uid: str, series_instance_uid: str, *, store: bool = True
    ) -> DicomwebResult:
        """POST /v1/dicomweb/series: the service pulls the series from the PACS (WADO-RS), segments it and, with
        store, puts the DICOM SEG back (STOW-RS); the counts, volume and the SEG's UIDs."""
        body = {
            "dicomweb_url": dicomweb_url,
            "study_instance_uid": study_instance_uid,
            "series_instance_uid": series_instance_uid,
            "store": store,
        }
        return DicomwebResult.model_validate(self.request("POST", "/v1/dicomweb/series", json=body).json())

    def mask_png(self, image: ImageSource, *, filename: str | None = None) -> bytes:
        """POST /v1/predict/mask.png: the mask as a 1-bit PNG the size of the slice."""
        return self.request("POST", "/v1/predict/mask.png", files={"file": file_part(image, filename)}).content

    def overlay_png(self, image: ImageSource, *, filename: str | None = None) -> bytes:
        """POST /v1/predict/overlay.png: the slice's FLAIR channel with the tumor outlined."""
        return self.request("POST", "/v1/predict/overlay.png", files={"file": file_part(image, filename)}).content
