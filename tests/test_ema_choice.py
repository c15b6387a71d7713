"""Which weights a checkpoint is sampled from: its EMA once the average has seen its horizon
of updates, the raw weights before (a young average is mostly the random initialisation)."""

from __future__ import annotations

import json

import pytest
import torch

from models.ema import EMA, ema_horizon, ema_is_warm
from tasks.sampling.weights import resolve_checkpoint


def test_the_horizon_is_where_the_initial_weights_fall_to_a_third():
    assert ema_horizon(0.99) == 100 and ema_horizon(0.9999) == 10_000
    assert not ema_is_warm(0.99, 99) and ema_is_warm(0.99, 100)
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, [0.99])
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(ema_horizon(0.99)):
        ema.update(net)
    share_of_init = 1.0 - float(ema.shadow["0.99"]["weight"])
    assert share_of_init == pytest.approx(0.99**100, rel=1e-5) and 0.36 < share_of_init < 0.37


@pytest.mark.parametrize(
    ("step", "expected"), [(50, "model.pt"), (100, "ema_0.99.pt"), (None, "ema_0.99.pt")]
)
def test_a_checkpoint_younger_than_its_ema_horizon_is_sampled_raw(tmp_path, step, expected):
    for name in ("model.pt", "ema_0.99.pt"):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
    meta = {"kind": "upsampler"} if step is None else {"step": step, "kind": "upsampler"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ckpt = resolve_checkpoint(str(tmp_path), use_ema=True, ema_rates=[0.99])
    assert ckpt.weights.endswith(expected) and ckpt.step == step
    raw = resolve_checkpoint(str(tmp_path), use_ema=False, ema_rates=[0.99])
    assert raw.weights.endswith("model.pt")
