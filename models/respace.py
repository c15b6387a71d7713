"""Sampling with fewer steps than training (Improved DDPM §4).

A model trained with T steps defines ᾱ_t for every t. Keeping a subsequence S of timesteps and
setting β_i = 1 − ᾱ_{S_i} / ᾱ_{S_{i−1}} gives a shorter diffusion with exactly the same ᾱ at the
kept steps, so the trained network (fed the original timestep S_i) can be sampled in |S| steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.gaussian_diffusion import GaussianDiffusion


def _ddim_stride_steps(num_timesteps: int, count: int) -> set[int]:
    """'ddimN': the integer stride s with len(range(0, T, s)) == N (DDIM's uniform skipping)."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return set(range(0, num_timesteps, stride))
    if count == num_timesteps:
        return set(range(num_timesteps))
    raise ValueError(f"cannot take exactly {count} equally strided steps from {num_timesteps}")


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The set of original timesteps to keep.

    * "250": 250 steps spread evenly over [0, T).
    * "10,15,20": T is cut into 3 equal sections (the first T % 3 one step longer) and
      10, 15 and 20 steps are spread evenly over each — finer control of where steps go.
    * "ddim25": integer stride as in DDIM, e.g. range(0, 1000, 40).
    Within a section of ``size`` steps taking ``n``, offsets advance by (size−1)/(n−1) and are
    rounded, so the first and (up to float error) the last step of each section are kept.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_stride_steps(num_timesteps, int(section_counts[len("ddim") :]))
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float offset step by step (not k·stride): the rounding then matches the
        # released code exactly, so "250" etc. pick the same timesteps as the published runs.
        offset = 0.0
        for _ in range(count):
            kept.append(start + round(offset))
            offset += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset ``use_timesteps`` of a base diffusion's steps.

    Internal index i corresponds to original timestep ``timestep_map[i]``; networks and cond_fns
    are always called with the original timestep (scaled to [0, 1000) if rescale_timesteps).
    """

    def __init__(self, use_timesteps: set[int] | list[int], **kwargs: Any):
        base = GaussianDiffusion(**kwargs)
        keep = sorted(set(use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must lie in [0, {base.num_timesteps})")
        self.use_timesteps = set(keep)
        self.original_num_steps = base.num_timesteps
        self.timestep_map = np.array(keep, dtype=np.int64)
        alpha_bar = base.alphas_cumprod[self.timestep_map]
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        kwargs["betas"] = 1.0 - alpha_bar / alpha_bar_prev
        super().__init__(**kwargs)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        mapped = torch.as_tensor(self.timestep_map, device=t.device)[t.long()]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped
