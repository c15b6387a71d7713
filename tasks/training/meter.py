"""Training metrics: sums of per-example terms, overall and per quartile of t.

The sums travel as one float64 vector so that a single all-reduce per step gives exact
global means on every worker.
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
        q = quartile(t, self.num_timesteps)
        out = torch.zeros(self.width, dtype=torch.float64)
        for i, name in enumerate(self.terms):
            v = values[name].detach().double().cpu()
            out[i * 5] = v.sum()
            out[i * 5 + 1 : i * 5 + 5] = torch.zeros(4, dtype=torch.float64).index_add_(0, q, v)
        base = len(self.terms) * 5
        out[base] = len(t)
        out[base + 1 : base + 5] = torch.bincount(q, minlength=4).double()
        return out

    def summarise(self, total: torch.Tensor, prefix: str = "") -> dict[str, float]:
        base = len(self.terms) * 5
        out: dict[str, float] = {}
        for i, name in enumerate(self.terms):
            if total[base] > 0:
                out[f"{prefix}{name}"] = float(total[i * 5] / total[base])
            for q in range(4):
                n = total[base + 1 + q]
                if n > 0:
                    out[f"{prefix}{name}_q{q}"] = float(total[i * 5 + 1 + q] / n)
        return out
