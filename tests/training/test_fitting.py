"""The training recipe's pieces: learning-rate schedule and the moving average of the weights."""

import itertools
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training import fitting
from training.dataset import SliceCache
from training.fitting import (
    Runtime,
    TrainConfig,
    build_network,
    check_same_recipe,
    fit,
    learning_rate,
    moving_average,
    trainable,
    training_loss,
)
from training.losses import MASK_LOSSES


def test_learning_rate_warms_up_then_decays_to_zero_over_the_whole_schedule() -> None:
    config = TrainConfig(model="joint", epochs=10, warmup_epochs=2, lr=1e-3)
    steps = 50  # per epoch
    rates = [learning_rate(config, step, steps) for step in range(10 * steps)]
    assert rates[0] == pytest.approx(1e-3 / 100)  # first of 100 warm-up steps
    assert rates[99] == pytest.approx(1e-3)  # warm-up ends at the peak
    assert all(a >= b for a, b in itertools.pairwise(rates[100:]))  # then only down
    assert rates[-1] < 1e-6 and rates[300] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 200 / 400)))
    # No warm-up: the cosine starts at the peak.
    assert learning_rate(TrainConfig(model="joint", epochs=10, warmup_epochs=0), 0, steps) == pytest.approx(1e-3)


def test_moving_average_follows_the_update_rule_for_weights_and_batchnorm_statistics() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = moving_average(model, decay=0.9)
    ema.update_parameters(model)  # the first update copies
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    ema.update_parameters(model)
    after = ema.module.state_dict()
    expected_weight = 0.9 * before["0.weight"] + 0.1 * model[0].weight
    torch.testing.assert_close(after["0.weight"], expected_weight)
    torch.testing.assert_close(after["1.running_mean"], 0.9 * before["1.running_mean"] + 0.1 * model[1].running_mean)
    assert not torch.equal(after["0.weight"], model[0].weight)  # it lags the weights


def test_resuming_under_another_recipe_is_refused() -> None:
    saved = {k: v for k, v in asdict(TrainConfig(model="joint")).items() if k != "mask_loss"}  # an older checkpoint
    saved["blocks"] = list(saved["blocks"])  # as JSON stores it
    check_same_recipe(saved, TrainConfig(model="joint", epochs=60, device="cuda"))  # longer schedule, other device
    with pytest.raises(SystemExit, match="mask_loss: 'batch_dice' -> 'slice_dice'"):
        check_same_recipe(saved, TrainConfig(model="joint", mask_loss="slice_dice"))
    with pytest.raises(SystemExit, match=r"lr: 0\.001 -> 0\.002"):
        check_same_recipe(saved, TrainConfig(model="joint", lr=2e-3))


def test_the_segmenter_encoder_starts_from_the_classifier_beside_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = build_network(TrainConfig(model="classifier", width=8, blocks=(1, 1, 1, 1)))
    config = TrainConfig(model="segmenter", width=8, blocks=(1, 1, 1, 1), init_encoder="classifier")
    with pytest.raises(SystemExit, match="no trained classifier"):
        build_network(config, tmp_path / "segmenter")
    (tmp_path / "classifier").mkdir()
    torch.save({"model": classifier.state_dict()}, tmp_path / "classifier" / "model.pt")
    segmenter = build_network(config, tmp_path / "segmenter")
    assert torch.equal(segmenter.encoder.layer1[0].conv1.weight, classifier.layer1[0].conv1.weight)
    scratch = build_network(TrainConfig(model="segmenter", width=8, blocks=(1, 1, 1, 1)), tmp_path / "segmenter")
    assert not torch.equal(scratch.encoder.layer1[0].conv1.weight, classifier.layer1[0].conv1.weight)


def test_the_mask_loss_option_reaches_the_training_step() -> None:
    torch.manual_seed(0)
    images, masks, labels = torch.randn(4, 3, 32, 32), torch.zeros(4, 1, 32, 32), torch.tensor([1.0, 1.0, 0.0, 0.0])
    masks[0, 0, 4:20, 4:20], masks[1, 0, 8:10, 8:10] = 1, 1  # a large and a small tumor
    losses = {}
    for mask_loss in MASK_LOSSES:
        config = TrainConfig(model="joint", width=8, blocks=(1, 1, 1, 1), mask_loss=mask_loss)
        torch.manual_seed(1)
        net = trainable(config, build_network(config)).eval()
        losses[mask_loss] = training_loss(config, net, images, masks, labels, pos=1.0).item()
    assert len({round(loss, 6) for loss in losses.values()}) == len(MASK_LOSSES)
    with pytest.raises(ValueError, match="mask_loss must be one of"):
        TrainConfig(model="joint", mask_loss="focal")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"missing_sequences": 0.3}, {"missing_sequences": 0.3, "scale": 0.05, "scanner": False}),
        ({"augmentation": "scanner"}, {"missing_sequences": 0.0, "scale": 0.15, "scanner": True}),
        ({"fill_background": 0.2}, {"fill_background": 0.2, "scanner": False}),
    ],
)
def test_the_augmentation_options_reach_augmentation_and_the_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path, options: dict, expected: dict
) -> None:
    seen: list[dict] = []
    augment = fitting.augment_batch

    def recording(*args, **kwargs):
        seen.append({k: kwargs[k] for k in expected})
        return augment(*args, **kwargs)

    monkeypatch.setattr(fitting, "augment_batch", recording)
    rng = np.random.default_rng(0)
    cache = SliceCache(
        images=rng.standard_normal((8, 3, 32, 32)).astype(np.float16),
        target_masks=np.zeros((8, 1, 32, 32), np.float16),
        masks=np.zeros((8, 32, 32), bool),
        patients=np.repeat(["P0", "P1"], 4),
        numbers=np.tile(np.arange(1, 5), 2),
    )
    config = TrainConfig(model="joint", size=32, width=8, blocks=(1, 1, 1, 1), epochs=1, batch_size=4, **options)
    model_file = fit(
        config, cache, np.arange(8), np.array([], int), tmp_path, Runtime(torch.device("cpu")), progress=False
    )
    assert seen == [expected, expected]
    saved = torch.load(model_file, weights_only=False)["config"]
    assert all(saved[k] == v for k, v in options.items())


def test_augmentation_options_are_checked() -> None:
    with pytest.raises(ValueError, match="probability"):
        TrainConfig(model="joint", missing_sequences=1.5)
    with pytest.raises(ValueError, match="fill_background is a probability"):
        TrainConfig(model="segmenter", fill_background=-0.1)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        TrainConfig(model="joint", augmentation="elastic")


class Stopped(Exception):
    """Stands for the end of a session: the process dies right after a checkpoint."""


def test_a_run_cut_off_and_resumed_trains_exactly_as_one_that_was_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((8, 32, 32), bool)
    masks[:4, 8:20, 10:24] = True
    cache = SliceCache(
        images=rng.standard_normal((8, 3, 32, 32)).astype(np.float16),
        target_masks=masks[:, None].astype(np.float16),
        masks=masks,
        patients=np.repeat(["P0", "P1"], 4),
        numbers=np.tile(np.arange(1, 5), 2),
    )
    config = TrainConfig(
        model="segmenter", size=32, width=8, blocks=(1, 1, 1, 1), epochs=3, batch_size=4, missing_sequences=0.5
    )

    def train(out, resume: bool = False):
        return fit(config, cache, np.arange(8), np.array([], int), out, Runtime(torch.device("cpu")), resume, False)

    straight = torch.load(train(tmp_path / "straight"), weights_only=False)["model"]
    save = fitting.Run.save

    def save_then_stop(run, *args):
        save(run, *args)
        if run.state["epoch"] == 1:
            raise Stopped

    monkeypatch.setattr(fitting.Run, "save", save_then_stop)
    with pytest.raises(Stopped):
        train(tmp_path / "cut")
    monkeypatch.setattr(fitting.Run, "save", save)
    resumed = torch.load(train(tmp_path / "cut", resume=True), weights_only=False)["model"]
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
