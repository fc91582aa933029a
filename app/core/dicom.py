"""DICOM bytes -> 8-bit slices the shared preprocessing accepts, with the geometry a series needs.

How stored values become the 8-bit slice the models see (app.core.preprocessing expects uint8; the
kaggle_3m training slices are 8-bit already, windowed by their publishers for display):

1. Rescale: value * RescaleSlope + RescaleIntercept (per frame from the functional groups of enhanced
   multi-frame images, else the top-level attributes; absent = identity). Modality LUT tables are ignored.
2. Window to 0..255:
   - monochrome with a WindowCenter/WindowWidth (the scanner's display window; the first one when several):
     the DICOM VOI function it names (LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2);
   - 8-bit unsigned values without rescale or window: kept as they are, so a DICOM wrapping a kaggle_3m
     slice gives exactly the prediction of the PNG/TIFF;
   - otherwise a linear window from the slice's own 0.5th to 99.5th percentile, clipped (robust to the
     few very bright voxels MR has), per slice like the rest of the preprocessing.
3. MONOCHROME1 (low values bright) is inverted, so tissue is bright as in MONOCHROME2.
4. Monochrome slices come out HxW: the preprocessing replicates a lone FLAIR channel to 3 channels, the
   dataset's convention. RGB (and YBR, converted by pydicom) comes out HxWx3 and is read in the dataset's
   channel order (R = pre-contrast, G = FLAIR, B = post-contrast), as PNG/TIFF uploads are.

Pixel data are decoded by pydicom with the plugins installed beside it (pydicom itself: uncompressed,
deflated, RLE; Pillow: JPEG baseline/extended, JPEG 2000; pyjpegls: JPEG-LS; python-gdcm: JPEG lossless
and the rest). A transfer syntax none of them decodes is refused with 415.

Privacy: nothing here logs, pydicom's value validation (whose warnings quote values) is off, and error
messages name only technical attributes (transfer syntax, sizes), never a patient attribute.
"""

import io
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from app.core.codecs import ImageRejected

# pydicom's value validation warns, and logs, with the offending value quoted: a malformed patient name or
# birth date would end up in the service's logs. Values are never validated here; pixel data still are.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

DICOM_CONTENT_TYPES = ("application/dicom", "application/dicom+octet-stream")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")
PERCENTILE_WINDOW = (0.5, 99.5)


@dataclass(frozen=True)
class DicomFrame:
    """One 2-D frame of a DICOM file: its 8-bit pixels and where it sits in the patient."""

    pixels: np.ndarray  # uint8 HxW (monochrome) or HxWx3
    frame_number: int | None  # 1-based within a multi-frame file; None for a single-frame file
    position: tuple[float, ...] | None  # ImagePositionPatient (mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column direction cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    spacing_between_slices: float | None
    slice_thickness: float | None


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM file; `dataset` keeps its attributes (pixel data removed) for DICOM SEG references."""

    dataset: Dataset
    frames: list[DicomFrame]

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.get("SOPInstanceUID", ""))

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.get("SeriesInstanceUID", ""))

    @property
    def instance_number(self) -> int | None:
        value = self.dataset.get("InstanceNumber")
        return int(value) if value not in (None, "") else None


def is_dicom(data: bytes, content_type: str | None = None) -> bool:
    """A DICOM Part 10 file ("DICM" after the 128-byte preamble), or bytes declared as application/dicom."""
    declared = (content_type or "").split(";")[0].strip().lower()
    return data[128:132] == b"DICM" or declared in DICOM_CONTENT_TYPES


def frame_attribute(
    dataset: Dataset, frame_index: int, group: str, keyword: str, top_level: bool = True
) -> object | None:
    """An attribute of one frame: its per-frame functional group, the shared one, then (if asked) the top level."""
    lookups = (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0))
    for groups_keyword, index in lookups:
        groups = dataset.get(groups_keyword)
        if groups is None or len(groups) <= index:
            continue
        items = groups[index].get(group)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return dataset.get(keyword) if top_level else None


def first_number(value: object) -> float | None:
    """DS/IS values, possibly multi-valued or empty -> the first as a float (None when absent or unreadable)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def numbers(value: object, count: int) -> tuple[float, ...] | None:
    """A multi-valued DS with exactly `count` finite numbers, else None."""
    try:
        result = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return result if len(result) == count and all(np.isfinite(result)) else None


def rescale(values: np.ndarray, dataset: Dataset, frame_index: int) -> tuple[np.ndarray, bool]:
    """Stored values -> modality values (float64); also says whether a non-identity rescale was applied."""
    slope = first_number(frame_attribute(dataset, frame_index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = first_number(
        frame_attribute(dataset, frame_index, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    return values.astype(np.float64) * slope + intercept, (slope, intercept) != (1.0, 0.0)


def voi_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The DICOM VOI LUT functions (PS3.3 C.11.2.1.2) with an output range of 0..255."""
    if function == "SIGMOID":
        scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = (values - center) / width * 255.0 + 127.5
    else:  # LINEAR
        scaled = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Linear window from the 0.5th to the 99.5th percentile, clipped; a flat slice becomes 0."""
    low, high = np.percentile(values, PERCENTILE_WINDOW)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.round((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def to_uint8(stored: np.ndarray, dataset: Dataset, frame_index: int) -> np.ndarray:
    """One frame's stored values -> the 8-bit slice (see the module docstring for the rules)."""
    values, rescaled = rescale(stored, dataset, frame_index)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric in MONOCHROME:
        center = first_number(frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "WindowCenter"))
        width = first_number(frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "WindowWidth"))
        function = str(frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR")
        minimum_width = 1.0 if function == "LINEAR" else 0.0
        if center is not None and width is not None and width > minimum_width:
            windowed = voi_window(values, center, width, function)
        elif stored.dtype == np.uint8 and not rescaled:
            windowed = stored
        else:
            windowed = percentile_window(values)
        return 255 - windowed if photometric == "MONOCHROME1" else windowed
    if stored.dtype == np.uint8 and not rescaled:
        return stored
    return percentile_window(values)


def parse_dicom(data: bytes) -> Dataset:
    """Read the header and pixel bytes (not yet decoded); raises ImageRejected 400 on unreadable files."""
    try:
        return pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    # pydicom raises many types on corrupt headers; their messages may quote element values, so none is echoed.
    except Exception as error:
        raise ImageRejected(400, "the DICOM file is truncated or corrupt: its header cannot be read") from error


def count_frames(dataset: Dataset, max_pixels: int) -> int:
    """Refuse before decoding what cannot or must not be decoded; returns the number of frames."""
    if not any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS):
        raise ImageRejected(400, "the DICOM file has no pixel data (not an image instance)")
    syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian)))
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom knows no decoder at all for this UID
        decodable = False
    if not decodable:
        name = syntax.name if syntax.is_transfer_syntax else "an unknown transfer syntax"
        raise ImageRejected(
            415,
            f"cannot decode DICOM pixel data compressed as {name} ({syntax}) with the installed decoders; "
            "send it uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000",
        )
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric not in MONOCHROME + COLOR:
        raise ImageRejected(
            415,
            f"DICOM photometric interpretation {photometric or '(none)'!r} is not supported; "
            "send MONOCHROME1, MONOCHROME2 or RGB",
        )
    try:
        rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
        frames = int(first_number(dataset.get("NumberOfFrames")) or 1)
    except Exception as error:  # a corrupt header element
        raise ImageRejected(400, "the DICOM file is corrupt: its image size cannot be read") from error
    if rows < 1 or columns < 1 or frames < 1:
        raise ImageRejected(400, f"the DICOM file declares an empty image ({rows} rows, {columns} columns)")
    if rows * columns > max_pixels:
        raise ImageRejected(
            413, f"DICOM image is {columns} x {rows} = {rows * columns} pixels, more than the limit of {max_pixels}"
        )
    return frames


def frame_geometry(dataset: Dataset, index: int, frames: int) -> dict:
    """Position, orientation and spacing of one frame, as DicomFrame fields."""
    # A top-level ImagePositionPatient in a multi-frame file is the first frame's, not every frame's.
    position = frame_attribute(dataset, index, "PlanePositionSequence", "ImagePositionPatient", top_level=frames == 1)
    pixel_spacing = numbers(frame_attribute(dataset, index, "PixelMeasuresSequence", "PixelSpacing"), 2)
    return {
        "position": numbers(position, 3),
        "orientation": numbers(
            frame_attribute(dataset, index, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        ),
        "pixel_spacing": pixel_spacing if pixel_spacing and min(pixel_spacing) > 0 else None,
        "spacing_between_slices": first_number(
            frame_attribute(dataset, index, "PixelMeasuresSequence", "SpacingBetweenSlices")
        ),
        "slice_thickness": first_number(frame_attribute(dataset, index, "PixelMeasuresSequence", "SliceThickness")),
    }


def decode_frames(dataset: Dataset, frames: int) -> DicomImage:
    """Decode the pixel data, window every frame to 8 bits, and drop the pixel bytes from the dataset."""
    try:
        stored = dataset.pixel_array  # YBR is converted to RGB here
    except Exception as error:  # decoder errors on truncated or corrupt pixel data
        syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
        raise ImageRejected(
            400, f"cannot decode the DICOM pixel data ({syntax.name or 'unknown syntax'}): truncated or corrupt"
        ) from error
    if frames == 1:  # pydicom drops the frame axis of single-frame data
        stored = stored[None]
    if stored.ndim != (4 if int(dataset.get("SamplesPerPixel") or 1) > 1 else 3) or len(stored) != frames:
        raise ImageRejected(400, f"the DICOM pixel data do not match the declared {frames} frame(s)")
    decoded = [
        DicomFrame(
            pixels=to_uint8(stored[index], dataset, index),
            frame_number=index + 1 if "NumberOfFrames" in dataset else None,
            **frame_geometry(dataset, index, frames),
        )
        for index in range(frames)
    ]
    for keyword in PIXEL_DATA_KEYWORDS:  # a SEG only references the source; the bytes are not needed again
        if keyword in dataset:
            delattr(dataset, keyword)
    return DicomImage(dataset, decoded)


def read_dicom(data: bytes, max_pixels: int, max_frames: int) -> DicomImage:
    """DICOM bytes -> every frame as an 8-bit slice with its geometry; raises ImageRejected (400/413/415)."""
    dataset = parse_dicom(data)
    frames = count_frames(dataset, max_pixels)
    if frames > max_frames:
        raise ImageRejected(413, f"the DICOM file holds {frames} frames, more than the limit of {max_frames}")
    return decode_frames(dataset, frames)


def decode_dicom_slice(data: bytes, max_pixels: int) -> np.ndarray:
    """A single-slice route's DICOM: exactly one frame -> uint8 slice; several frames belong to /v1/series."""
    dataset = parse_dicom(data)
    frames = count_frames(dataset, max_pixels)
    if frames > 1:
        raise ImageRejected(400, f"this DICOM file holds {frames} frames: post it to /v1/series")
    return decode_frames(dataset, frames).frames[0].pixels
