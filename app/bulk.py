"""`lgg-tumor bulk FOLDER --out OUT`: every series of an archive through the models with Ray Data, without HTTP.

A series is, under FOLDER (searched recursively): the DICOM files (`.dcm`) of one folder, the numbered image
slices of one folder (kaggle_3m: a patient folder; `*_mask.*` files are skipped), or one NIfTI file
(`.nii`, `.nii.gz`). A pool of Ray actors, each holding both ONNX Runtime sessions (or Triton sessions when
LGG_TRITON_URL is set), reads each series with the service's own readers, runs the shared pipeline and writes:
  OUT/<series folder>/<slice file stem>_mask.png   a 1-bit mask per slice (DICOM and images; kaggle_3m naming)
  OUT/<NIfTI file stem>_mask.nii.gz                 a mask volume on the input's grid (NIfTI)
  OUT/slices.csv                                    one row per slice
  OUT/series.csv                                    one row per series: tumor slices, voxels and volume (mL)
A series that cannot be read gets its error in series.csv and the others go on.

Ray runs embedded on this machine by default; `--address ray://HEAD:10001` (or `auto`) runs the actors on a
Ray cluster, where FOLDER and OUT must be at the same path on every node (a shared filesystem). Needs the
optional `[bulk]` extra: `pip install -e ".[bulk]"`.
"""

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:  # the service's modules load in the actors, not in the command's process
    from app.core.series import SeriesSlice

DICOM_SUFFIX = ".dcm"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_COLUMNS = ("series", "slice", "file", "tumor_detected", "tumor_probability", "area_pixels")
SERIES_COLUMNS = (
    "series",
    "kind",
    "slices",
    "ordered_by",
    "tumor_slices",
    "tumor_voxels",
    "tumor_volume_ml",
    "mask",
    "error",
)


@dataclass(frozen=True)
class SeriesJob:
    """One series: its files relative to FOLDER, in the order found."""

    name: str  # the folder (DICOM, images) or the file (NIfTI), relative to FOLDER
    kind: str  # "dicom", "images" or "nifti"
    files: list[str]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_series(folder: Path) -> list[SeriesJob]:
    """The series under folder, sorted by name."""
    from app.cli import MASK_STEM_SUFFIX, SLICE_SUFFIXES  # the predict command's conventions (cli imports this module)

    by_folder: dict[tuple[str, str], list[str]] = {}
    jobs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        if is_nifti(path):
            jobs.append(SeriesJob(relative, "nifti", [relative]))
        elif suffix == DICOM_SUFFIX:
            by_folder.setdefault((path.parent.relative_to(folder).as_posix(), "dicom"), []).append(relative)
        elif suffix in SLICE_SUFFIXES and not path.stem.endswith(MASK_STEM_SUFFIX):
            by_folder.setdefault((path.parent.relative_to(folder).as_posix(), "images"), []).append(relative)
    jobs += [SeriesJob(name, kind, files) for (name, kind), files in by_folder.items()]
    return sorted(jobs, key=lambda job: (job.name, job.kind))


def mask_file(relative: str, frame: int | None = None) -> str:
    """The mask path (relative to OUT) beside the input: a/b_12.tif -> a/b_12_mask.png, t1.nii.gz -> t1_mask.nii.gz."""
    from app.cli import MASK_STEM_SUFFIX

    path = Path(relative)
    if is_nifti(path):
        stem = path.name[: -len(next(s for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)))]
        return path.with_name(f"{stem}{MASK_STEM_SUFFIX}.nii.gz").as_posix()
    frame_part = "" if frame is None else f"_frame{frame}"
    return path.with_name(f"{path.stem}{frame_part}{MASK_STEM_SUFFIX}.png").as_posix()


class SeriesPredictor:
    """A Ray Data actor: both sessions loaded once, then one series per call (batch_size=1)."""

    def __init__(self, folder: str, out: str, settings: dict, largest_component: bool) -> None:
        from app.core.config import Settings
        from app.core.onnx_sessions import load_models, read_model_card
        from app.core.pipeline import Pipeline
        from app.core.series import SeriesLimits

        resolved = Settings(**settings)
        self.folder, self.out, self.largest_component = Path(folder), Path(out), largest_component
        self.pipeline = Pipeline(load_models(read_model_card(resolved.model_dir), resolved), resolved.max_batch_size)
        self.limits = SeriesLimits.from_settings(resolved)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        results = []
        for job in batch["job"]:
            job = SeriesJob(**json.loads(job))
            try:
                slices, series_row = self.predict(job)
            except Exception as error:  # the readers' ImageRejected, unreadable files: recorded, the run goes on
                slices, series_row = [], {"series": job.name, "kind": job.kind, "error": str(error)}
            results.append(json.dumps({"slices": slices, "series": series_row}))
        return {"result": results}

    def predict(self, job: SeriesJob) -> tuple[list[dict], dict]:
        from app.cli import write_mask
        from app.core.analysis import stack_masks
        from app.core.postprocessing import keep_largest_component
        from app.core.series import Upload, read_series

        uploads = [Upload(Path(f).name, (self.folder / f).read_bytes()) for f in job.files]
        volume = None
        if job.kind == "nifti":
            from app.core.nifti import read_nifti  # nibabel, only for NIfTI archives

            volume = read_nifti(uploads, self.limits)
            series = volume.series
        else:
            series = read_series(uploads, self.limits)
        predictions = self.pipeline.predict_batch([s.pixels for s in series.slices])
        masks = stack_masks(series, predictions)
        if self.largest_component:
            masks = keep_largest_component(masks)
        slice_rows = []
        multi_frame = len(series.sources) < len(series.slices)
        for index, (slice_, prediction, mask) in enumerate(zip(series.slices, predictions, masks, strict=True)):
            file = job.files[0] if volume is not None else source_file(job, slice_)
            if volume is None:
                write_mask(self.out / mask_file(file, slice_.frame_number if multi_frame else None), mask)
            slice_rows.append(
                {
                    "series": job.name,
                    "slice": index,
                    "file": file,
                    "tumor_detected": bool(mask.any()),
                    "tumor_probability": prediction.tumor_probability,
                    "area_pixels": int(mask.sum()),
                }
            )
        volume_mask = ""
        if volume is not None:
            from app.core.nifti import mask_nifti

            volume_mask = mask_file(job.name)
            (self.out / volume_mask).parent.mkdir(parents=True, exist_ok=True)
            (self.out / volume_mask).write_bytes(mask_nifti(masks, volume))
        voxel_ml = series.voxel_volume_ml
        series_row = {
            "series": job.name,
            "kind": job.kind,
            "slices": len(series.slices),
            "ordered_by": series.ordered_by,
            "tumor_slices": int(masks.any(axis=(1, 2)).sum()),
            "tumor_voxels": int(masks.sum()),
            "tumor_volume_ml": None if voxel_ml is None else int(masks.sum()) * voxel_ml,
            "mask": volume_mask,
        }
        return slice_rows, series_row


def source_file(job: SeriesJob, slice_: "SeriesSlice") -> str:
    """The input file a slice came from: DICOM frames by their source index, image slices by the upload's name."""
    if slice_.source is not None:
        return job.files[slice_.source]
    [file] = [f for f in job.files if Path(f).name == slice_.filename]
    return file


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: csv_value(v) for k, v in row.items()} for row in rows)


def csv_value(value: object) -> object:
    """The `predict` command's CSV conventions: empty for none, lowercase booleans, probabilities to 6 places."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.6f}" if isinstance(value, float) else value


def run_bulk(args: argparse.Namespace) -> int:
    jobs = find_series(args.folder)
    if not jobs:
        print(f"no series (DICOM, image slices, NIfTI) found under {args.folder}", file=sys.stderr)
        return 1
    try:
        import ray
    except ImportError:
        print('lgg-tumor bulk needs Ray: pip install -e ".[bulk]"', file=sys.stderr)
        return 2
    from app.core.config import Settings

    # The actors' settings: LGG_* from this environment, the model folder and thread count from the options.
    settings = Settings(model_dir=args.model_dir.resolve(), intra_op_threads=args.cpus_per_actor, warmup_runs=0)
    local = args.address is None
    started = time.perf_counter()
    ray.init(
        address=args.address,
        num_cpus=args.num_cpus if local else None,
        include_dashboard=False,
        logging_level="WARNING",
        # Workers import app/ from this checkout on a local Ray; a cluster's workers need the package installed.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}} if local else None,
    )
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines would break the bar below
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # one bar below, in series
        items = [{"job": json.dumps(dataclasses.asdict(job))} for job in jobs]
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            SeriesPredictor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(args.actors, len(jobs))),
            num_cpus=args.cpus_per_actor,
            num_gpus=args.gpus_per_actor or None,
            fn_constructor_kwargs={
                "folder": str(args.folder.resolve()),
                "out": str(args.out.resolve()),
                "settings": settings.model_dump(mode="json", exclude={"api_key"}),
                "largest_component": args.largest_component,
            },
        )
        slice_rows, series_rows = [], []
        with tqdm(total=len(jobs), unit="series", desc="bulk", disable=args.quiet) as progress:
            for row in results.iter_rows():
                result = json.loads(row["result"])
                slice_rows += result["slices"]
                series_rows.append(result["series"])
                progress.update(1)
                progress.set_postfix(slices=len(slice_rows))
    finally:
        ray.shutdown()
    series_rows.sort(key=lambda row: row["series"])
    slice_rows.sort(key=lambda row: (row["series"], row["slice"]))
    write_csv(args.out / "series.csv", SERIES_COLUMNS, series_rows)
    write_csv(args.out / "slices.csv", SLICE_COLUMNS, slice_rows)
    failed = sum(bool(row.get("error")) for row in series_rows)
    tumors = sum(bool(row.get("tumor_voxels")) for row in series_rows)
    elapsed = time.perf_counter() - started
    print(
        f"{len(series_rows)} series ({len(slice_rows)} slices): {tumors} with tumor, {failed} failed; "
        f"{elapsed:.1f} s with Ray's start ({len(slice_rows) / elapsed:.1f} slices/s); "
        f"masks, series.csv and slices.csv under {args.out}"
    )
    return 0 if failed < len(series_rows) else 1


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    bulk = commands.add_parser(
        "bulk",
        help="run every series of a folder through the models with Ray Data (masks, volumes, CSV)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bulk.add_argument("folder", type=Path, help="archive folder, searched recursively")
    bulk.add_argument("--out", type=Path, required=True, help="output folder (created)")
    bulk.add_argument("--address", help="Ray cluster (ray://HEAD:10001 or auto); default: Ray embedded here")
    bulk.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all of this machine)")
    bulk.add_argument("--actors", type=int, default=2, help="actors, each holding both sessions (default 2)")
    bulk.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (ONNX Runtime threads) per actor")
    bulk.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0,
        help="GPUs per actor on onnxruntime-gpu nodes (a fraction lets actors share one GPU); default none",
    )
    bulk.add_argument("--model-dir", type=Path, default=Path(os.environ.get("LGG_MODEL_DIR", "models")))
    bulk.add_argument("--largest-component", action="store_true", help="keep only the largest 3-D tumor region")
    bulk.add_argument("--quiet", action="store_true", help="no progress bar")
    bulk.set_defaults(run=run_bulk)
