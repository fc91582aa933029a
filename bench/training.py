"""Training benchmark: slices/s of one training step of each network, technique by technique.

    python -m bench.training            # about 2 minutes on 2 cores
    python -m bench.training --quick    # smoke run, under a minute; its numbers mean nothing

Each row adds one technique of the project's data path (training/fitting.py) to the row before, starting
from the naive path, so every technique shows what it buys on this machine:
  naive               decode the image and mask files with PIL and preprocess them, sample by sample, every
                      step; augment sample by sample; float32; default (NCHW) memory format
  + cached arrays     the preprocessed arrays decoded once (training/dataset.py's cache), sliced per step
  + batched augment   augment_batch on the whole batch at once
  + channels_last     model and inputs in channels_last: the project's path (the training defaults)
  + autocast bf16     --autocast bf16, measured and reported whatever it costs
A step is: batch assembly, augmentation, then training.fitting.training_loss (the real loss of the recipe),
backward, AdamW step; batch 16 at the model card's input size, width and blocks (random init: the timing
does not depend on the weights). `joint` is the recipe's network: the ResUNet with its classifier head.
"""

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import bench_arguments, finish_report, print_table, start_report
from training.augmentation import augment_batch
from training.dataset import SliceRecord, decode_record, find_slices
from training.fitting import TrainConfig, trainable, training_loss
from training.networks import build_model


@dataclass(frozen=True)
class Variant:
    name: str
    cached: bool
    batched_augment: bool
    channels_last: bool
    autocast_bf16: bool


VARIANTS = [
    Variant("naive: decode every step, per-sample augment, fp32, NCHW", False, False, False, False),
    Variant("+ cached arrays", True, False, False, False),
    Variant("+ batched augment", True, True, False, False),
    Variant("+ channels_last (the project's path)", True, True, True, False),
    Variant("+ autocast bf16", True, True, True, True),
]


@dataclass
class Data:
    records: list[SliceRecord]
    images: np.ndarray  # the cache: (N, 3, S, S) float16, preprocess_slice output
    target_masks: np.ndarray  # (N, 1, S, S) float16
    labels: np.ndarray  # (N,) bool
    source: str


def load_data(data_dir: Path, size: int, count: int, seed: int, scratch: Path) -> Data:
    """`count` random slices (synthetic ones written to scratch when data_dir is absent), decoded once for the cache."""
    if data_dir.is_dir():
        source = f"real LGG slices from {data_dir}"
    else:
        from training.synthetic import write_synthetic_dataset

        data_dir = scratch / "synthetic"
        write_synthetic_dataset(data_dir, patients=max(2, count // 20 + 1), slices=20, fmt="webp")
        source = "SYNTHETIC phantoms (training/synthetic.py, webp), real data absent"
    everything = find_slices(data_dir)
    records = random.Random(seed).sample(everything, min(count, len(everything)))
    decoded = [decode_record((r, size)) for r in records]
    return Data(
        records,
        np.stack([d[0] for d in decoded]),
        np.stack([d[1] for d in decoded]),
        np.array([d[2].any() for d in decoded]),
        f"{source}: {len(records)} of {len(everything)}",
    )


def batch_tensors(data: Data, indices: np.ndarray, variant: Variant, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, target masks) as float32 tensors, from the cache or decoded from the files now."""
    if variant.cached:
        images, masks = data.images[indices], data.target_masks[indices]
    else:
        decoded = [decode_record((data.records[i], size)) for i in indices]
        images, masks = np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded])
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(masks.astype(np.float32))


def time_steps(kind: str, card_model: dict, size: int, data: Data, variant: Variant, batch: int, steps: int) -> float:
    """Median seconds per training step over `steps` timed steps, after one untimed warm-up step."""
    hyperparameters = card_model["training"]["hyperparameters"]
    torch.manual_seed(0)
    config = TrainConfig(model=kind, width=hyperparameters["width"], blocks=tuple(hyperparameters["blocks"]))
    model = build_model(kind, config.width, config.blocks).train()
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    positive_weight = float((~data.labels).sum() / max(data.labels.sum(), 1))

    def step() -> None:
        indices = rng.choice(len(data.records), batch, replace=False)
        images, masks = batch_tensors(data, indices, variant, size)
        labels = torch.from_numpy(data.labels[indices].astype(np.float32))
        if variant.batched_augment:
            images, masks = augment_batch(images, masks, generator)
        else:
            pairs = [augment_batch(images[i : i + 1], masks[i : i + 1], generator) for i in range(batch)]
            images, masks = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        if variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.autocast_bf16):
            loss = training_loss(config, trainable(config, model), images, masks, labels, positive_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        durations.append(time.perf_counter() - started)
    return float(np.median(durations))  # one slow step (another process waking up) does not move it


def main() -> None:
    parser = bench_arguments("training", __doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per fp32 row (bf16 rows: 3)")
    args = parser.parse_args()
    batch, steps, bf16_steps = (4, 1, 1) if args.quick else (16, args.steps, 3)

    card = json.loads((args.models / "model_card.json").read_text())
    size = card["input"]["size"]
    report = start_report("training", args.quick)
    report["machine"] |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        data = load_data(args.data, size, 8 * batch, 0, Path(scratch))
        print(f"slices: {data.source}; batch {batch} at {size}x{size}, torch threads {torch.get_num_threads()}\n")
        rows = []
        for kind in ("classifier", "joint"):
            for variant in VARIANTS:
                n = bf16_steps if variant.autocast_bf16 else steps
                card_model = card["models"]["classifier" if kind == "classifier" else "segmenter"]
                seconds = time_steps(kind, card_model, size, data, variant, batch, n)
                rows.append(
                    {
                        "model": kind,
                        "variant": variant.name,
                        "cached": variant.cached,
                        "batched_augment": variant.batched_augment,
                        "channels_last": variant.channels_last,
                        "autocast_bf16": variant.autocast_bf16,
                        "batch": batch,
                        "steps": n,
                        "ms_per_step": round(seconds * 1000, 1),  # median
                        "slices_per_s": round(batch / seconds, 2),
                    }
                )
                print(f"  {kind} {variant.name}: {rows[-1]['slices_per_s']} slices/s", flush=True)
    for row in rows:
        same_model = [r for r in rows if r["model"] == row["model"]]
        index = same_model.index(row)
        row["x_naive"] = round(row["slices_per_s"] / same_model[0]["slices_per_s"], 2)
        row["x_previous_row"] = round(row["slices_per_s"] / same_model[index - 1]["slices_per_s"], 2) if index else None
    bf16_native = report["machine"]["amx_or_avx512_bf16"]
    report["notes"] += [
        f"slices: {data.source}",
        f"bf16: this CPU {'has' if bf16_native else 'has NO'} native bf16 units (AVX512-BF16/AMX); "
        "the project trains in fp32 here (--autocast none is the default).",
        "Networks are random-init with the model card's width and blocks: the step time does not depend on weights.",
    ]
    report |= {"input_size": size, "batch": batch, "rows": rows}
    print()
    print_table(
        rows,
        [
            ("model", "model"),
            ("variant", "data path"),
            ("ms_per_step", "median ms/step"),
            ("slices_per_s", "slices/s"),
            ("x_naive", "x naive"),
            ("x_previous_row", "x previous row"),
        ],
    )
    finish_report(report, args.results_dir)


if __name__ == "__main__":
    main()
