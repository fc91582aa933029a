"""A series' slices -> per-slice predictions and the (slices, H, W) mask stack.

The one path every series entry point takes: POST /v1/series, POST /v1/nifti, the DICOM node and the
DICOMweb route. Reading (DICOM, images, NIfTI) happens before; encoding (JSON, DICOM SEG, NIfTI) after.
"""

from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.deadline import Deadline
from app.core.dicom_seg import build_segmentation
from app.core.pipeline import SlicePrediction
from app.core.postprocessing import keep_largest_component
from app.core.series import Series, SeriesLimits, Upload, read_series
from app.core.service import InferenceService


@dataclass(frozen=True)
class SeriesAnalysis:
    series: Series
    predictions: list[SlicePrediction]
    masks: np.ndarray  # bool (slices, H, W) in the series' slice order

    @property
    def tumor_voxels(self) -> int:
        return int(self.masks.sum())

    @property
    def tumor_volume_ml(self) -> float | None:
        volume = self.series.voxel_volume_ml
        return None if volume is None else self.tumor_voxels * volume


def series_limits(settings: Settings) -> SeriesLimits:
    return SeriesLimits.from_settings(settings)


def stack_masks(series: Series, predictions: list[SlicePrediction]) -> np.ndarray:
    height, width = series.slices[0].pixels.shape[:2]
    masks = np.zeros((len(predictions), height, width), bool)
    for index, prediction in enumerate(predictions):
        if prediction.mask is not None:
            masks[index] = prediction.mask
    return masks


async def analyse_series(
    service: InferenceService, series: Series, largest_component: bool, deadline: Deadline
) -> SeriesAnalysis:
    predictions = await service.predict([s.pixels for s in series.slices], deadline)
    masks = stack_masks(series, predictions)
    if largest_component:
        deadline.check("3-D postprocessing")
        masks = await run_in_threadpool(keep_largest_component, masks)
    return SeriesAnalysis(series, predictions, masks)


async def segment_dicom(
    service: InferenceService,
    uploads: list[Upload],
    limits: SeriesLimits,
    deadline: Deadline,
    largest_component: bool = False,
) -> tuple[SeriesAnalysis, bytes]:
    """DICOM files of one series -> the analysis and its DICOM SEG (the DICOM node's and DICOMweb's path)."""
    series = await run_in_threadpool(read_series, uploads, limits, deadline)
    analysis = await analyse_series(service, series, largest_component, deadline)
    deadline.check("encoding")
    return analysis, await run_in_threadpool(build_segmentation, series, analysis.masks, service.card)
