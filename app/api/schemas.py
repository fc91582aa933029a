"""Response bodies, as the OpenAPI docs at /docs show them."""

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.core.model_card import ModelCardSchema

TUMOR_DETECTED = (
    "True exactly when the mask has at least one pixel: the classifier passed its threshold AND the segmenter "
    "marked a region of at least the card's min_component_pixels. Flag, mask, area and bbox agree."
)
TUMOR_PROBABILITY = (
    "In [0, 1], for ranking slices (not calibrated). Under the card's postprocessing.tumor_probability rule "
    "'classifier_and_segmenter_peak': sqrt(classifier probability x the segmenter's highest pixel probability) "
    "where the segmenter ran, the classifier's probability where it did not; under 'classifier' (or none): the "
    "classifier's probability."
)


class MaskFormat(StrEnum):
    rle = "rle"
    png = "png"
    none = "none"


class RleMask(BaseModel):
    format: Literal["rle"] = "rle"
    size: list[int] = Field(description="[height, width] of the input slice.")
    counts: list[int] = Field(
        description="COCO uncompressed RLE: run lengths over the mask in column-major order, "
        "alternating background/tumor and starting with background (0 when the first pixel is tumor). "
        "Decode with pycocotools.mask.decode(pycocotools.mask.frPyObjects(mask, *size))."
    )


class PngMask(BaseModel):
    format: Literal["png"] = "png"
    size: list[int] = Field(description="[height, width] of the input slice.")
    data: str = Field(description="Base64 of a 1-bit PNG the size of the input slice (1 = tumor).")


class ModelVersions(BaseModel):
    card_version: str
    classifier_sha256: str
    segmenter_sha256: str


class Timings(BaseModel):
    decode_ms: float
    preprocess_ms: float
    wait_ms: float = Field(description="Waiting for a batch to start (queue) and thread hand-offs.")
    classifier_ms: float = Field(description="The classifier call of this slice's batch.")
    segmenter_ms: float = Field(description="The segmenter call of this slice's batch (0 when nothing was flagged).")
    postprocess_ms: float
    encode_ms: float
    total_ms: float
    batch_size: int = Field(description="Slices in the batch this slice ran in.")


class Prediction(BaseModel):
    tumor_detected: bool = Field(description=TUMOR_DETECTED)
    tumor_probability: float = Field(description=TUMOR_PROBABILITY)
    mask: RleMask | PngMask | None = Field(
        description="Segmented tumor at the input's size; null when no tumor was detected or mask_format=none. "
        "Never empty: a slice without a single mask pixel is tumor_detected false."
    )
    bbox: list[int] | None = Field(description="[x, y, width, height] in pixels around the mask; null if empty.")
    area_pixels: int = Field(description="Tumor pixels in the mask (0 when no tumor).")
    image_size: list[int] = Field(description="[height, width] of the decoded input.")
    models: ModelVersions
    timings: Timings | None = Field(None, description="Milliseconds per stage (single-slice routes).")


class SliceResult(BaseModel):
    index: int = Field(description="Position in anatomical order, from 0.")
    sop_instance_uid: str | None = Field(description="The source DICOM instance (null for PNG/TIFF slices).")
    frame_number: int | None = Field(description="1-based frame within a multi-frame DICOM file, else null.")
    filename: str | None = Field(description="The uploaded file name, for PNG/TIFF slices only.")
    tumor_detected: bool = Field(description=TUMOR_DETECTED)
    tumor_probability: float = Field(description=TUMOR_PROBABILITY)
    mask: RleMask | PngMask | None = Field(
        description="The slice's tumor mask (after the 3-D cleanup when asked), null when it has no tumor pixel "
        "or mask_format=none."
    )
    area_pixels: int = Field(description="Tumor pixels in this slice's mask.")
    image: str | None = Field(
        None,
        description="With include_images=true: base64 PNG of the 8-bit FLAIR the models saw "
        "(after the DICOM window), for viewers.",
    )


class VoxelSpacing(BaseModel):
    row_mm: float = Field(description="Between rows (PixelSpacing[0]).")
    column_mm: float = Field(description="Between columns (PixelSpacing[1]).")
    slice_mm: float = Field(description="Between slices.")
    slice_from: str = Field(
        description="Where slice_mm comes from: 'positions' (ImagePositionPatient), 'SpacingBetweenSlices' "
        "or 'SliceThickness'."
    )


class SeriesPrediction(BaseModel):
    slices: list[SliceResult] = Field(description="One entry per slice, in anatomical order.")
    slice_count: int
    ordered_by: str = Field(description="'position', 'instance_number', 'filename' or 'single slice'.")
    image_size: list[int] = Field(description="[height, width] of every slice.")
    largest_component: bool = Field(description="Whether only the largest 3-D connected tumor region was kept.")
    tumor_slices: int = Field(description="Slices with at least one tumor pixel.")
    tumor_volume_voxels: int = Field(description="Tumor pixels over all slices.")
    tumor_volume_ml: float | None = Field(
        description="tumor_volume_voxels x row x column x slice spacing / 1000; null without DICOM spacing."
    )
    voxel_spacing: VoxelSpacing | None
    models: ModelVersions
    total_ms: float


class BatchItem(BaseModel):
    filename: str | None
    status_code: int = Field(description="200, or the status this file alone would have got (400, 413, 415).")
    detail: str | None = Field(None, description="Why this file failed.")
    prediction: Prediction | None = None


class BatchPrediction(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order.")
    succeeded: int
    failed: int
    total_ms: float


class DicomwebResult(BaseModel):
    slice_count: int
    tumor_slices: int
    tumor_volume_voxels: int
    tumor_volume_ml: float | None = Field(description="Voxels x the series' voxel volume; null without spacing.")
    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    seg_series_number: int
    stored: bool = Field(description="Whether the SEG was stored in the PACS (STOW-RS).")
    total_ms: float


class Status(BaseModel):
    status: str


class ModelsInfo(BaseModel):
    card: ModelCardSchema = Field(description="model_card.json as served (app/core/model_card.py).")
    providers: dict[str, list[str]] = Field(description="ONNX Runtime execution providers each session took.")
    thresholds: dict[str, float]
    input_size: int
    batching: dict[str, Any]


class ErrorBody(BaseModel):
    detail: str
