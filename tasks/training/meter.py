"""Training metrics: sums of per-example terms, overall and per quartile of t.

The sums travel as one float64 vector, built on the training device (it goes to a collective,
and NCCL has no CPU tensors), so that a single all-reduce per step gives exact global means on
every worker; the host reads it only when the metrics are logged.
"""

from __future__ import annotations

import torch


def quartile(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    return (t * 4 // num_timesteps).clamp(max=3)


class Meter:
    """Sums of per-example terms, overall and per quartile of t, summed over workers."""

    def __init__(self, terms: tuple[str, ...], num_timesteps: int):
        self.terms = terms
        self.num_timesteps = num_timesteps
        self.width = len(terms) * 5 + 5  # per term: total + 4 quartiles; counts: total + 4

    def vector(self, values: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """The sums for one batch, on ``t``'s device (no host sync: no bincount, whose CUDA
        kernel reads the largest value back to size its output)."""
        q = quartile(t, self.num_timesteps)
        out = torch.zeros(self.width, dtype=torch.float64, device=t.device)
        for i, name in enumerate(self.terms):
            v = values[name].detach().double()
            out[i * 5] = v.sum()
            out[i * 5 + 1 : i * 5 + 5].index_add_(0, q, v)
        base = len(self.terms) * 5
        out[base] = len(t)
        out[base + 1 : base + 5].index_add_(0, q, torch.ones_like(t, dtype=torch.float64))
        return out

    def summarise(self, total: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """Means from summed vectors (one read from the device)."""
        sums = total.tolist()
        base = len(self.terms) * 5
        out: dict[str, float] = {}
        for i, name in enumerate(self.terms):
            if sums[base] > 0:
                out[f"{prefix}{name}"] = sums[i * 5] / sums[base]
            for q in range(4):
                n = sums[base + 1 + q]
                if n > 0:
                    out[f"{prefix}{name}_q{q}"] = sums[i * 5 + 1 + q] / n
        return out


def step_sums(
    meter: Meter, values: dict[str, torch.Tensor], t: torch.Tensor, grad_norm: torch.Tensor
) -> torch.Tensor:
    """What a step all-reduces, on ``t``'s device: the meter's sums, then the step's verdict
    (how many losses are inf/nan; whether the gradient norm is)."""
    bad = torch.stack([(~torch.isfinite(values["loss"])).sum(), ~torch.isfinite(grad_norm)])
    return torch.cat([meter.vector(values, t), bad.double()])
