"""`python -m training train`: one network on the patient split's training patients.

Validation patients are scored every epoch for the curves; test patients are left for `evaluate`. With
`--all-patients` every patient trains (the shipped model), and export takes its thresholds from `cv`.
Under `torchrun --nproc-per-node N python -m training train ...` the epochs are shared by N processes.
"""

import argparse
import logging
from pathlib import Path

import torch

from training.dataset import load_cache, read_split, split_patients, write_split
from training.fitting import MODELS, Runtime, add_config_arguments, config_from_args, fit
from training.logs import setup_logging

log = logging.getLogger("training")


def run(args: argparse.Namespace) -> Path:
    runtime = Runtime.start()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args, args.model)
    out_dir = Path(args.out) / args.model
    setup_logging(out_dir / "train.log", runtime.rank)
    cache = load_cache(Path(args.data), config.size, Path(args.cache_dir))
    split_path = Path(args.split)
    if not split_path.exists() and runtime.rank == 0:
        everyone = {"train": sorted(set(cache.patients.tolist())), "val": [], "test": []}
        write_split(
            everyone if args.all_patients else split_patients(cache.patients, cache.labels, config.seed), split_path
        )
    if runtime.world_size > 1:
        torch.distributed.barrier()
    split = read_split(split_path)
    train_idx, val_idx = cache.indices_of(split["train"]), cache.indices_of(split["val"])
    log.info(
        "%s: %d train slices (%d patients), %d val slices (%d patients), device %s, world %d",
        config.model,
        len(train_idx),
        len(split["train"]),
        len(val_idx),
        len(split["val"]),
        runtime.device,
        runtime.world_size,
    )
    path = fit(config, cache, train_idx, val_idx, out_dir, runtime, resume=args.resume, progress=args.progress)
    runtime.stop()
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--out", default="runs", help="checkpoints and logs go to OUT/<model>/")
    parser.add_argument("--split", default="runs/split.json", help="patient split; created if missing")
    parser.add_argument(
        "--all-patients",
        action="store_true",
        help="a new split with every patient in train (the final model; thresholds then come from `cv`)",
    )
    add_config_arguments(parser)
