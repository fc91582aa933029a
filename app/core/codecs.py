"""Bytes in, bytes out: decode uploaded slices to 8-bit arrays; encode masks (COCO RLE, PNG) and overlays.

Decoding refuses what it cannot serve with an ImageRejected carrying the HTTP status:
415 for a format other than DICOM/TIFF/PNG/JPEG/WebP, 400 for empty or corrupt data, 413 for an image
whose header announces more pixels, a longer side or a thinner shape than allowed, or more pixel values
than the request has left (all checked before any pixel is decoded). DICOM goes to app.core.dicom.
"""

import base64
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.core.dicom import decode_dicom_slice, is_dicom
from app.core.limits import ACCEPTED_FORMATS, ImageLimits, ImageRejected, PixelBudget
from app.core.preprocessing import CHANNEL_ORDER

SUPPORTED_FORMATS = ("TIFF", "PNG", "JPEG", "WEBP")
# Modes wider than 8 bits per pixel: windowed linearly from their own [min, max] to [0, 255].
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
GRAY_MODES = ("L", "LA", "La", "1")
GENERIC_CONTENT_TYPES = ("", "application/octet-stream")
OUTLINE_COLOR = (255, 32, 32)
FLAIR_CHANNEL = CHANNEL_ORDER.index("FLAIR")


def window_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear window of the slice's own [min, max] to [0, 255]; a flat slice becomes 0."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def to_slice_array(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 HxW (a single FLAIR channel) or HxWx3 (the dataset's channel order)."""
    if image.mode in WIDE_MODES:
        return window_to_uint8(np.asarray(image))
    if image.mode in ("L", "RGB"):  # already what preprocess_slice takes: no converted copy
        return np.asarray(image)
    if image.mode in GRAY_MODES:
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def open_image(
    data: bytes, limits: ImageLimits, content_type: str | None = None, budget: PixelBudget | None = None
) -> Image.Image:
    """A TIFF/PNG/JPEG/WebP upload's header, read and checked (size, shape, request budget); nothing decoded yet."""
    if not data:
        raise ImageRejected(400, "the file is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as error:
        raise ImageRejected(413, f"{error}; refused before decoding") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        declared = (content_type or "").split(";")[0].strip().lower()
        if declared not in GENERIC_CONTENT_TYPES and not declared.startswith("image/"):
            raise ImageRejected(415, f"unsupported file type {declared!r}; send {ACCEPTED_FORMATS}") from error
        raise ImageRejected(400, f"the file is not a decodable image (expected {ACCEPTED_FORMATS})") from error
    if image.format not in SUPPORTED_FORMATS:
        image.close()
        raise ImageRejected(415, f"{image.format} images are not supported; send {ACCEPTED_FORMATS}")
    width, height = image.size
    try:
        limits.check_image(width, height)
        if budget is not None:
            budget.charge(width * height * (1 if image.mode in WIDE_MODES + GRAY_MODES else 3), "this image")
    except ImageRejected:
        image.close()
        raise
    return image


def image_pixels(image: Image.Image) -> np.ndarray:
    """Decode an opened image -> uint8 slice (HxW or HxWx3); closes it."""
    with image:
        try:
            image.load()
            return to_slice_array(image)
        # Pillow's decoders raise many exception types on corrupt data; all of them mean "bad file", not a bug.
        except Exception as error:
            raise ImageRejected(400, f"cannot decode this {image.format} file: {error}") from error


def decode_image(
    data: bytes, limits: ImageLimits, content_type: str | None = None, budget: PixelBudget | None = None
) -> np.ndarray:
    """Upload bytes (DICOM or TIFF/PNG/JPEG/WebP) -> uint8 slice (HxW or HxWx3) for preprocess_slice.

    `budget` is the request's decoded-pixel budget (a fresh one of limits.max_request_pixels when None).
    Raises ImageRejected (400/413/415, 503 when every DICOM decoder is busy).
    """
    budget = budget or PixelBudget(limits.max_request_pixels)
    if data and is_dicom(data, content_type):
        return decode_dicom_slice(data, limits, budget)
    return image_pixels(open_image(data, limits, content_type, budget))


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major runs, starting with a (possibly empty) run of background."""
    height, width = mask.shape
    # Where runs start in column-major order, found on the row-major mask (a transposed copy costs 4x the time):
    # between two rows of a column, and between the last row of one column and the first row of the next.
    rows, columns = np.divmod(np.flatnonzero(mask[1:] != mask[:-1]), width)
    across = (np.flatnonzero(mask[0, 1:] != mask[-1, :-1]) + 1) * height
    starts = np.sort(np.concatenate(([0], columns * height + rows + 1, across, [mask.size])))
    counts = (starts[1:] - starts[:-1]).tolist()
    if mask[0, 0]:
        counts.insert(0, 0)
    return {"format": "rle", "size": [height, width], "counts": counts}


def mask_to_png(mask: np.ndarray) -> bytes:
    """1-bit PNG (0 = background, 1 = tumor), the same size as the input slice."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def mask_to_png_base64(mask: np.ndarray) -> dict:
    return {"format": "png", "size": list(mask.shape), "data": base64.b64encode(mask_to_png(mask)).decode("ascii")}


def bounding_box(mask: np.ndarray) -> list[int] | None:
    """[x, y, width, height] in pixels (COCO order) around the tumor, or None when the mask is empty."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [int(columns[0]), int(rows[0]), int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)]


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Tumor pixels within `thickness` pixels (4-neighbourhood) of the background or the image border."""
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay_png(slice_uint8: np.ndarray, mask: np.ndarray | None) -> bytes:
    """The FLAIR channel in gray with the tumor outlined in red: what a viewer shows."""
    flair = slice_uint8 if slice_uint8.ndim == 2 else slice_uint8[..., FLAIR_CHANNEL]
    rgb = np.repeat(flair[..., None], 3, axis=2)
    if mask is not None:
        thickness = max(1, round(max(mask.shape) / 256))
        rgb[outline(mask, thickness)] = OUTLINE_COLOR
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
