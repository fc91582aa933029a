"""A PACS over DICOMweb (dicomweb-client): WADO-RS retrieve of one series, STOW-RS store of the SEG.

The retrieved instances are written back to DICOM Part 10 bytes and go through the same reading as
uploads (app.core.series.read_series). Errors name the PACS's HTTP status, never a patient attribute.
Each call to the PACS waits at most what is left of the request's time budget.
"""

import io

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from app.core.codecs import ImageRejected
from app.core.deadline import Deadline
from app.core.series import Upload

TIMEOUT_S = 60


def client(base_url: str, deadline: Deadline, stage: str) -> DICOMwebClient:
    deadline.check(stage)
    web = DICOMwebClient(base_url, timeout=min(TIMEOUT_S, deadline.remaining()))
    # Its default retries any failure 5 times with exponential back-off: a PACS that is down would hold the
    # request ~30 s before the 502. The caller (or its retry policy) decides instead.
    web.set_http_retry_params(retry=False)
    return web


def pacs_error(error: Exception, what: str) -> ImageRejected:
    """A PACS failure -> 404 when it has no such series, else 502 (the PACS, not the caller, failed)."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        return ImageRejected(404 if status == 404 else 502, f"{what}: the PACS answered HTTP {status}")
    return ImageRejected(502, f"{what}: the PACS cannot be reached ({type(error).__name__})")


def retrieve_series(base_url: str, study_uid: str, series_uid: str, max_bytes: int, deadline: Deadline) -> list[Upload]:
    """WADO-RS: every instance of the series as Part 10 bytes; 413 past max_bytes, 404/502 on PACS errors."""
    uploads, total = [], 0
    stage = "the WADO-RS retrieve"
    try:
        instances = client(base_url, deadline, stage).iter_series(study_uid, series_uid)
        for number, dataset in enumerate(deadline.each(instances, stage), start=1):
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
            total += buffer.tell()
            if total > max_bytes:
                raise ImageRejected(413, f"the series is larger than the limit of {max_bytes} bytes")
            uploads.append(Upload(f"instance {number}", buffer.getvalue(), "application/dicom"))
    except (requests.RequestException, ValueError) as error:
        deadline.check(stage)  # a PACS cut short by the time budget: 504, not 502
        raise pacs_error(error, "WADO-RS retrieve failed") from error
    if not uploads:
        raise ImageRejected(404, "WADO-RS retrieve: the PACS returned no instance for this series")
    return uploads


def store_seg(base_url: str, seg: bytes, deadline: Deadline) -> None:
    """STOW-RS the SEG; 502 when the PACS does not store it."""
    dataset = pydicom.dcmread(io.BytesIO(seg))
    stage = "the STOW-RS store"
    try:
        response = client(base_url, deadline, stage).store_instances([dataset])
    except requests.RequestException as error:
        deadline.check(stage)
        raise pacs_error(error, "STOW-RS store of the SEG failed") from error
    if "FailedSOPSequence" in response and len(response.FailedSOPSequence):
        raise ImageRejected(502, "STOW-RS store of the SEG failed: the PACS refused the instance")
