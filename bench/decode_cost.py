"""What decoding costs, and what each per-slice stage of the image routes costs on this CPU.

    python -m bench.decode_cost [--repeats 30]     # compressed DICOM: in process vs in a worker process
    python -m bench.decode_cost --stages           # decode -> preprocess -> null networks -> finish -> encode

The first prints a markdown table: median ms per decode in process (what app.core.dicom did before the pool) and
through app.core.decode_pool (pipe both ways, pickled array back), per transfer syntax and image size; and how
long a crashed worker takes to be replaced. `--stages` prints the CPU ms per slice of each stage of
POST /v1/predict outside HTTP, on real slices (the benchmark's set, in the dataset's tumor share) and the null
model (bench/null_model.py), each stage over all slices, best of --passes: the per-stage part of the serving
overhead that docs/benchmarks.md breaks down. Pause other CPU work while they run.
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from app.api.routes.predict import model_versions, to_prediction
from app.api.schemas import MaskFormat
from app.core.codecs import decode_image
from app.core.config import Settings
from app.core.decode_pool import DecoderPool
from app.core.dicom import decode_stored_pixels
from app.core.limits import ImageLimits, ImageRejected
from app.core.onnx_sessions import load_models, read_model_card
from app.core.pipeline import Pipeline
from bench.common import DEFAULT_DATA, DEFAULT_MODELS, load_slices
from bench.null_model import write_null_models
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


def cpu_ms_per_item(call: Callable[[object], object], items: Sequence[object], passes: int) -> float:
    """CPU ms per item of call over all items, best of `passes` passes."""
    best = float("inf")
    for _ in range(passes):
        started = time.process_time()
        for item in items:
            call(item)
        best = min(best, (time.process_time() - started) / len(items) * 1000)
    return best


def stage_costs(count: int, passes: int) -> None:
    """CPU ms per slice of each stage of the single-slice route outside HTTP, with the null model."""
    slice_set = load_slices(DEFAULT_DATA, count)
    with tempfile.TemporaryDirectory(prefix="lgg-null-model-") as null_dir:
        card = read_model_card(write_null_models(Path(null_dir), DEFAULT_MODELS))
        pipeline = Pipeline(load_models(card, Settings(model_dir=Path(null_dir), providers="CPUExecutionProvider")))
    limits, versions = ImageLimits(), model_versions(card)
    uploads = [(s.data, s.content_type) for s in slice_set.slices]
    slices = [decode_image(data, limits, content_type) for data, content_type in uploads]
    prepared = [pipeline.prepare(s) for s in slices]
    outputs = [pipeline.run_models([p])[0] for p in prepared]
    finished = [pipeline.finish(p, o) for p, o in zip(prepared, outputs, strict=True)]
    items = list(zip(slices, finished, strict=True))
    results = [to_prediction(s, f, MaskFormat.rle, versions) for s, f in items]
    stages = [
        ("decode (codecs.decode_image)", lambda u: decode_image(u[0], limits, u[1]), uploads),
        ("preprocess (preprocessing.preprocess_slice)", pipeline.prepare, slices),
        ("null networks, batch 1 (ONNX Runtime)", lambda p: pipeline.run_models([p]), prepared),
        (
            "finish: mask at the slice's size (postprocessing)",
            lambda po: pipeline.finish(*po),
            list(zip(prepared, outputs, strict=True)),
        ),
        ("encode: RLE, bbox, area, response model", lambda sf: to_prediction(*sf, MaskFormat.rle, versions), items),
        ("serialize: JSON bytes of the response model", lambda r: r.model_dump_json(), results),
    ]
    masked = sum(f.mask is not None for f in finished)
    print(f"{slice_set.source}; {masked} of {len(slices)} slices get a mask from the null model\n")
    print("| stage | CPU ms per slice |")
    print("|---|---|")
    total = 0.0
    for name, call, stage_items in stages:
        cost = cpu_ms_per_item(call, stage_items, passes)
        total += cost
        print(f"| {name} | {cost:.3f} |")
    print(f"| **sum** | **{total:.3f}** |")


def decode_pool_costs(repeats: int) -> None:
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
            local = median_ms(lambda data=data: decode_stored_pixels(data), repeats)
            remote = median_ms(lambda data=data, name=name: pool.decode(data, name), repeats)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="DICOM decodes per row")
    parser.add_argument("--stages", action="store_true", help="per-stage CPU of the image routes instead")
    parser.add_argument("--slices", type=int, default=256, help="--stages: real slices")
    parser.add_argument("--passes", type=int, default=3, help="--stages: passes per stage (the best is kept)")
    args = parser.parse_args()
    if args.stages:
        stage_costs(args.slices, args.passes)
    else:
        decode_pool_costs(args.repeats)


if __name__ == "__main__":
    main()
