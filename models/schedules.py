"""Forward-process variance schedules β_1..β_T.

* linear (Ho et al. 2020, §4): β rises linearly from 1e-4 to 0.02 for T = 1000. For other T the
  endpoints are scaled by 1000/T so that the total amount of noise (≈ Σβ) stays comparable.
* cosine (Nichol & Dhariwal 2021, §3.2): defined through ᾱ(t) = f(t)/f(0) with
  f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008; β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped at 0.999 to avoid
  the singularity at t = T.

All tables are float64 numpy arrays: the products ᾱ_t lose precision quickly in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

COSINE_OFFSET = 0.008
MAX_BETA = 0.999


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> np.ndarray:
    """Discretise a continuous ᾱ(τ), τ ∈ [0, 1], into T betas: β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T)."""
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_alpha_bar(tau: float) -> float:
    """f(τ) of the cosine schedule (un-normalised ᾱ; the ratio in betas_for_alpha_bar cancels f(0))."""
    return math.cos((tau + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


def cosine_beta_schedule(num_timesteps: int) -> np.ndarray:
    return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas for the schedule called ``name`` ("linear" or "cosine") with T = ``num_timesteps``."""
    if num_timesteps <= 0:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; use 'linear' or 'cosine'")
