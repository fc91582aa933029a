"""Checkpoint files of a training run.

`last.pt` holds everything to resume (weights, EMA, optimizer, RNG, history); `model.pt` holds the weights to
evaluate and export: the exponential moving average when the run keeps one, written after every epoch so an
interrupted run still has a usable model. Nothing is chosen by a validation score: the schedule runs to its end.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.networks import ResNet, ResUNet, build_model

MODEL_FILE = "model.pt"
RESUME_FILE = "last.pt"


def load_model(path: Path) -> tuple[ResNet | ResUNet, dict[str, Any]]:
    """The network a checkpoint file describes (built from its config), in eval mode, and the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    model = build_model(config["model"], config["width"], tuple(config["blocks"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def classifier_of(model: nn.Module) -> ResNet:
    """The slice classifier inside a trained network: itself, or a joint network's encoder (a whole ResNet)."""
    return model.encoder if isinstance(model, ResUNet) else model


def load_run(run_dir: Path) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """{"classifier": (network, checkpoint), "segmenter": (network, checkpoint)} of a run folder.

    A joint run (`RUN/joint/model.pt` as `train` writes it, or `RUN/model.pt` as a `cv` fold holds it) gives both
    from one network: its encoder is the classifier. Otherwise `RUN/classifier/` and `RUN/segmenter/` each hold one.
    """
    for joint_path in (run_dir / "joint" / MODEL_FILE, run_dir / MODEL_FILE):
        if joint_path.exists():
            joint, checkpoint = load_model(joint_path)
            return {"classifier": (classifier_of(joint), checkpoint), "segmenter": (joint, checkpoint)}
    return {kind: load_model(run_dir / kind / MODEL_FILE) for kind in ("classifier", "segmenter")}
