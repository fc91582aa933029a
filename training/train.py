"""Training loop for both networks: checkpoints, --resume, early stopping, DDP via torchrun.

Run as `python -m training train --model classifier|segmenter ...`; under
`torchrun --nproc-per-node N` each process trains on its share of every epoch
(gloo on CPU, nccl on GPU) and rank 0 validates, logs and checkpoints.
"""

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from app.core.preprocessing import mask_to_input_size
from training.dataset import (
    SliceCache,
    SliceDataset,
    augment_batch,
    load_cache,
    read_split,
    split_patients,
    write_split,
)
from training.losses import dice_bce_loss, weighted_bce_loss
from training.metrics import per_volume_dice, roc_auc
from training.models import ResNet, ResUNet, load_matching_weights

log = logging.getLogger("training")


def build_model(kind: str, width: int, blocks: tuple[int, ...]) -> nn.Module:
    return ResNet(blocks, width) if kind == "classifier" else ResUNet(blocks, width)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(log_file: Path | None, rank: int = 0) -> None:
    """Log to stderr and, on rank 0, to log_file too."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0 and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        handlers=handlers,
        format="%(asctime)s %(levelname)s %(message)s",
        force=True,
    )


def autocast_dtype(name: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 64, channels_last: bool = True) -> np.ndarray:
    """Sigmoid outputs for float16/32 model inputs (N, 3, S, S), in eval mode, in batches."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].astype(np.float32)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs.append(torch.sigmoid(model(x)).float().cpu().numpy())
    return np.concatenate(outputs)


def validate(kind: str, model: nn.Module, cache: SliceCache, indices: np.ndarray) -> float:
    """The early-stopping metric: slice ROC AUC (classifier) or mean per-volume Dice at 0.5 (segmenter)."""
    outputs = predict(model, cache.images[indices])
    if kind == "classifier":
        return roc_auc(outputs[:, 0], cache.labels[indices])
    height, width = cache.masks.shape[1:]
    masks = np.stack([mask_to_input_size(o[0], height, width, 0.5) for o in outputs])
    return float(np.mean(list(per_volume_dice(masks, cache.masks[indices], cache.patients[indices]).values())))


def run(args: argparse.Namespace) -> Path:
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) / args.model
    setup_logging(out_dir / "train.log", rank)
    seed_everything(args.seed + rank)

    cache = load_cache(Path(args.data), args.size, Path(args.cache_dir))
    split_path = Path(args.split)
    if not split_path.exists() and rank == 0:
        write_split(split_patients(cache.patients, cache.labels, seed=args.seed), split_path)
    if distributed:
        dist.barrier()
    split = read_split(split_path)
    train_idx, val_idx = cache.indices_of(split["train"]), cache.indices_of(split["val"])
    log.info(
        "%s: %d train slices (%d patients), %d val slices (%d patients), device %s, world %d",
        args.model,
        len(train_idx),
        len(split["train"]),
        len(val_idx),
        len(split["val"]),
        device,
        dist.get_world_size() if distributed else 1,
    )

    model = build_model(args.model, args.width, tuple(args.blocks))
    if args.pretrained:  # torchvision ImageNet ResNet state dict (width 64)
        target = model if args.model == "classifier" else model.encoder
        loaded = load_matching_weights(target, torch.load(args.pretrained, map_location="cpu", weights_only=True))
        log.info("loaded %d tensors from %s", len(loaded), args.pretrained)
    if args.init_encoder:  # a trained classifier checkpoint starts the segmenter's encoder
        state = torch.load(args.init_encoder, map_location="cpu", weights_only=True)["model"]
        loaded = load_matching_weights(model.encoder, state)
        log.info("segmenter encoder starts from %s (%d tensors)", args.init_encoder, len(loaded))
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "history": [], "train_seconds": 0.0}
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if args.resume and last_path.exists():
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        torch.set_rng_state(checkpoint["rng"])
        log.info("resumed from %s at epoch %d (best %.4f)", last_path, state["epoch"], state["best"])
    net = DistributedDataParallel(model) if distributed else model

    dataset = SliceDataset(cache, train_idx)
    sampler = DistributedSampler(dataset, seed=args.seed) if distributed else None
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    labels = cache.labels[train_idx]
    positive_weight = float((~labels).sum() / max(labels.sum(), 1))
    generator = torch.Generator().manual_seed(args.seed + rank + state["epoch"])
    amp = autocast_dtype(args.autocast)
    started = time.monotonic() - state["train_seconds"]

    for epoch in range(state["epoch"], args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        net.train()
        losses = []
        for images, masks, slice_labels in tqdm(
            loader,
            desc=f"{args.model} epoch {epoch + 1}/{args.epochs}",
            disable=rank != 0 or not args.progress,
            leave=False,
        ):
            images, masks, slice_labels = images.to(device), masks.to(device), slice_labels.to(device)
            images, masks = augment_batch(images, masks, generator)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(images)
            if args.model == "classifier":
                loss = weighted_bce_loss(logits.float()[:, 0], slice_labels, positive_weight)
            else:
                loss = dice_bce_loss(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state["epoch"] = epoch + 1
        state["train_seconds"] = time.monotonic() - started
        if rank == 0:
            metric = validate(args.model, model, cache, val_idx)
            state["history"].append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(np.mean(losses)),
                    "val_metric": metric,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": state["train_seconds"],
                }
            )
            improved = metric > state["best"]
            if improved:
                state["best"], state["best_epoch"] = metric, epoch + 1
            config = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
            checkpoint = {"model": model.state_dict(), "config": config, "state": state}
            if improved:
                torch.save(checkpoint, best_path)
            torch.save(
                {
                    **checkpoint,
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                last_path,
            )
            (out_dir / "history.json").write_text(json.dumps(state["history"], indent=1))
            log.info(
                "epoch %d loss %.4f val %s %.4f (best %.4f @ %d) %.0fs",
                epoch + 1,
                np.mean(losses),
                "auc" if args.model == "classifier" else "volume dice",
                metric,
                state["best"],
                state["best_epoch"],
                state["train_seconds"],
            )
        stop = epoch + 1 - state["best_epoch"] >= args.patience or state["train_seconds"] > args.max_minutes * 60
        if distributed:
            flag = torch.tensor([float(stop)])
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            log.info(
                "stopping after epoch %d (patience %d, time budget %.0f min)",
                epoch + 1,
                args.patience,
                args.max_minutes,
            )
            break
    if distributed:
        dist.destroy_process_group()
    return best_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["classifier", "segmenter"], required=True)
    parser.add_argument("--data", default="../shared/data/lgg", help="kaggle_3m-layout folder")
    parser.add_argument("--out", default="runs", help="checkpoints and logs go to OUT/<model>/")
    parser.add_argument("--split", default="runs/split.json", help="patient split; created if missing")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--size", type=int, default=128, help="network input size (divisible by 32)")
    parser.add_argument("--width", type=int, default=32, help="base channels; 64 = torchvision resnet18")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 2, 2, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=10, help="epochs without validation gain before stopping")
    parser.add_argument("--max-minutes", type=float, default=float("inf"), help="stop after this much training time")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: batches come from RAM)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument(
        "--autocast",
        choices=["none", "bf16", "fp16"],
        default="none",
        help="mixed precision; bf16 is 10x slower than fp32 on CPUs without bf16 units",
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pretrained", help="torchvision ResNet state dict (.pth) for transfer learning")
    parser.add_argument("--init-encoder", help="classifier checkpoint to start the segmenter's encoder from")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/<model>/last.pt")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
