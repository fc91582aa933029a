"""What decoding compressed DICOM in a worker process costs, against decoding it in the request's thread.

    python -m bench.decode_cost [--repeats 30]

Prints a markdown table: median ms per decode in process (what app.core.dicom did before the pool) and through
app.core.decode_pool (pipe both ways, pickled array back), per transfer syntax and image size; and how long a
crashed worker takes to be replaced. Pause other CPU work while it runs: the numbers are per-call medians.
"""

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import numpy as np
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from app.core.decode_pool import DecoderPool
from app.core.dicom import decode_stored_pixels
from app.core.limits import ImageRejected
from tests.dicom.builders import mr_slice, to_bytes
from tests.reliability.malformed import J2K_MAGIC, encapsulated, jpeg2000


def phantom(size: int) -> np.ndarray:
    """12-bit MR-like values: a smooth head with noise (compresses like an MR slice, not like zeros)."""
    rng = np.random.default_rng(size)
    y, x = np.mgrid[0:size, 0:size] / size
    head = ((y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.16) * 1800.0
    return np.clip(head + 300 * np.sin(9 * x) * np.cos(7 * y) + rng.normal(0, 40, (size, size)), 0, 4095).astype(
        np.uint16
    )


def dicom(size: int, syntax: str) -> bytes:
    pixels = phantom(size)
    ds = mr_slice(pixels, series_uid=generate_uid(), study_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    if syntax == JPEG2000Lossless:
        return jpeg2000(ds)
    ds.compress(syntax)
    return to_bytes(ds)


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm: imports, first-call caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    pool = DecoderPool(workers=1, timeout_s=60, memory_bytes=1 << 30)
    print("| transfer syntax | size | file KiB | in process ms | worker process ms | added ms |")
    print("|---|---|---|---|---|---|")
    for syntax, name in (
        (JPEG2000Lossless, "JPEG 2000 lossless"),
        (JPEGLSLossless, "JPEG-LS lossless"),
        (RLELossless, "RLE"),
    ):
        for size in (256, 512):
            data = dicom(size, syntax)
            np.testing.assert_array_equal(pool.decode(data, name), decode_stored_pixels(data))
            local = median_ms(lambda data=data: decode_stored_pixels(data), args.repeats)
            remote = median_ms(lambda data=data, name=name: pool.decode(data, name), args.repeats)
            row = (name, f"{size}x{size}", f"{len(data) / 1024:.0f}", f"{local:.2f}", f"{remote:.2f}")
            print(f"| {' | '.join(row)} | {remote - local:+.2f} |")
    garbage = encapsulated(JPEG2000Lossless, J2K_MAGIC + bytes(range(256)) * 8)  # GDCM abort()s on it
    crashes = []
    for _ in range(5):
        started = time.perf_counter()
        with contextlib.suppress(ImageRejected):
            pool.decode(garbage, "JPEG 2000")
        crashes.append(time.perf_counter() - started)
    median_crash_ms = statistics.median(crashes) * 1000
    print(f"\nA decode that aborts its worker (started for it, then lost): median {median_crash_ms:.0f} ms")
    print(f"({pool.replaced} workers lost; each next decode starts a fresh one)")
    pool.close()


if __name__ == "__main__":
    main()
