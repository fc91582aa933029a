"""`lgg-tumor nifti` and `lgg-tumor dicomweb`: the research and the hospital-network commands (service clients).

lgg-tumor nifti flair.nii.gz --out mask.nii.gz            # FLAIR alone
lgg-tumor nifti t1.nii.gz flair.nii.gz t1c.nii.gz --out mask.nii.gz   # pre-contrast, FLAIR, post-contrast
lgg-tumor dicomweb --pacs http://pacs:8042/dicom-web --study 1.2.3 --series 1.2.3.4
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from app.client import ClientError, ServiceUnreachable, TumorClient

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 3


def client(args: argparse.Namespace) -> TumorClient:
    return TumorClient(args.url, api_key=args.api_key, timeout_s=args.timeout)


def run(args: argparse.Namespace, command: Callable[[TumorClient], int]) -> int:
    """Wait for the service, run the command; errors become one line on stderr and an exit status."""
    with client(args) as service:
        try:
            service.wait_until_ready(args.wait)
            return command(service)
        except (ServiceUnreachable, TimeoutError) as error:
            print(f"the service at {args.url} is not usable: {error}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except ClientError as error:
            print(str(error), file=sys.stderr)
            return EXIT_FAILED


def run_nifti(args: argparse.Namespace) -> int:
    def segment(service: TumorClient) -> int:
        mask = service.nifti_mask(args.files, largest_component=args.largest_component)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(mask.data)
        volume_ml = mask.tumor_volume_ml
        volume = "n/a (no voxel size in the header)" if volume_ml is None else f"{volume_ml:.3f} mL"
        print(f"{args.out}: {mask.tumor_voxels} tumor voxels, tumor volume {volume}")
        return EXIT_OK

    return run(args, segment)


def run_dicomweb(args: argparse.Namespace) -> int:
    def segment(service: TumorClient) -> int:
        result = service.dicomweb_series(args.pacs, args.study, args.series, store=not args.no_store)
        print(result.model_dump_json(indent=2))
        return EXIT_OK

    return run(args, segment)


def existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a file")
    return path


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get("LGG_URL", "http://localhost:8000"), help="service URL (env LGG_URL)"
    )
    parser.add_argument("--api-key", default=os.environ.get("LGG_API_KEY"), help="API key (env LGG_API_KEY)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service to be ready")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the request")


def add_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    exit_codes = f"exit status: {EXIT_OK} done, {EXIT_FAILED} refused (the reason on stderr), {EXIT_UNREACHABLE} "
    exit_codes += "service unreachable or never ready, 2 bad arguments"
    nifti = commands.add_parser(
        "nifti",
        help="segment a NIfTI volume; write the mask NIfTI (the input's affine) and print the volume in mL",
        epilog=exit_codes,
    )
    nifti.add_argument(
        "files",
        type=existing_file,
        nargs="+",
        help="FLAIR alone, one 4-D file, or 3 files: pre-contrast, FLAIR, post-contrast",
    )
    nifti.add_argument("--out", type=Path, required=True, help="the mask file to write (.nii.gz)")
    nifti.add_argument("--largest-component", action="store_true", help="keep only the largest 3-D tumor region")
    add_service_arguments(nifti)
    nifti.set_defaults(run=run_nifti)
    dicomweb = commands.add_parser(
        "dicomweb",
        help="have the service pull a series from a PACS (WADO-RS), segment it and store the SEG back (STOW-RS)",
        epilog=exit_codes,
    )
    dicomweb.add_argument("--pacs", required=True, help="the PACS's DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    dicomweb.add_argument("--study", required=True, help="Study Instance UID")
    dicomweb.add_argument("--series", required=True, help="Series Instance UID")
    dicomweb.add_argument("--no-store", action="store_true", help="do not store the SEG in the PACS")
    add_service_arguments(dicomweb)
    dicomweb.set_defaults(run=run_dicomweb)
