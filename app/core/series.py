"""One series of slices: read, put in anatomical order, checked to be one stack; then the 3-D cleanup and volume.

Accepted input (any mix of uploads, each possibly a zip of them): DICOM files of one series (single- or
multi-frame), or PNG/TIFF/JPEG/WebP slices whose file names end with their slice number
(`TCGA_CS_4941_19960909_12.tif` is slice 12). DICOM and plain images are not mixed in one series.

Order: DICOM frames by their ImagePositionPatient projected on the slice normal (row x column direction
cosines of ImageOrientationPatient), else by InstanceNumber (then frame number); plain images by the number
in their file name. Slice spacing: the median distance between neighbouring positions, else
SpacingBetweenSlices, else SliceThickness; with PixelSpacing it gives the voxel volume in mL.

Integrity: DICOM files of one series must agree on SeriesInstanceUID, PatientID, StudyInstanceUID and
FrameOfReferenceUID, and on geometry (orientation, pixel spacing, rows and columns); otherwise 400, since
one tumor volume over two patients or two frames of reference would be a wrong clinical number.

Limits: the zip's declared member sizes, then each file's declared image size, are checked before anything
is unpacked or decoded; every file's pixels are charged to one request budget (ImageLimits.max_request_pixels).
"""

import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TypeVar

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from app.core.codecs import image_pixels, open_image
from app.core.config import Settings
from app.core.deadline import UNLIMITED, Deadline
from app.core.dicom import DicomFrame, OpenedDicom, decode_dicom, frame_geometry, is_dicom, open_dicom
from app.core.dicom_attributes import first_number, text, value_of
from app.core.limits import ImageLimits, ImageRejected, PixelBudget

T = TypeVar("T")
ZIP_MAGIC = b"PK\x03\x04"
SLICE_NUMBER = re.compile(r"(\d+)\D*$")  # the last number in a file name's stem
SAME_POSITION_MM = 1e-3
SAME_ORIENTATION = 1e-3
SAME_PIXEL_SPACING = 1e-3  # relative
# What every file of one series must share (each names what a mix would mean).
SHARED_UIDS = (
    ("SeriesInstanceUID", "series"),
    ("PatientID", "patients"),
    ("StudyInstanceUID", "studies"),
    ("FrameOfReferenceUID", "frames of reference"),
)
# 26-connectivity, as skimage.measure.label's default in 3-D that Buda et al.'s postprocessing uses.


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class SeriesLimits:
    image: ImageLimits  # per image and per decode; image.max_request_pixels bounds all slices together
    max_slices: int
    max_total_bytes: int  # what the uploads may unpack to, all together
    max_member_bytes: int  # one file unpacked from a zip (as one uploaded file)

    @classmethod
    def from_settings(cls, settings: Settings) -> "SeriesLimits":
        # A series is a batch of slices: the batch route's caps apply to it; a zip's member to one uploaded file's.
        return cls(
            image=ImageLimits.from_settings(settings),
            max_slices=settings.max_batch_files,
            max_total_bytes=settings.max_batch_bytes,
            max_member_bytes=settings.max_upload_bytes,
        )

    @property
    def max_pixels(self) -> int:
        """Per slice (width x height)."""
        return self.image.max_pixels


@dataclass(frozen=True)
class SeriesSlice:
    pixels: np.ndarray  # uint8 HxW or HxWx3
    filename: str | None  # plain-image slices only: DICOM file names may carry patient names
    sop_instance_uid: str | None = None
    frame_number: int | None = None  # within a multi-frame DICOM file
    source: int | None = None  # index into Series.sources


@dataclass(frozen=True)
class Series:
    slices: list[SeriesSlice]  # in anatomical order
    ordered_by: str  # "position", "instance_number", "filename" or "single slice"
    sources: list[Dataset]  # the DICOM files' attributes (no pixel data), for DICOM SEG; empty for images
    pixel_spacing_mm: tuple[float, float] | None = None  # between rows, between columns
    slice_spacing_mm: float | None = None
    slice_spacing_from: str | None = None  # "positions", "SpacingBetweenSlices" or "SliceThickness"

    @property
    def voxel_volume_ml(self) -> float | None:
        if self.pixel_spacing_mm is None or self.slice_spacing_mm is None:
            return None
        return self.pixel_spacing_mm[0] * self.pixel_spacing_mm[1] * self.slice_spacing_mm / 1000.0


def is_hidden(name: str) -> bool:
    path = PurePosixPath(name)
    return path.name.startswith(".") or path.name.upper() == "DICOMDIR" or "__MACOSX" in path.parts


def expand_zip(upload: Upload, limits: SeriesLimits) -> list[Upload]:
    """A zip's files (folders, hidden files and DICOMDIR skipped), refused before unpacking if too many or big."""
    try:
        with zipfile.ZipFile(io.BytesIO(upload.data)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not is_hidden(m.filename)]
            if len(members) > limits.max_slices:
                raise ImageRejected(413, f"{upload.filename}: {len(members)} files, more than {limits.max_slices}")
            unpacked = sum(m.file_size for m in members)
            if unpacked > limits.max_total_bytes:
                detail = f"{upload.filename}: unpacks to {unpacked} bytes, more than {limits.max_total_bytes}"
                raise ImageRejected(413, detail)
            largest = max(members, key=lambda m: m.file_size, default=None)
            if largest is not None and largest.file_size > limits.max_member_bytes:
                size, limit = largest.file_size, limits.max_member_bytes
                raise ImageRejected(413, f"{upload.filename}: a file unpacks to {size} bytes, more than {limit}")
            # Reads stop at each member's declared size, so a lying header cannot unpack more than announced.
            return [Upload(PurePosixPath(m.filename).name, archive.read(m)) for m in members]
    except ImageRejected:
        raise
    except Exception as error:  # BadZipFile, encrypted members, unknown compression, corrupt streams
        raise ImageRejected(400, f"{upload.filename}: not a readable zip archive ({error})") from error


def expand_uploads(uploads: list[Upload], limits: SeriesLimits) -> list[Upload]:
    files: list[Upload] = []
    for upload in uploads:
        files += expand_zip(upload, limits) if upload.data[:4] == ZIP_MAGIC else [upload]
    if not files:
        raise ImageRejected(400, "no slices: send DICOM files, a zip of them, or numbered PNG/TIFF slices")
    if len(files) > limits.max_slices:
        raise ImageRejected(413, f"{len(files)} files in one series, more than the limit of {limits.max_slices}")
    return files


def read_series(uploads: list[Upload], limits: SeriesLimits, deadline: Deadline = UNLIMITED) -> Series:
    """Uploads -> one ordered stack of 8-bit slices; raises ImageRejected naming the file at fault.

    Decodes file by file, checking the request's deadline before each."""
    files = expand_uploads(uploads, limits)
    dicom = [is_dicom(f.data, f.content_type) for f in files]
    if any(dicom) and not all(dicom):
        raise ImageRejected(400, "a series is either all DICOM or all plain images; this request mixes both")
    budget = PixelBudget(limits.image.max_request_pixels)
    read = read_dicom_series if all(dicom) else read_image_series
    series = read(files, limits, budget, deadline)
    shapes = {s.pixels.shape for s in series.slices}
    if len(shapes) > 1:
        raise ImageRejected(400, f"the slices differ in size ({sorted(shapes)}); a series is one stack")
    return series


def read_image_series(files: list[Upload], limits: SeriesLimits, budget: PixelBudget, deadline: Deadline) -> Series:
    """Every header first (sizes charged to the request's budget), then the pixels: too much is refused undecoded."""
    numbered: dict[int, tuple[Upload, Image.Image]] = {}
    try:
        for upload in files:
            match = SLICE_NUMBER.search(PurePosixPath(upload.filename or "").stem)
            if match is None and len(files) > 1:
                raise ImageRejected(400, f"{upload.filename!r}: no slice number at the end of the file name")
            number = int(match.group(1)) if match else 0
            if number in numbered:
                other = numbered[number][0].filename
                raise ImageRejected(400, f"{upload.filename!r} and {other!r} are both slice {number}")
            image = named(upload, open_image, upload.data, limits.image, upload.content_type, budget)
            numbered[number] = (upload, image)
        ordered = [
            SeriesSlice(named(upload, image_pixels, image), upload.filename)
            for upload, image in deadline.each((numbered.pop(n) for n in sorted(numbered)), "decoding")
        ]
    finally:
        for _, image in numbered.values():  # those not decoded when one was refused
            image.close()
    return Series(ordered, "filename" if len(ordered) > 1 else "single slice", sources=[])


def named(upload: Upload, function: Callable[..., T], *args: object) -> T:
    """function(*args), with the file's name put before the message of an ImageRejected it raises."""
    try:
        return function(*args)
    except ImageRejected as error:
        raise ImageRejected(error.status_code, f"{upload.filename}: {error.detail}") from error


def read_dicom_series(files: list[Upload], limits: SeriesLimits, budget: PixelBudget, deadline: Deadline) -> Series:
    """Check every file's header and the series' integrity first, then decode, then order along the slice normal."""
    opened: list[OpenedDicom] = []
    frame_count = 0
    for upload in files:
        left = limits.max_slices - frame_count
        if left < 1:
            raise ImageRejected(413, f"{upload.filename}: the series holds more than {limits.max_slices} frames")
        image_limits = replace(limits.image, max_frames=min(limits.image.max_frames, left))
        opened.append(named(upload, open_dicom, upload.data, image_limits, budget))
        frame_count += opened[-1].layout.frames
    check_one_series([o.dataset for o in opened])
    check_one_geometry(opened)
    sources: list[Dataset] = []
    frames: list[tuple[int, DicomFrame]] = []  # (source index, frame)
    for upload, item in deadline.each(zip(files, opened, strict=True), "decoding"):
        image = named(upload, decode_dicom, item, limits.image)
        frames += [(len(sources), frame) for frame in image.frames]
        sources.append(image.dataset)
    del opened
    order, ordered_by, spacing_from_positions = order_frames(sources, frames)
    first = frames[order[0]][1]
    pixel_spacings = {f.pixel_spacing for _, f in frames}
    slice_spacing, spacing_from = spacing_from_positions, "positions"
    if slice_spacing is None:
        slice_spacing, spacing_from = first.spacing_between_slices, "SpacingBetweenSlices"
    if slice_spacing is None or slice_spacing <= 0:
        slice_spacing, spacing_from = first.slice_thickness, "SliceThickness"
    if slice_spacing is None or slice_spacing <= 0:
        slice_spacing, spacing_from = None, None
    slices = [
        SeriesSlice(
            frame.pixels,
            filename=None,
            sop_instance_uid=text(sources[source], "SOPInstanceUID") or None,
            frame_number=frame.frame_number,
            source=source,
        )
        for source, frame in (frames[i] for i in order)
    ]
    return Series(
        slices,
        ordered_by,
        sources,
        # Some frames without a pixel spacing: no volume in mL rather than a guess.
        pixel_spacing_mm=first.pixel_spacing if len(pixel_spacings) == 1 else None,
        slice_spacing_mm=slice_spacing,
        slice_spacing_from=spacing_from,
    )


def check_one_series(sources: list[Dataset]) -> None:
    """One series of one patient, study and frame of reference (values never quoted: they may identify)."""
    for keyword, what in SHARED_UIDS:
        found = {text(s, keyword) for s in sources}
        if len(found) > 1:
            raise ImageRejected(
                400, f"the files belong to {len(found)} different {what} ({keyword} differs); post one series"
            )
    sop_uids = [text(s, "SOPInstanceUID") for s in sources]
    repeated = {uid for uid in sop_uids if uid and sop_uids.count(uid) > 1}
    if repeated:
        raise ImageRejected(400, f"the same DICOM instance was sent more than once: {sorted(repeated)}")


def check_one_geometry(opened: list[OpenedDicom]) -> None:
    """One stack, from the headers: the same rows and columns, and the same orientation and pixel spacing for
    every frame that declares them."""
    sizes = sorted({(o.layout.rows, o.layout.columns) for o in opened})
    if len(sizes) > 1:
        raise ImageRejected(400, f"the slices differ in size ({sizes} rows x columns); a series is one stack")
    geometry = [frame_geometry(o.dataset, index, o.layout.frames) for o in opened for index in range(o.layout.frames)]
    orientations = np.array([g["orientation"] for g in geometry if g["orientation"] is not None], np.float64)
    if 0 < len(orientations) < len(geometry):
        raise ImageRejected(400, "some slices have an ImageOrientationPatient and others not: not one stack")
    if len(orientations) and np.abs(orientations - orientations[0]).max() > SAME_ORIENTATION:
        raise ImageRejected(400, "the slices have different orientations: they are not one stack")
    spacings = np.array([g["pixel_spacing"] for g in geometry if g["pixel_spacing"] is not None], np.float64)
    if len(spacings) and np.abs(spacings / spacings[0] - 1).max() > SAME_PIXEL_SPACING:
        raise ImageRejected(400, "the slices have different pixel spacings: they are not one stack")


def order_frames(sources: list[Dataset], frames: list[tuple[int, DicomFrame]]) -> tuple[list[int], str, float | None]:
    """Indices of (source, frame) pairs in anatomical order, what ordered them, and the spacing positions give."""
    if len(frames) == 1:
        return [0], "single slice", None
    orientations = [f.orientation for _, f in frames]
    positions = [f.position for _, f in frames]
    if all(o is not None for o in orientations) and all(p is not None for p in positions):
        orientation = np.array(orientations, np.float64)  # all equal: check_one_geometry
        normal = np.cross(orientation[0, :3], orientation[0, 3:])
        along_normal = np.array(positions, np.float64) @ normal
        order = np.argsort(along_normal, kind="stable")
        gaps = np.diff(along_normal[order])
        if gaps.min() < SAME_POSITION_MM:
            raise ImageRejected(
                400,
                f"two slices lie at the same position ({along_normal[order][gaps.argmin()]:.3f} mm along the "
                "slice normal): the files hold more than one stack (echoes, repeats); post one",
            )
        return order.tolist(), "position", float(np.median(gaps))
    instance_numbers = [first_number(value_of(s, "InstanceNumber")) for s in sources]
    if len(sources) > 1 and None in instance_numbers:
        raise ImageRejected(
            400, "cannot order the slices: some DICOM files have neither ImagePositionPatient nor InstanceNumber"
        )
    # A multi-frame file's frames keep their stored order.
    keys = [(instance_numbers[source] or 0, frame.frame_number or 0) for source, frame in frames]
    if len(set(keys)) < len(keys):
        raise ImageRejected(400, "two DICOM files share an InstanceNumber and have no ImagePositionPatient")
    return sorted(range(len(frames)), key=keys.__getitem__), "instance_number", None
