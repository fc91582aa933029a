"""One training run of one network on given patients: the loop shared by `train` and `cv`.

The recipe: AdamW, linear warm-up then cosine decay to zero over the whole planned schedule, which is never
cut short (no early stopping: validation scores of ~12 patients swing by up to 0.14 between epochs, so picking
an epoch by them picks noise), and an exponential moving average of the weights, which is what `model.pt`
holds. `--resume` continues from `last.pt` with the same schedule. Under `torchrun` each process trains on its
share of every epoch (gloo on CPU, nccl on GPU) and rank 0 validates, logs and checkpoints.
"""

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from app.core.preprocessing import mask_to_input_size
from training.augmentation import AUGMENTATIONS, SCALE, augment_batch
from training.checkpoints import MODEL_FILE, RESUME_FILE, classifier_of
from training.dataset import SliceCache, SliceDataset
from training.inference import predict
from training.losses import MASK_LOSSES, mask_loss, weighted_bce_loss
from training.metrics import per_volume_dice, roc_auc
from training.networks import BothHeads, build_model, load_matching_weights

log = logging.getLogger("training")

MODELS = ("classifier", "segmenter", "joint")
# --init-encoder classifier: the classifier trained beside the segmenter (OUT/classifier/ of `train`,
# fold<k>/classifier/ of `cv`), one value for every fold of a CV, where a path would differ fold by fold.
BESIDE = "classifier"


# Options a classifier leaves at their defaults whatever the recipe says: a recipe that changes only them changes
# only the segmenter, and reuses another CV's classifiers (cv --classifiers-from). A classifier has no mask (loss),
# does not start from a classifier, and found the filled-background patients' tumor slices without that augmentation.
SEGMENTER_ONLY_OPTIONS = ("mask_loss", "fill_background", "init_encoder")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; saved in every checkpoint and, by export, in the model card."""

    model: str  # classifier | segmenter | joint (one ResUNet trained on both losses)
    size: int = 128
    width: int = 32
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    epochs: int = 30
    warmup_epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.998  # 0 turns the moving average off
    mask_loss: str = "batch_dice"  # batch_dice | slice_dice | tversky (training.losses.MASK_LOSSES)
    missing_sequences: float = 0.0  # share of training slices shown without pre- and/or post-contrast
    augmentation: str = "standard"  # standard | scanner (training.augmentation.AUGMENTATIONS)
    fill_background: float = 0.0  # share of slices whose pre- or post-contrast background is filled (segmenters)
    seed: int = 42
    autocast: str = "none"  # none | bf16 | fp16 (fp16 with a gradient scaler)
    channels_last: bool = True
    pretrained: str | None = None  # torchvision ResNet state dict (.pth)
    init_encoder: str | None = None  # a classifier checkpoint starts a segmenter's encoder; BESIDE: the run's own
    device: str = field(default="", compare=False)  # filled in by fit(): what actually trained the run

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {tuple(MASK_LOSSES)}, got {self.mask_loss!r}")
        if not 0 <= self.missing_sequences <= 1:
            raise ValueError(f"missing_sequences is a probability, got {self.missing_sequences}")
        if not 0 <= self.fill_background <= 1:
            raise ValueError(f"fill_background is a probability, got {self.fill_background}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")


@dataclass(frozen=True)
class Runtime:
    """How this process takes part: device, rank, world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def start(cls) -> "Runtime":
        """Joins the process group under torchrun; CUDA when present."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if cuda:
            torch.backends.cudnn.benchmark = True
        return cls(device, dist.get_rank() if world_size > 1 else 0, world_size)

    def stop(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's options and the data, shared by the `train` and `cv` commands."""
    defaults = TrainConfig(model="joint")
    parser.add_argument("--data", default="../shared/data/lgg", help="kaggle_3m-layout folder")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--size", type=int, default=defaults.size, help="network input size (divisible by 32)")
    parser.add_argument("--width", type=int, default=defaults.width, help="base channels; 64 = torchvision resnet18")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(defaults.blocks))
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="the whole schedule; never cut short")
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="0: no moving average")
    parser.add_argument(
        "--mask-loss",
        choices=list(MASK_LOSSES),
        default=defaults.mask_loss,
        help="segmentation loss: Dice over the whole batch, Dice per tumor slice (weighs small tumors up), or "
        "Tversky (a missed tumor pixel costs 0.7, a false one 0.3: weighs recall up); + BCE",
    )
    parser.add_argument(
        "--missing-sequences",
        type=float,
        default=defaults.missing_sequences,
        help="probability that a training slice loses pre- and/or post-contrast (replaced by FLAIR, as in "
        "studies without them)",
    )
    parser.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        default=defaults.augmentation,
        help="standard: flip, rotation, scale 5%%, intensity jitter; scanner: also scale 15%% and what differs "
        "between acquisitions after the per-slice z-score (gamma, bias field, blur, coarser grid, noise)",
    )
    parser.add_argument(
        "--fill-background",
        type=float,
        default=defaults.fill_background,
        help="probability that a segmenter's training slice has its pre- or post-contrast background filled with "
        "a tissue-level intensity, as three LGG patients' pre-contrast is (the classifier keeps 0)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument(
        "--autocast",
        choices=["none", "bf16", "fp16"],
        default=defaults.autocast,
        help="mixed precision; bf16 is 10x slower than fp32 on CPUs without bf16 units",
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=defaults.channels_last)
    parser.add_argument("--pretrained", help="torchvision ResNet state dict (.pth) for transfer learning")
    parser.add_argument(
        "--init-encoder",
        help=f"start the segmenter's encoder from a classifier checkpoint, or '{BESIDE}': from the classifier trained "
        "beside it (OUT/classifier of train, each fold's classifier in cv, trained first)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from last.pt")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def config_from_args(args: argparse.Namespace, model: str) -> TrainConfig:
    options = {
        "size": args.size,
        "width": args.width,
        "blocks": tuple(args.blocks),
        "epochs": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "mask_loss": args.mask_loss,
        "missing_sequences": args.missing_sequences,
        "augmentation": args.augmentation,
        "fill_background": args.fill_background,
        "seed": args.seed,
        "autocast": args.autocast,
        "channels_last": args.channels_last,
        "pretrained": args.pretrained,
        "init_encoder": args.init_encoder,
    }
    if model == "classifier":
        options.update({k: getattr(TrainConfig, k) for k in SEGMENTER_ONLY_OPTIONS})
    return TrainConfig(model=model, **options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine decay to 0 at the end of the last epoch."""
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch)) if config.warmup_epochs > 0 else 0
    total = config.epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def moving_average(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of the weights and of the BatchNorm statistics: after each step, ema = decay * ema + (1 - decay) * w."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def encoder_checkpoint(config: TrainConfig, out_dir: Path | None) -> Path | None:
    """The classifier checkpoint the encoder starts from: --init-encoder's path, or the classifier beside out_dir."""
    if config.init_encoder == BESIDE:
        if out_dir is None:
            raise ValueError(f"init_encoder={BESIDE!r} needs the run's folder")
        path = out_dir.parent / BESIDE / MODEL_FILE
        if not path.exists():
            raise SystemExit(f"--init-encoder {BESIDE}: no trained classifier at {path} (train it first)")
        return path
    return Path(config.init_encoder) if config.init_encoder else None


def build_network(config: TrainConfig, out_dir: Path | None = None) -> nn.Module:
    """A new network of the config; `out_dir` (the run's folder) places `--init-encoder classifier`."""
    model = build_model(config.model, config.width, config.blocks)
    if config.pretrained:  # torchvision ImageNet ResNet state dict (width 64)
        state = torch.load(config.pretrained, map_location="cpu", weights_only=True)
        loaded = load_matching_weights(classifier_of(model), state)
        log.info("loaded %d tensors from %s", len(loaded), config.pretrained)
    if encoder := encoder_checkpoint(config, out_dir):
        state = torch.load(encoder, map_location="cpu", weights_only=True)["model"]
        loaded = load_matching_weights(classifier_of(model), state)
        log.info("encoder starts from %s (%d tensors)", encoder, len(loaded))
    return model


def trainable(config: TrainConfig, model: nn.Module) -> nn.Module:
    """The module the training step calls (and DistributedDataParallel wraps): a joint network answers both heads."""
    return BothHeads(model) if config.model == "joint" else model


def training_loss(
    config: TrainConfig, net: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, pos: float
) -> torch.Tensor:
    """Class-weighted BCE for the slice label, the --mask-loss term + BCE for the mask, or both for a joint network.

    `net` is `trainable(config, model)`, possibly inside DistributedDataParallel."""
    if config.model == "classifier":
        return weighted_bce_loss(net(images).float()[:, 0], labels, pos)
    if config.model == "segmenter":
        return mask_loss(config.mask_loss, net(images).float(), masks)
    mask_logits, tumor_logit = net(images)
    return mask_loss(config.mask_loss, mask_logits.float(), masks) + weighted_bce_loss(
        tumor_logit.float()[:, 0], labels, pos
    )


def validate(config: TrainConfig, model: nn.Module, cache: SliceCache, indices: np.ndarray) -> dict[str, float]:
    """Logged every epoch for the training curves (not used to pick weights): slice ROC AUC and/or volume Dice."""
    images, scores = cache.images[indices], {}
    if config.model in ("classifier", "joint") and 0 < cache.labels[indices].sum() < len(indices):
        scores["roc_auc"] = roc_auc(predict(classifier_of(model), images)[:, 0], cache.labels[indices])
    if config.model in ("segmenter", "joint"):
        height, width = cache.masks.shape[1:]
        maps = predict(model, images)
        masks = np.stack([mask_to_input_size(m[0], height, width, 0.5) for m in maps])
        dice = per_volume_dice(masks, cache.masks[indices], cache.patients[indices])
        scores["volume_dice"] = float(np.mean(list(dice.values())))
    return scores


# What a resumed run may change: the schedule's length (to extend a run) and where it trains.
RESUMABLE_CHANGES = ("epochs", "device")


def check_same_recipe(saved: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume a checkpoint under another recipe: its epochs would mix two recipes in one run.

    Options newer than the checkpoint take their default (what the run trained with)."""
    current = asdict(config)
    defaults = asdict(TrainConfig(model=config.model))
    saved = {**defaults, **saved, "blocks": tuple(saved.get("blocks", defaults["blocks"]))}
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved[k] != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise SystemExit(f"the checkpoint to resume was trained with another recipe ({details}): use a new --out")


class Run:
    """The state of one run on disk: resume, per-epoch checkpoint and history."""

    def __init__(
        self,
        out_dir: Path,
        config: TrainConfig,
        model: nn.Module,
        ema: AveragedModel | None,
        augmentation_rng: torch.Generator,
    ) -> None:
        self.out_dir, self.config, self.model, self.ema = out_dir, config, model, ema
        self.augmentation_rng = augmentation_rng
        self.state: dict[str, Any] = {"epoch": 0, "history": [], "train_seconds": 0.0}

    @property
    def evaluated(self) -> nn.Module:
        """The weights that count: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def resume(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        path = self.out_dir / RESUME_FILE
        if not path.exists():
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        check_same_recipe(checkpoint["config"], self.config)
        if checkpoint["config"]["epochs"] != self.config.epochs:
            log.info(
                "resuming with %d planned epochs instead of %d", self.config.epochs, checkpoint["config"]["epochs"]
            )
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
        self.state = checkpoint["state"]
        if "augmentation_rng" in checkpoint:  # a resumed run draws the augmentations an uninterrupted one would
            self.augmentation_rng.set_state(checkpoint["augmentation_rng"])
        else:  # checkpoints from before it was saved: their runs reseeded it by epoch on resume
            self.augmentation_rng.manual_seed(self.augmentation_rng.initial_seed() + self.state["epoch"])
        log.info("resumed from %s at epoch %d", path, self.state["epoch"])

    def save(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        config = asdict(self.config)
        # Written to a temporary name and renamed, so a run killed mid-write keeps its previous checkpoint.
        for name, payload in (
            (MODEL_FILE, {"model": self.evaluated.state_dict(), "config": config, "state": self.state}),
            (
                RESUME_FILE,
                {
                    "model": self.model.state_dict(),
                    "ema": self.ema.state_dict() if self.ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "augmentation_rng": self.augmentation_rng.get_state(),
                    "config": config,
                    "state": self.state,
                },
            ),
        ):
            partial = self.out_dir / f"{name}.partial"
            torch.save(payload, partial)
            partial.replace(self.out_dir / name)
        (self.out_dir / "history.json").write_text(json.dumps(self.state["history"], indent=1))


def fit(
    config: TrainConfig,
    cache: SliceCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    out_dir: Path,
    runtime: Runtime,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train `config.model` on the slices train_idx, log validation on val_idx; returns the path of model.pt."""
    config = TrainConfig(**{**asdict(config), "device": runtime.device.type})
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + runtime.rank)
    model = build_network(config, out_dir).to(runtime.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = moving_average(model, config.ema_decay) if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.autocast]
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp == torch.float16)
    generator = torch.Generator().manual_seed(config.seed + runtime.rank)  # the augmentations' draws
    run = Run(out_dir, config, model, ema, generator)
    if resume:
        run.resume(optimizer, scaler)
    net = trainable(config, model)
    if runtime.world_size > 1:
        net = DistributedDataParallel(net)

    dataset = SliceDataset(cache, train_idx)
    sampler = DistributedSampler(dataset, seed=config.seed) if runtime.world_size > 1 else None
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True)
    labels = cache.labels[train_idx]
    positive_weight = float((~labels).sum() / max(labels.sum(), 1))
    started = time.monotonic() - run.state["train_seconds"]

    for epoch in range(run.state["epoch"], config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        losses = []
        show = progress and runtime.rank == 0
        batches = (
            tqdm(loader, desc=f"{config.model} epoch {epoch + 1}/{config.epochs}", leave=False) if show else loader
        )
        for step, (images, masks, slice_labels) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch * len(loader) + step, len(loader))
            images, masks = augment_batch(
                images.to(runtime.device),
                masks.to(runtime.device),
                generator,
                scale=SCALE[config.augmentation],
                missing_sequences=config.missing_sequences,
                scanner=config.augmentation == "scanner",
                fill_background=config.fill_background,
            )
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(runtime.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = training_loss(config, net, images, masks, slice_labels.to(runtime.device), positive_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
        run.state["epoch"] = epoch + 1
        run.state["train_seconds"] = time.monotonic() - started
        if runtime.rank == 0:
            scores = validate(config, run.evaluated, cache, val_idx) if len(val_idx) else {}
            lr = optimizer.param_groups[0]["lr"]
            entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **scores, "lr": lr}
            run.state["history"].append({**entry, "seconds": run.state["train_seconds"]})
            run.save(optimizer, scaler)
            shown = " ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch")
            log.info("epoch %d %s %.0fs", epoch + 1, shown, run.state["train_seconds"])
    return out_dir / MODEL_FILE
