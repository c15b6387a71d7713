"""Step grids: which of a diffusion's (internal, possibly respaced) timesteps a sampler visits.

A grid is a strictly decreasing int64 array of internal timestep indices ending at 0, so the
network only ever sees timesteps it was trained on (respacing maps them to the original ones).

* :func:`respaced_grid`: every timestep of the diffusion, T−1 down to 0 (DDPM, DDIM: the
  respacing of Improved DDPM §4 sets their cost).
* :func:`solver_grid`: ``steps`` of them for the few-step ODE solvers, uniform in time, in
  log-SNR λ = log(α/σ) (DPM-Solver++ §5 uses the latter), or in √t ("quadratic" in time,
  DPM-Solver's grid for discrete-time pixel models: denser near the data).
"""

from __future__ import annotations

import numpy as np

from models.gaussian_diffusion import GaussianDiffusion

STEP_SCHEDULES = ("time", "logsnr", "quadratic")
MIN_SOLVER_STEPS = 3


def respaced_grid(diffusion: GaussianDiffusion) -> np.ndarray:
    """All internal timesteps, from the last one down to 0."""
    return np.arange(diffusion.num_timesteps - 1, -1, -1, dtype=np.int64)


def log_snr(diffusion: GaussianDiffusion) -> np.ndarray:
    """λ_t = log(α_t/σ_t) = ½ log(ᾱ_t / (1−ᾱ_t)) for every internal index (decreasing)."""
    abar = diffusion.alphas_cumprod
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def _strictly_decreasing(idx: np.ndarray, top: int) -> np.ndarray:
    """Nudge rounded indices apart so the grid has no repeated timestep (ends stay pinned)."""
    idx = idx.copy()
    for k in range(len(idx) - 2, -1, -1):  # from index 0 upwards
        idx[k] = max(idx[k], idx[k + 1] + 1)
    idx[0] = top
    for k in range(1, len(idx)):
        idx[k] = min(idx[k], idx[k - 1] - 1)
    return idx


def solver_grid(diffusion: GaussianDiffusion, steps: int, schedule: str = "time") -> np.ndarray:
    """``steps`` internal timestep indices, decreasing from the last one to 0.

    "time": evenly spaced indices; "quadratic": evenly spaced √index, so the steps shrink
    towards t = 0; "logsnr": evenly spaced λ, each mapped to the index with
    the nearest λ (so λ is only approximately uniform where the schedule is coarse). On the
    cosine schedule λ plunges over the last few timesteps (β clipped at 0.999), so a log-SNR
    grid spends its first evaluations near pure noise; "time" suits that schedule better.
    """
    n_t = diffusion.num_timesteps
    if steps < MIN_SOLVER_STEPS or steps > n_t:
        raise ValueError(
            f"solver steps: need {MIN_SOLVER_STEPS} <= steps <= {n_t} (the diffusion's "
            f"timesteps), got {steps}"
        )
    if schedule == "time":
        idx = np.rint(np.linspace(n_t - 1, 0, steps)).astype(np.int64)
    elif schedule == "quadratic":
        idx = np.rint(np.linspace(np.sqrt(n_t - 1), 0, steps) ** 2).astype(np.int64)
    elif schedule == "logsnr":
        lam = log_snr(diffusion)
        targets = np.linspace(lam[-1], lam[0], steps)
        idx = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1).astype(np.int64)
    else:
        raise ValueError(f"unknown step schedule {schedule!r}; use one of {STEP_SCHEDULES}")
    return _strictly_decreasing(idx, n_t - 1)
