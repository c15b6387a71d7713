"""Exponential moving averages of model parameters at several rates.

θ_ema ← rate · θ_ema + (1 − rate) · θ after each optimiser step (DDPM/IDDPM/ADM use 0.9999).
Averages are kept in float32 even when the model trains in reduced precision, on the device of
the model they were built from: built from the network already on the GPU, an update is a few
fused device kernels rather than a copy of every parameter to the host. A released
``ema_<rate>_<step>.pt`` checkpoint is simply the model's state_dict with the averaged parameters,
see :meth:`EMA.model_state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _key(rate: float) -> str:
    return repr(float(rate))


class EMA:
    def __init__(self, model: nn.Module, rates: Sequence[float]):
        for r in rates:
            if not 0.0 < r < 1.0:
                raise ValueError(f"EMA rates must lie in (0, 1), got {r}")
        self.rates = [float(r) for r in rates]
        self.shadow: dict[str, dict[str, torch.Tensor]] = {
            _key(r): {n: p.detach().float().clone() for n, p in model.named_parameters()}
            for r in self.rates
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for rate in self.rates:
            shadow = self.shadow[_key(rate)]
            avgs = list(shadow.values())
            srcs = [
                params[name].detach().to(device=avg.device, dtype=avg.dtype)
                for name, avg in shadow.items()
            ]
            # avg + (1-rate)(src - avg) = rate·avg + (1-rate)·src, all tensors in one call
            torch._foreach_lerp_(avgs, srcs, 1.0 - rate)

    @torch.no_grad()
    def copy_to(self, model: nn.Module, rate: float) -> None:
        """Overwrite ``model``'s parameters with the average at ``rate``."""
        avg = self.shadow[_key(rate)]
        for name, p in model.named_parameters():
            p.copy_(avg[name].to(device=p.device, dtype=p.dtype))

    def model_state_dict(self, model: nn.Module, rate: float) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with parameters replaced by their average (buffers as-is)."""
        avg = self.shadow[_key(rate)]
        out = {}
        for name, value in model.state_dict().items():
            out[name] = avg[name].to(value.dtype).clone() if name in avg else value.detach().clone()
        return out

    def load_model_state_dict(self, rate: float, state: dict[str, torch.Tensor]) -> None:
        """Set the average at ``rate`` from a model state_dict (e.g. a released EMA checkpoint)."""
        avg = self.shadow[_key(rate)]
        missing = [n for n in avg if n not in state]
        if missing:
            raise KeyError(f"EMA state for rate {rate} lacks parameters: {missing[:5]}")
        for name in avg:
            avg[name] = state[name].detach().float().clone().to(avg[name].device)

    def state_dict(self) -> dict[str, Any]:
        return {"rates": list(self.rates), "shadow": {k: dict(v) for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [float(r) for r in state["rates"]] != self.rates:
            raise ValueError(f"EMA rates differ: saved {state['rates']}, configured {self.rates}")
        for key, params in state["shadow"].items():
            mine = self.shadow[key]
            if set(params) != set(mine):
                raise KeyError(f"EMA state for rate {key} has different parameter names")
            for name, value in params.items():
                mine[name] = value.detach().float().clone().to(mine[name].device)


def ema_horizon(rate: float) -> int:
    """The time constant of an EMA at ``rate``, in updates: after ``1 / (1 - rate)`` of them
    the initial weights' share ``rate ** updates`` has fallen to about 1/e (37%)."""
    return round(1.0 / (1.0 - rate))


def ema_is_warm(rate: float, updates: int) -> bool:
    """Whether an EMA that has seen ``updates`` optimiser steps is worth sampling: before its
    horizon it is mostly the random initialisation (at rate 0.99 after 50 steps, 61% of it)."""
    return updates >= ema_horizon(rate)
