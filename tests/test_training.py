"""util/training.py: the EMA warm-up schedule and how much of the initial weights an EMA holds."""
from __future__ import annotations

import math

import pytest
import torch

import train
from models import DiT_models
from util.training import ema_decay_at, ema_initial_share, update_ema


def test_ema_warmup_is_tensorflows_num_updates_schedule():
    # TensorFlow's ExponentialMovingAverage with num_updates: min(decay, (1 + t) / (10 + t)).
    assert ema_decay_at(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 10, warmup=True) == pytest.approx(11 / 20)
    assert ema_decay_at(0.9999, 10**6, warmup=True) == 0.9999
    assert ema_decay_at(0.5, 100, warmup=True) == 0.5


def test_ema_warmup_is_off_by_default_and_then_the_plain_decay():
    assert train.parse_args([]).ema_warmup is False
    assert all(ema_decay_at(0.9999, t, warmup=False) == 0.9999 for t in (0, 1, 10, 10**6))
    # The same EMA bit for bit as update_ema with the decay itself.
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    ema_a, ema_b = DiT_models["DiT-S/8"](input_size=8, num_classes=3), DiT_models["DiT-S/8"](input_size=8, num_classes=3)
    ema_b.load_state_dict(ema_a.state_dict())
    update_ema(ema_a, model, 0.9999)
    update_ema(ema_b, model, ema_decay_at(0.9999, 5, warmup=False))
    assert all(torch.equal(a, b) for a, b in zip(ema_a.state_dict().values(), ema_b.state_dict().values()))


@pytest.mark.parametrize("decay,updates", [(0.9999, 300), (0.99, 2000), (0.9, 50), (0.05, 7), (1.0, 40)])
def test_initial_share_is_the_product_of_the_decays(decay, updates):
    for warmup in (False, True):
        product = math.prod(ema_decay_at(decay, t, warmup) for t in range(updates))
        assert ema_initial_share(decay, updates, warmup) == pytest.approx(product, rel=1e-9)
    assert ema_initial_share(0.9999, 300, False) == pytest.approx(0.9704, abs=1e-4)
