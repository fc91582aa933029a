"""The training recipe's pieces: learning-rate schedule and the moving average of the weights."""

import itertools
import math

import pytest
import torch
from torch import nn

from training.fitting import TrainConfig, learning_rate, moving_average


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
