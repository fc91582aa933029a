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
and the rest). A transfer syntax none of them decodes is refused with 415. Uncompressed, deflated and RLE
data are decoded here (numpy and pure Python); every other syntax goes to a native decoder, run in a
supervised worker process (app.core.decode_pool) so a decoder that aborts costs one request.

Before anything is inflated or decoded, the header's declared sizes (Rows, Columns, NumberOfFrames,
SamplesPerPixel, BitsAllocated) are read through app.core.dicom_attributes, checked against the limits
(app.core.limits) and against the pixel data's length; a deflated file is inflated only up to what its
header declares.

Entry points: read_dicom (every frame, with geometry) and decode_dicom_slice (single-slice routes).

Privacy: nothing here logs, pydicom's value validation (whose warnings quote values) is off, and error
messages name only technical attributes (transfer syntax, sizes), never a patient attribute.
"""

import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless

from app.core.decode_pool import decoder_pool
from app.core.dicom_attributes import (
    first_number,
    frame_attribute,
    integer,
    numbers,
    parse_everything,
    text,
    value_of,
)
from app.core.limits import ImageLimits, ImageRejected, PixelBudget

# pydicom's value validation warns, and logs, with the offending value quoted: a malformed patient name or
# birth date would end up in the service's logs. Values are never validated here; pixel data still are.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
# pydicom's decoders log corrupt pixel data at ERROR with a traceback; here that is the client's 400, not a fault.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)

DICOM_CONTENT_TYPES = ("application/dicom", "application/dicom+octet-stream")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_DATA_TAGS = {Tag(keyword) for keyword in PIXEL_DATA_KEYWORDS}
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")
PERCENTILE_WINDOW = (0.5, 99.5)
BITS_ALLOCATED = (1, 8, 16, 32, 64)
ITEM_TAG = b"\xfe\xff\x00\xe0"  # how encapsulated (compressed) pixel data start, little endian
# Pure Python / numpy decoders: cannot abort the process, so they run in the request's thread.
IN_PROCESS_SYNTAXES = (RLELossless,)
HEADER_PEEK_BYTES = 1 << 20  # of a deflated dataset, inflated to read the declared sizes first
HEADER_SLACK_BYTES = 1 << 20  # what a deflated file may hold beside its declared pixel data
CHUNK_VALUES = 1 << 20  # values windowed at once: bounds the float64 temporaries of a 4096 x 4096 frame


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
        return text(self.dataset, "SOPInstanceUID")

    @property
    def series_instance_uid(self) -> str:
        return text(self.dataset, "SeriesInstanceUID")


@dataclass(frozen=True)
class PixelLayout:
    """The image a header declares, validated: what decoding it will produce."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str

    @property
    def values(self) -> int:
        return self.rows * self.columns * self.frames * self.samples

    @property
    def stored_bytes(self) -> int:
        """Bytes of uncompressed pixel data (YBR_FULL_422 stores 2 values per pixel instead of 3)."""
        values = self.values * 2 // 3 if self.photometric == "YBR_FULL_422" else self.values
        return (values * self.bits_allocated + 7) // 8


def is_dicom(data: bytes, content_type: str | None = None) -> bool:
    """A DICOM Part 10 file ("DICM" after the 128-byte preamble), or bytes declared as application/dicom."""
    declared = (content_type or "").split(";")[0].strip().lower()
    return data[128:132] == b"DICM" or declared in DICOM_CONTENT_TYPES


def transfer_syntax(dataset: Dataset) -> UID:
    meta = getattr(dataset, "file_meta", None)
    return UID(text(meta, "TransferSyntaxUID", ExplicitVRLittleEndian) if meta is not None else ExplicitVRLittleEndian)


def syntax_name(syntax: UID) -> str:
    return syntax.name if syntax.is_transfer_syntax else "an unknown transfer syntax"


def rescale_parameters(dataset: Dataset, frame_index: int) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of one frame (identity when absent or unreadable)."""
    slope = first_number(frame_attribute(dataset, frame_index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = first_number(
        frame_attribute(dataset, frame_index, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def voi_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The DICOM VOI LUT functions (PS3.3 C.11.2.1.2) with an output range of 0..255."""
    if function == "SIGMOID":
        scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = (values - center) / width * 255.0 + 127.5
    else:  # LINEAR
        scaled = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def percentile_bounds(values: np.ndarray) -> tuple[float, float] | None:
    """The 0.5th and 99.5th percentiles of the finite values (None when there are none)."""
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = np.percentile(values, PERCENTILE_WINDOW)
    return float(low), float(high)


def window_between(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear window from low to high, clipped to 0..255; a flat window gives 0."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = np.nan_to_num((values - low) * (255.0 / (high - low)), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Linear window from the 0.5th to the 99.5th percentile, clipped; a flat slice becomes 0."""
    bounds = percentile_bounds(values)
    return np.zeros(values.shape, np.uint8) if bounds is None else window_between(values, *bounds)


def in_chunks(stored: np.ndarray, function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """function over blocks of rows of about CHUNK_VALUES values: float64 temporaries stay small on big frames."""
    out = np.empty(stored.shape, np.uint8)
    rows = max(1, CHUNK_VALUES // max(1, stored[0].size))
    for start in range(0, len(stored), rows):
        out[start : start + rows] = function(stored[start : start + rows])
    return out


def to_uint8(stored: np.ndarray, dataset: Dataset, frame_index: int, photometric: str) -> np.ndarray:
    """One frame's stored values -> the 8-bit slice (see the module docstring for the rules)."""
    slope, intercept = rescale_parameters(dataset, frame_index)
    rescaled = (slope, intercept) != (1.0, 0.0)

    def modality(chunk: np.ndarray) -> np.ndarray:  # step 1: stored -> modality values
        return chunk.astype(np.float64) * slope + intercept

    if photometric in MONOCHROME:
        center = first_number(frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "WindowCenter"))
        width = first_number(frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "WindowWidth"))
        function = str(frame_attribute(dataset, frame_index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR")
        minimum_width = 1.0 if function == "LINEAR" else 0.0
        if center is not None and width is not None and width > minimum_width:
            windowed = in_chunks(stored, lambda chunk: voi_window(modality(chunk), center, width, function))
        elif stored.dtype == np.uint8 and not rescaled:
            windowed = stored
        else:
            windowed = percentile_frame(stored, modality, slope, intercept)
        return 255 - windowed if photometric == "MONOCHROME1" else windowed
    if stored.dtype == np.uint8 and not rescaled:
        return stored
    return percentile_frame(stored, modality, slope, intercept)


def percentile_frame(
    stored: np.ndarray, modality: Callable[[np.ndarray], np.ndarray], slope: float, intercept: float
) -> np.ndarray:
    """The percentile window of the modality values, its bounds taken on the stored values (affine: same order)."""
    bounds = percentile_bounds(stored)
    if bounds is None:
        return np.zeros(stored.shape, np.uint8)
    low, high = sorted(bound * slope + intercept for bound in bounds)  # a negative slope swaps them
    return in_chunks(stored, lambda chunk: window_between(modality(chunk), low, high))


def corrupt_header() -> ImageRejected:
    # pydicom raises many types on corrupt headers; their messages may quote element values, so none is echoed.
    return ImageRejected(400, "the DICOM file is truncated or corrupt: its header cannot be read")


def inflate_deflated(data: bytes, limits: ImageLimits, budget: PixelBudget) -> bytes:
    """A Deflated Explicit VR file -> the same file uncompressed, inflated no further than its header declares."""
    stream = io.BytesIO(data)
    try:
        preamble = read_preamble(stream, force=True) or b""
        meta = _read_file_meta_info(stream)  # pydicom's own reader; public only for paths
    except Exception as error:
        raise corrupt_header() from error
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = inflater.decompress(data[stream.tell() :], HEADER_PEEK_BYTES)
        header = read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag in PIXEL_DATA_TAGS)
        parse_everything(header)
    except ImageRejected:
        raise
    except Exception as error:
        raise corrupt_header() from error
    layout = declared_layout(header, limits)
    budget.check(layout.values, "this DICOM file")
    cap = layout.stored_bytes + HEADER_SLACK_BYTES
    parts, size, pending = [head], len(head), inflater.unconsumed_tail
    try:
        while pending and not inflater.eof:
            part = inflater.decompress(pending, HEADER_PEEK_BYTES)
            size += len(part)
            if size > cap:
                raise ImageRejected(
                    413, f"the deflated DICOM file inflates to more than the {cap} bytes its header declares"
                )
            parts.append(part)
            pending = inflater.unconsumed_tail
    except zlib.error as error:
        raise ImageRejected(400, "the deflated DICOM data are corrupt (zlib cannot inflate them)") from error
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the bytes are once inflated
    out = io.BytesIO()
    out.write(preamble.ljust(128, b"\0")[:128] + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return out.getvalue() + b"".join(parts)


def parse_dicom(data: bytes, limits: ImageLimits, budget: PixelBudget) -> Dataset:
    """Read the header and pixel bytes (not yet decoded); raises ImageRejected 400 on unreadable files."""
    part10 = data[128:132] == b"DICM"
    if part10 and meta_transfer_syntax(data) == DeflatedExplicitVRLittleEndian:
        data = inflate_deflated(data, limits, budget)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=not part10)
    except Exception as error:
        raise corrupt_header() from error
    parse_everything(dataset)
    return dataset


def meta_transfer_syntax(data: bytes) -> str:
    """The file meta's transfer syntax UID, '' when unreadable."""
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, force=True)
        return text(_read_file_meta_info(stream), "TransferSyntaxUID")
    except Exception:
        return ""


def image_layout(dataset: Dataset, limits: ImageLimits, single_frame: bool = False) -> PixelLayout:
    """A parsed file's declared image (see declared_layout); 400 when it has no pixel data at all."""
    if not any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS):
        raise ImageRejected(400, "the DICOM file has no pixel data (not an image instance)")
    frames = integer(dataset, "NumberOfFrames", 1)
    if single_frame and frames is not None and frames > 1:
        raise ImageRejected(400, f"this DICOM file holds {frames} frames: post it to /v1/series")
    return declared_layout(dataset, limits)


def declared_layout(dataset: Dataset, limits: ImageLimits) -> PixelLayout:
    """The image the header declares, refused (400/413/415) when invalid or over the limits; nothing decoded."""
    photometric = text(dataset, "PhotometricInterpretation")
    if photometric not in MONOCHROME + COLOR:
        raise ImageRejected(
            415,
            f"DICOM photometric interpretation {photometric or '(none)'!r} is not supported; "
            "send MONOCHROME1, MONOCHROME2 or RGB",
        )
    samples = integer(dataset, "SamplesPerPixel", 1, allowed=(1, 3))
    if samples != (1 if photometric in MONOCHROME else 3):
        raise ImageRejected(400, f"the DICOM file is malformed: {samples} samples per pixel for {photometric}")
    rows = integer(dataset, "Rows", allowed=range(0, 1 << 16))
    columns = integer(dataset, "Columns", allowed=range(0, 1 << 16))
    bits = integer(dataset, "BitsAllocated", allowed=BITS_ALLOCATED)
    if rows is None or columns is None or bits is None:
        raise ImageRejected(400, "the DICOM file is malformed: Rows, Columns or BitsAllocated is missing")
    integer(dataset, "BitsStored", bits, allowed=range(1, bits + 1))
    integer(dataset, "PixelRepresentation", 0, allowed=(0, 1))
    integer(dataset, "PlanarConfiguration", 0, allowed=(0, 1))
    frames = integer(dataset, "NumberOfFrames", 1, allowed=range(1, 1 << 31))
    limits.check_image(columns, rows, "DICOM image")
    if frames > limits.max_frames:
        raise ImageRejected(413, f"the DICOM file holds {frames} frames, more than the limit of {limits.max_frames}")
    return PixelLayout(rows, columns, frames, samples, bits, photometric)


def check_pixel_data(dataset: Dataset, layout: PixelLayout) -> UID:
    """Refuse before decoding what cannot or must not be decoded; returns the transfer syntax."""
    present = [keyword for keyword in PIXEL_DATA_KEYWORDS if keyword in dataset]
    syntax = transfer_syntax(dataset)
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom knows no decoder at all for this UID
        decodable = False
    if not decodable:
        raise ImageRejected(
            415,
            f"cannot decode DICOM pixel data compressed as {syntax_name(syntax)} ({syntax}) with the installed "
            "decoders; send it uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000",
        )
    pixel_bytes = value_of(dataset, present[0])
    if not isinstance(pixel_bytes, bytes):
        raise ImageRejected(400, "the DICOM file is malformed: its pixel data are not bytes")
    if syntax.is_encapsulated:
        if not pixel_bytes.startswith(ITEM_TAG):
            raise ImageRejected(400, f"the DICOM pixel data are not encapsulated as {syntax_name(syntax)} requires")
    elif len(pixel_bytes) < layout.stored_bytes:
        raise ImageRejected(
            400,
            f"the DICOM pixel data hold {len(pixel_bytes)} bytes, fewer than the {layout.stored_bytes} its header "
            "declares: truncated or corrupt",
        )
    return syntax


def decode_stored_pixels(data: bytes) -> np.ndarray:
    """DICOM bytes -> pydicom's pixel array (YBR converted to RGB). Runs in a decoder worker process."""
    return pydicom.dcmread(io.BytesIO(data), force=True).pixel_array


def stored_pixels(data: bytes, dataset: Dataset, syntax: UID, limits: ImageLimits) -> np.ndarray:
    if not syntax.is_compressed or syntax in IN_PROCESS_SYNTAXES:
        try:
            return dataset.pixel_array
        except Exception as error:  # decoder errors on truncated or corrupt pixel data
            raise ImageRejected(
                400, f"cannot decode the DICOM pixel data ({syntax_name(syntax)}): truncated or corrupt"
            ) from error
    pool = decoder_pool(limits.decode_workers, limits.decode_timeout_s, limits.decode_memory_bytes)
    return pool.decode(data, syntax_name(syntax))


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


@dataclass(frozen=True)
class OpenedDicom:
    """A DICOM file parsed and checked, its pixel values charged to the request; not yet decoded."""

    data: bytes
    dataset: Dataset
    layout: PixelLayout
    syntax: UID


def open_dicom(data: bytes, limits: ImageLimits, budget: PixelBudget, single_frame: bool = False) -> OpenedDicom:
    """Parse and check a DICOM file (header, declared sizes, pixel data length) and charge `budget`; no decoding.

    single_frame: a single-slice route's file, refused (400) when it holds several frames.
    """
    dataset = parse_dicom(data, limits, budget)
    layout = image_layout(dataset, limits, single_frame)
    syntax = check_pixel_data(dataset, layout)
    budget.charge(layout.values, "this DICOM file")
    return OpenedDicom(data, dataset, layout, syntax)


def decode_dicom(opened: OpenedDicom, limits: ImageLimits) -> DicomImage:
    """Decode the pixel data, window every frame to 8 bits, and drop the pixel bytes from the dataset."""
    dataset, layout = opened.dataset, opened.layout
    stored = stored_pixels(opened.data, dataset, opened.syntax, limits)
    if layout.frames == 1:  # pydicom drops the frame axis of single-frame data
        stored = stored[None]
    expected = (layout.frames, layout.rows, layout.columns) + ((3,) if layout.samples == 3 else ())
    if stored.shape != expected:
        raise ImageRejected(400, f"the DICOM pixel data do not match the declared {layout.frames} frame(s)")
    decoded = [
        DicomFrame(
            pixels=to_uint8(stored[index], dataset, index, layout.photometric),
            frame_number=index + 1 if "NumberOfFrames" in dataset else None,
            **frame_geometry(dataset, index, layout.frames),
        )
        for index in range(layout.frames)
    ]
    for keyword in PIXEL_DATA_KEYWORDS:  # a SEG only references the source; the bytes are not needed again
        if keyword in dataset:
            delattr(dataset, keyword)
    return DicomImage(dataset, decoded)


def read_dicom(data: bytes, limits: ImageLimits, budget: PixelBudget | None = None) -> DicomImage:
    """DICOM bytes -> every frame as an 8-bit slice with its geometry; raises ImageRejected (400/413/415/503).

    `budget` is the request's: the file's declared pixel values are charged to it before decoding.
    """
    return decode_dicom(open_dicom(data, limits, budget or PixelBudget(limits.max_request_pixels)), limits)


def decode_dicom_slice(data: bytes, limits: ImageLimits, budget: PixelBudget | None = None) -> np.ndarray:
    """A single-slice route's DICOM: exactly one frame -> uint8 slice; several frames belong to /v1/series."""
    opened = open_dicom(data, limits, budget or PixelBudget(limits.max_request_pixels), single_frame=True)
    return decode_dicom(opened, limits).frames[0].pixels
