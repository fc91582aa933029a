"""What an upload may declare, checked before any work: the refusal type and the sizes, budgets and caps.

Every decoder (app.core.codecs for PNG/TIFF/JPEG/WebP, app.core.dicom for DICOM, app.core.series for zips)
checks the sizes a file *declares* here before it inflates or decodes anything, so a small file that
announces a huge image costs a header read, not the memory and CPU of decoding it. docs/limits.md gives the
per-request memory formula these bound.
"""

import threading
from dataclasses import dataclass

from app.core.config import Settings

ACCEPTED_FORMATS = "DICOM, TIFF, PNG, JPEG or WebP"  # every error that names what is accepted says this


class ImageRejected(ValueError):
    """Input the service will not process; carries the HTTP status (4xx) and a message for a person."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """Per image (per DICOM frame), per file and per decode limits; defaults equal the settings' defaults."""

    max_pixels: int = 4096 * 4096  # width x height of one image or frame
    max_side: int = 8192  # longest side: per-side costs (outline, resize) grow with it, not with the area
    max_aspect_ratio: float = 16.0  # long side / short side: a 1048576 x 16 "slice" is no MR slice
    max_frames: int = 256  # frames in one DICOM file
    max_request_pixels: int = 64 << 20  # decoded pixel values (w x h x samples x frames) of one request
    decode_timeout_s: float = 20.0  # one compressed DICOM decode in a worker process
    decode_memory_bytes: int = 1 << 30  # address space of a decoder worker process
    decode_workers: int = 2  # decoder worker processes

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageLimits":
        return cls(
            max_pixels=settings.max_pixels,
            max_side=settings.max_side,
            max_aspect_ratio=settings.max_aspect_ratio,
            max_frames=settings.max_batch_files,  # a multi-frame file is a series of at most that many slices
            max_request_pixels=settings.max_request_pixels,
            decode_timeout_s=settings.decode_timeout_s,
            decode_memory_bytes=settings.decode_memory_bytes,
            decode_workers=settings.decode_workers,
        )

    def check_image(self, width: int, height: int, what: str = "image") -> None:
        """413 for an image larger, longer or thinner than allowed; 400 for an empty one."""
        if width < 1 or height < 1:
            raise ImageRejected(400, f"the {what} declares an empty size ({width} x {height} pixels)")
        if width * height > self.max_pixels:
            raise ImageRejected(
                413,
                f"{what} is {width} x {height} = {width * height} pixels, more than the limit of {self.max_pixels}; "
                "refused before decoding",
            )
        if max(width, height) > self.max_side:
            raise ImageRejected(
                413, f"{what} is {width} x {height} pixels: a side is longer than the limit of {self.max_side}"
            )
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise ImageRejected(
                413,
                f"{what} is {width} x {height} pixels: more elongated than the limit of "
                f"{self.max_aspect_ratio:g}:1 for a slice",
            )


class PixelBudget:
    """Pixel values (width x height x samples x frames) one request may decode, charged before each decode."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def check(self, values: int, what: str = "the request") -> None:
        """413 if charging `values` would pass the limit (charges nothing)."""
        if self.used + values > self.limit:
            raise ImageRejected(
                413,
                f"{what} would bring this request to {self.used + values} decoded pixel values, more than "
                f"the limit of {self.limit}; send fewer or smaller images per request",
            )

    def charge(self, values: int, what: str = "the request") -> None:
        with self._lock:
            self.check(values, what)
            self.used += values
