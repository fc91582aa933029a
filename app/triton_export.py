"""`lgg-tumor triton-export OUT`: both networks of a model folder as a Triton Inference Server model repository.

Then `tritonserver --model-repository=OUT` serves them, and the service with `LGG_TRITON_URL=host:8001` sends
its tensors there (app/core/triton.py). The model folder's card is verified (sha256 of each file) first.
"""

import argparse
import sys
from pathlib import Path

KINDS = ("KIND_GPU", "KIND_CPU")


def run_export(args: argparse.Namespace) -> int:
    from app.core.onnx_sessions import ModelFolderError, read_model_card
    from app.core.triton import RepositoryOptions, write_repository

    try:
        card = read_model_card(args.model_dir)
        options = RepositoryOptions(args.max_batch_size, args.max_queue_delay_us, args.instances, args.kind)
        written = write_repository(card, args.out, options)
    except ModelFolderError as error:
        print(f"cannot export: {error}", file=sys.stderr)
        return 1
    print(f"Triton model repository for model card {card.version}: {', '.join(str(p) for p in written)}")
    return 0


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    # Imported here, not above: `import app.cli` (the client side) stays free of onnxruntime.
    from app.core.triton import RepositoryOptions

    export = commands.add_parser(
        "triton-export", help="write the models as a Triton model repository", description=__doc__
    )
    export.add_argument("out", type=Path, help="model repository folder (created; existing models are replaced)")
    export.add_argument("--model-dir", type=Path, default=Path("models"), help="model folder (default: models)")
    export.add_argument("--max-batch-size", type=int, default=RepositoryOptions.max_batch_size)
    export.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=RepositoryOptions.max_queue_delay_us,
        help="how long Triton's dynamic batcher waits to fill a batch",
    )
    export.add_argument("--instances", type=int, default=RepositoryOptions.instances, help="model instances per device")
    export.add_argument("--kind", choices=KINDS, default=RepositoryOptions.kind, help="run on GPUs or CPUs")
    export.set_defaults(run=run_export)
