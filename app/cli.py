"""Command line for the tumor service: `python -m app.cli predict FOLDER --out OUT` (or `lgg-tumor predict ...`).

`predict` sends every slice under FOLDER (recursively: TIFF, PNG, JPEG, WebP, single-frame DICOM `.dcm`;
`*_mask.*` files are skipped) to POST /v1/predict/batch in chunks, writes each mask as
OUT/<same relative folder>/<name>_mask.png (1-bit, the slice's size, all background when no tumor was found: the
kaggle_3m layout) and a CSV summary with one row per slice. A slice that fails gets its error in the CSV and the
others go on.
"""

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from app import bulk, integration_cli, triton_export
from app.api.schemas import BatchItem, MaskFormat
from app.client import ClientError, ServiceError, ServiceUnreachable, TumorClient, mask_array

SLICE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".webp", ".dcm")
MASK_STEM_SUFFIX = "_mask"
CSV_COLUMNS = ("file", "tumor_detected", "tumor_probability", "area_pixels", "bbox", "error")
EXIT_OK, EXIT_ALL_FAILED, EXIT_UNREACHABLE = 0, 1, 3
EXIT_CODES = (
    f"exit status: {EXIT_OK} when at least one slice was answered, {EXIT_ALL_FAILED} when every slice failed "
    f"(or none was found), {EXIT_UNREACHABLE} when the service was unreachable or never ready, 2 for bad arguments"
)


@dataclass
class SliceRow:
    """One CSV row: the slice's result, or why it has none."""

    file: str
    tumor_detected: bool | None = None
    tumor_probability: float | None = None
    area_pixels: int | None = None
    bbox: list[int] | None = None
    error: str = ""

    def as_csv(self) -> dict[str, str]:
        return {
            "file": self.file,
            "tumor_detected": "" if self.tumor_detected is None else str(self.tumor_detected).lower(),
            "tumor_probability": "" if self.tumor_probability is None else f"{self.tumor_probability:.6f}",
            "area_pixels": "" if self.area_pixels is None else str(self.area_pixels),
            "bbox": "" if self.bbox is None else json.dumps(self.bbox),  # [x, y, width, height]
            "error": self.error,
        }


def natural_key(path: Path) -> list[str | int]:
    """kaggle_3m slice numbers are not zero-padded: sort _2 before _10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.as_posix())]


def find_slices(folder: Path) -> list[Path]:
    """Slice files under folder (recursively), relative to it, in natural order; masks are left out."""
    slices = [
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.suffix.lower() in SLICE_SUFFIXES and not path.stem.endswith(MASK_STEM_SUFFIX) and path.is_file()
    ]
    return sorted(slices, key=natural_key)


def mask_path(out: Path, relative: Path) -> Path:
    return out / relative.parent / f"{relative.stem}{MASK_STEM_SUFFIX}.png"


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(bool)).save(path, format="PNG")  # mode "1": a 1-bit PNG, like kaggle_3m masks


def row_from_result(relative: Path, item: BatchItem, out: Path) -> SliceRow:
    """Writes the slice's mask and returns its row; a failed item becomes a row with the service's message."""
    row = SliceRow(relative.as_posix())
    prediction = item.prediction
    if prediction is None:
        row.error = f"{item.status_code}: {item.detail}"
        return row
    try:
        mask = mask_array(prediction)
    except ValueError as error:
        row.error = f"undecodable mask: {error}"
        return row
    write_mask(mask_path(out, relative), mask if mask is not None else np.zeros(prediction.image_size, bool))
    row.tumor_detected = prediction.tumor_detected
    row.tumor_probability = prediction.tumor_probability
    row.area_pixels = prediction.area_pixels
    row.bbox = prediction.bbox
    return row


def predict_chunk(client: TumorClient, folder: Path, chunk: Sequence[Path], out: Path) -> list[SliceRow]:
    """One batch request for a chunk of slices; raises ServiceUnreachable, records everything else."""
    rows = {relative: SliceRow(relative.as_posix()) for relative in chunk}
    uploads: list[tuple[Path, bytes]] = []
    for relative in chunk:
        try:
            uploads.append((relative, (folder / relative).read_bytes()))
        except OSError as error:
            rows[relative].error = f"cannot read the file: {error.strerror or error}"
    if uploads:
        try:
            batch = client.predict_batch([(rel.as_posix(), data) for rel, data in uploads], mask_format=MaskFormat.rle)
        except ServiceError as error:  # the whole request was refused (e.g. 413, 503): every slice in it failed
            for relative, _ in uploads:
                rows[relative].error = f"{error.status_code}: {error.detail}"
        else:
            for (relative, _), item in zip(uploads, batch.results, strict=True):
                rows[relative] = row_from_result(relative, item, out)
    return [rows[relative] for relative in chunk]


def predict_slices(
    client: TumorClient, folder: Path, slices: Sequence[Path], out: Path, batch_size: int, quiet: bool = False
) -> tuple[list[SliceRow], str | None]:
    """Rows for the slices (relative to folder), and why the run stopped early (None when it did not)."""
    rows: list[SliceRow] = []
    with tqdm(total=len(slices), unit="slice", desc="predict", disable=quiet) as progress:
        for start in range(0, len(slices), batch_size):
            chunk = slices[start : start + batch_size]
            try:
                rows += predict_chunk(client, folder, chunk, out)
            except ServiceUnreachable as error:
                rows += [SliceRow(relative.as_posix(), error=str(error)) for relative in slices[start:]]
                return rows, str(error)
            progress.update(len(chunk))
    return rows, None


def write_summary(path: Path, rows: Sequence[SliceRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(row.as_csv() for row in rows)


def run_predict(args: argparse.Namespace) -> int:
    slices = find_slices(args.folder)
    if not slices:
        print(f"no slices ({', '.join(SLICE_SUFFIXES)}) found under {args.folder}", file=sys.stderr)
        return EXIT_ALL_FAILED
    with TumorClient(args.url, api_key=args.api_key, timeout_s=args.timeout) as client:
        try:
            client.wait_until_ready(args.wait)
        except (ClientError, TimeoutError) as error:
            print(f"the service at {args.url} is not usable: {error}", file=sys.stderr)
            return EXIT_UNREACHABLE
        rows, stopped = predict_slices(client, args.folder, slices, args.out, args.batch_size, args.quiet)
    summary = args.csv or args.out / "summary.csv"
    write_summary(summary, rows)
    answered = [row for row in rows if not row.error]
    tumors = sum(bool(row.tumor_detected) for row in answered)
    print(
        f"{len(rows)} slices: {len(answered)} answered ({tumors} with tumor), {len(rows) - len(answered)} failed; "
        f"masks under {args.out}, summary in {summary}"
    )
    if stopped:
        print(f"stopped early, the service became unreachable: {stopped}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK if answered else EXIT_ALL_FAILED


def existing_folder(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a folder")
    return path


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgg-tumor", description="Client of the LGG brain MRI tumor service.")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict",
        help="send a folder of slices, write their masks and a CSV summary",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXIT_CODES,
    )
    predict.add_argument("folder", type=existing_folder, help="folder of slices, searched recursively")
    predict.add_argument("--out", type=Path, required=True, help="folder for the masks (created)")
    predict.add_argument("--csv", type=Path, help="summary CSV (default: OUT/summary.csv)")
    predict.add_argument(
        "--url", default=os.environ.get("LGG_URL", "http://localhost:8000"), help="service URL (env LGG_URL)"
    )
    predict.add_argument("--api-key", default=os.environ.get("LGG_API_KEY"), help="API key (env LGG_API_KEY)")
    predict.add_argument("--batch-size", type=positive_int, default=16, help="slices per request (default 16)")
    predict.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service to be ready")
    predict.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(run=run_predict)
    triton_export.add_command(commands)
    bulk.add_command(commands)
    integration_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
