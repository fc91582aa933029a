"""Peak memory of the largest requests the default limits accept, each in a fresh uvicorn.

    python -m bench.request_memory

For each request: the server's RSS when ready, its peak (VmHWM) after the request, and the difference, which
docs/limits.md compares with its per-request memory formula. Uses the bundled models and default settings.
"""

import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import numpy as np
from pydicom.uid import JPEGLSLossless, generate_uid

from bench.decode_cost import phantom
from tests.dicom.builders import mr_series, mr_slice, to_bytes
from tests.live_server import live_server
from tests.reliability.malformed import deflate_bombs, rss_mib


def largest_slice() -> list:
    """One 4096 x 4096 16-bit DICOM slice (max_pixels), JPEG-LS compressed to fit max_upload_bytes: the largest
    image a single-slice route accepts, decoded in a decoder worker."""
    ds = mr_slice(
        phantom(4096), series_uid=generate_uid(), study_uid=generate_uid(), frame_of_reference_uid=generate_uid()
    )
    ds.compress(JPEGLSLossless)
    return [("file", ("big.dcm", to_bytes(ds), "application/dicom"))]


def largest_series() -> list:
    """64 slices of 1024 x 1024 16-bit: the request budget (max_request_pixels = 64 Mi values) exactly."""
    volume = np.random.default_rng(1).integers(0, 4096, (64, 1024, 1024), dtype=np.uint16)
    return [("files", (f"IM{n}.dcm", to_bytes(ds), "application/dicom")) for n, ds in enumerate(mr_series(volume))]


def bomb_files() -> list:
    return [("file", ("bomb.dcm", deflate_bombs()[1], "application/dicom"))]


def main() -> None:
    requests = [
        ("/v1/predict", "one 4096 x 4096 16-bit DICOM slice", largest_slice),
        ("/v1/series", "64 DICOM slices of 1024 x 1024 16-bit (the 64 Mi budget)", largest_series),
        ("/v1/predict", "deflated DICOM inflating to 512 MiB (refused)", bomb_files),
    ]
    print("| request | status | seconds | RSS ready MiB | peak RSS MiB | peak - ready MiB |")
    print("|---|---|---|---|---|---|")
    with TemporaryDirectory() as logs:
        for route, what, build in requests:
            files = build()
            with live_server(Path(logs), warmup_runs=1) as server:
                ready = rss_mib(server.process.pid, "VmRSS")
                started = time.perf_counter()
                status = httpx.post(f"{server.url}{route}", files=files, timeout=600).status_code
                seconds = time.perf_counter() - started
                peak = rss_mib(server.process.pid)
            print(f"| {what} | {status} | {seconds:.1f} | {ready:.0f} | {peak:.0f} | {peak - ready:.0f} |")
            del files


if __name__ == "__main__":
    main()
