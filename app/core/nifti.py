"""NIfTI volumes in (nibabel), a series of axial slices for the shared pipeline; the mask NIfTI out.

Accepted (`.nii` or `.nii.gz`, NIfTI-1 or NIfTI-2):
- one 3-D volume: FLAIR alone (the preprocessing replicates it to 3 channels, as for a gray slice);
- one 4-D volume whose 4th axis holds 3 channels in the dataset's order: pre-contrast, FLAIR, post-contrast;
- three 3-D volumes, one per channel, in that order, on the same grid (shape and affine).

Slicing: the volume is reoriented (nibabel, from its affine) so that voxel axes point Left, Posterior,
Superior, then cut along the superior axis. Each slice's rows run anterior -> posterior and its columns
patient right -> left: the radiological view of an axial DICOM slice, the view the LGG slices have.
Intensities are windowed per slice and channel to 8 bits like DICOM slices without a window (the 0.5th to
99.5th percentile; 8-bit data are kept as they are).

The mask comes back on the input's own voxel grid (the reorientation undone) with the input's affine, as
uint8 0/1; the tumor volume in mL is voxels x the header's voxel size.
"""

import gzip
import io
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from app.core.dicom import percentile_window
from app.core.limits import ImageRejected
from app.core.series import Series, SeriesLimits, SeriesSlice, Upload

GZIP_MAGIC = b"\x1f\x8b"
SLICE_AXES = ("L", "P", "S")  # DICOM's patient axes: rows of a slice along P, columns along L
CHANNELS = 3  # pre-contrast, FLAIR, post-contrast
SAME_AFFINE_MM = 1e-3
NIFTI_MEDIA_TYPE = "application/gzip"


@dataclass(frozen=True)
class NiftiVolume:
    series: Series  # the axial slices, superior last; voxel spacing from the header
    reference: nib.Nifti1Image | nib.Nifti2Image  # the first input file: grid, affine and header for the mask
    to_slicing: np.ndarray  # nibabel orientation transform from the input's axes to SLICE_AXES


def load_image(upload: Upload, max_bytes: int) -> nib.Nifti1Image | nib.Nifti2Image:
    """NIfTI bytes (gzip-compressed or not) -> a nibabel image; a gzip bomb is refused before it unpacks."""
    data = upload.data
    if data[:2] == GZIP_MAGIC:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as unpacked:
                data = unpacked.read(max_bytes + 1)
        except (OSError, EOFError) as error:
            raise ImageRejected(400, f"{upload.filename}: corrupt gzip data") from error
        if len(data) > max_bytes:
            raise ImageRejected(413, f"{upload.filename}: unpacks to more than {max_bytes} bytes")
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            image = kind.from_bytes(data)
            np.asarray(image.dataobj[(0,) * len(image.shape)])  # the data block is really there
            return image
        except Exception:  # nibabel raises many types on foreign or truncated bytes; try the next kind
            continue
    raise ImageRejected(400, f"{upload.filename}: not a readable NIfTI-1/NIfTI-2 file (.nii or .nii.gz)")


def channel_volumes(images: list, names: list[str | None]) -> list[np.ndarray]:
    """The input files -> 1 (FLAIR) or 3 (pre, FLAIR, post) 3-D float arrays on the first file's grid."""
    first = images[0]
    if len(images) == 1 and len(first.shape) == 4 and first.shape[3] == CHANNELS:
        data = np.asanyarray(first.dataobj, dtype=np.float64)
        return [data[..., c] for c in range(CHANNELS)]
    if len(images) not in (1, CHANNELS):
        raise ImageRejected(
            400, f"{len(images)} NIfTI files: send FLAIR alone, one 4-D file, or 3 files (pre, FLAIR, post)"
        )
    volumes = []
    for image, name in zip(images, names, strict=True):
        shape = tuple(image.shape)
        while len(shape) > 3 and shape[-1] == 1:  # a 4-D file with one volume is a 3-D volume
            shape = shape[:-1]
        if len(shape) != 3:
            raise ImageRejected(
                400, f"{name}: a {len(image.shape)}-D volume of shape {list(image.shape)}; expected 3-D "
                f"(or one 4-D file with {CHANNELS} channels: pre-contrast, FLAIR, post-contrast)",
            )  # fmt: skip
        if shape != tuple(first.shape[:3]) or not np.allclose(image.affine, first.affine, atol=SAME_AFFINE_MM):
            raise ImageRejected(400, f"{name}: not on the same voxel grid (shape and affine) as {names[0]}")
        volumes.append(np.asanyarray(image.dataobj, dtype=np.float64).reshape(shape))
    return volumes


def to_uint8(values: np.ndarray) -> np.ndarray:
    """One slice of one channel -> 8 bits: integers already in 0..255 are kept, the rest windowed."""
    if np.all((values >= 0) & (values <= 255) & (values == np.round(values))):
        return values.astype(np.uint8)
    return percentile_window(values)


def read_nifti(uploads: list[Upload], limits: SeriesLimits) -> NiftiVolume:
    """The uploaded NIfTI file(s) -> axial slices with the header's voxel spacing; ImageRejected 400/413."""
    if not uploads:
        raise ImageRejected(400, "no NIfTI file")
    images = [load_image(u, limits.max_total_bytes) for u in uploads]
    first = images[0]
    if len(first.shape) < 3:
        raise ImageRejected(400, f"{uploads[0].filename}: a {len(first.shape)}-D image, not a volume")
    columns, rows, slices = first.shape[:3]  # before reorientation: checked as they are stored
    limits.image.check_image(columns, rows, f"{uploads[0].filename}: a slice")
    if slices > limits.max_slices:
        raise ImageRejected(413, f"{uploads[0].filename}: {slices} slices, more than the limit of {limits.max_slices}")
    volumes = channel_volumes(images, [u.filename for u in uploads])
    if not all(np.isfinite(v).all() for v in volumes):
        raise ImageRejected(400, "the NIfTI data hold NaN or infinite values")
    to_slicing = ornt_transform(io_orientation(first.affine), axcodes2ornt(SLICE_AXES))
    oriented = [apply_orientation(v, to_slicing) for v in volumes]  # (L, P, S) axes
    header_zooms = first.header.get_zooms()[:3]
    zooms = [0.0] * 3  # mm along L, P, S
    for axis, (new_axis, _) in enumerate(to_slicing):
        zooms[int(new_axis)] = float(header_zooms[axis])
    series_slices = []
    for k in range(oriented[0].shape[2]):
        channels = [to_uint8(v[:, :, k].T) for v in oriented]  # rows along P, columns along L
        pixels = channels[0] if len(channels) == 1 else np.ascontiguousarray(np.stack(channels, axis=-1))
        series_slices.append(SeriesSlice(pixels, filename=None))
    spacing_known = all(z > 0 for z in zooms)
    series = Series(
        series_slices,
        ordered_by="nifti axes",
        sources=[],
        pixel_spacing_mm=(float(zooms[1]), float(zooms[0])) if spacing_known else None,
        slice_spacing_mm=float(zooms[2]) if spacing_known else None,
        slice_spacing_from="NIfTI header" if spacing_known else None,
    )
    return NiftiVolume(series, first, to_slicing)


def mask_nifti(masks: np.ndarray, volume: NiftiVolume) -> bytes:
    """bool (slices, rows, columns) in slicing order -> a gzipped uint8 NIfTI on the input's grid and affine."""
    oriented = np.ascontiguousarray(masks.transpose(2, 1, 0)).astype(np.uint8)  # back to (L, P, S)
    back = ornt_transform(axcodes2ornt(SLICE_AXES), io_orientation(volume.reference.affine))
    data = apply_orientation(oriented, back)
    header = volume.reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(data.shape)
    image = type(volume.reference)(data, volume.reference.affine, header)
    image.header.set_slope_inter(1, 0)
    image.header["descrip"] = b"lgg tumor mask; RESEARCH USE ONLY"
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as packed:
        packed.write(image.to_bytes())
    return buffer.getvalue()
