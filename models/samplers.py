"""Samplers: functions of a denoiser, x_T, a step grid and a generator.

Every sampler has the signature ``sampler(denoiser, x_T, grid, generator=None, *, callback=None,
**options)`` and returns x_0. ``grid`` is a decreasing array of internal timesteps ending at 0
(models.grids); ``generator`` draws the noise of stochastic steps (x_T is the caller's, so a
sampler's draws never depend on how x_T was made); ``callback``, if given, receives
``{"i", "t", "x", "pred_xstart"}`` after each step. The network, guidance and clipping are the
denoiser's (models.denoiser), so a sampler is only the update rule:

* :func:`sample_ddpm`: ancestral sampling x_{t−1} ~ p_θ(x_{t−1} | x_t) (DDPM Alg. 2) over
  consecutive timesteps (respacing, not the grid, makes it shorter).
* :func:`sample_ddim`: DDIM (Song et al. 2020 eq. 12) with η, on any grid.
* ``sample_dpmpp_2m``, ``sample_unipc``: the few-step ODE solvers of models.solvers, and
  ``sample_dpmpp_2m_sde``, the SDE form of the first (fresh noise at every step).

:data:`SAMPLERS` names them as ``sampling.sampler`` does; :func:`sampler_grid` gives each its
grid and :func:`make_sample_loop` puts the pieces together for one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.denoiser import Denoiser
from models.gaussian_diffusion import DenoisedFn, GaussianDiffusion, Model, extract
from models.grids import respaced_grid, solver_grid
from models.guidance import CondFn
from models.noise import Generator, randn
from models.solvers import SOLVERS, Callback, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc

# sampler(denoiser, x_T, grid, generator=None, *, callback=None, **options) -> x_0
Sampler = Callable[..., torch.Tensor]


def timestep(index: int, x: torch.Tensor) -> torch.Tensor:
    """Internal timestep ``index`` for every example of the batch ``x``."""
    return torch.full((x.shape[0],), int(index), device=x.device, dtype=torch.long)


def _nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t > 0, 0 at t = 0 (no noise is added on the last step), shaped to broadcast."""
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _noise_like(x: torch.Tensor, generator: Generator | None) -> torch.Tensor:
    return randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)


# ---------------------------------------------------------------------------- DDPM


def ddpm_step(
    denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One ancestral step x_t → μ_θ + σ_t z with z = ``noise`` (none added at t = 0)."""
    out = denoiser.moments(x, t)
    sample = out["mean"] + _nonzero(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    grid: np.ndarray,
    generator: Generator | None = None,
    *,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling over ``grid``, which must step one timestep at a time down to 0.

    Each step draws its noise from ``generator``, the last one too (and adds none), so the
    draws are one per step whatever the grid.
    """
    if grid[-1] != 0 or (np.diff(grid) != -1).any():
        raise ValueError("DDPM steps through consecutive timesteps down to 0; respace instead")
    x = x_T
    for i, index in enumerate(grid):
        t = timestep(index, x)
        out = ddpm_step(denoiser, x, t, _noise_like(x, generator))
        x = out["sample"]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_xstart": out["pred_xstart"]})
    return x


# ---------------------------------------------------------------------------- DDIM


def ddim_step(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One DDIM step x_t → x_{t_prev} (Song et al. 2020 eq. 12); ``t_prev`` −1 is x_0.

    σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev); η = 0 is deterministic, η = 1 is ancestral
    sampling with the posterior variance β̃ on consecutive timesteps. ``noise`` is needed
    only when η > 0.
    """
    d = denoiser.diffusion
    out = denoiser.eps_and_xstart(x, t)
    alpha_bar = extract(d.alphas_cumprod, t, x)
    alpha_bar_prev = extract(np.append(1.0, d.alphas_cumprod), t_prev + 1, x)  # ᾱ_{−1} := 1
    sigma = (
        eta
        * torch.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    )
    sample = (
        out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
        + torch.sqrt(1.0 - alpha_bar_prev - sigma**2) * out["eps"]
    )
    if eta > 0:
        if noise is None:
            raise ValueError("a DDIM step with eta > 0 needs noise")
        sample = sample + _nonzero(t, x) * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_reverse_step(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One step of the deterministic DDIM ODE forwards, x_t → x_{t+1} (for encoding)."""
    out = denoiser.eps_and_xstart(x, t)
    alpha_bar_next = extract(denoiser.diffusion.alphas_cumprod_next, t, x)
    return (
        out["pred_xstart"] * torch.sqrt(alpha_bar_next)
        + torch.sqrt(1.0 - alpha_bar_next) * out["eps"]
    )


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    grid: np.ndarray,
    generator: Generator | None = None,
    *,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM from x_T through ``grid`` to x_0; with η > 0 each step draws noise from
    ``generator`` (the last one too, adding none)."""
    x = x_T
    for i, index in enumerate(grid):
        t = timestep(index, x)
        t_prev = timestep(grid[i + 1] if i + 1 < len(grid) else -1, x)
        noise = _noise_like(x, generator) if eta > 0 else None
        out = ddim_step(denoiser, x, t, t_prev, eta, noise)
        x = out["sample"]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_xstart": out["pred_xstart"]})
    return x


# ---------------------------------------------------------------------------- registry

SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++2m-sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}


def sampler_grid(
    sampler: str, diffusion: GaussianDiffusion, steps: int | None = None, schedule: str = "time"
) -> np.ndarray:
    """The grid ``sampler`` walks: every respaced timestep for ddpm/ddim; ``steps`` of them
    (default: all) on the ``schedule`` grid for the solvers."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if sampler in SOLVERS:
        return solver_grid(diffusion, diffusion.num_timesteps if steps is None else steps, schedule)
    return respaced_grid(diffusion)


def sampler_options(sampler: str, eta: float = 0.0, order: int = 2) -> dict[str, Any]:
    """The keyword options ``sampler`` takes: η for DDIM, the order for the solvers."""
    if sampler == "ddim":
        return {"eta": eta}
    return {"order": order} if sampler in SOLVERS else {}


def initial_noise(
    shape: tuple[int, ...], device: torch.device | str, generator: Generator | None
) -> torch.Tensor:
    """x_T ~ N(0, I) from ``generator`` (drawn on the generator's device, then moved)."""
    return randn(shape, device=device, generator=generator)


def make_sample_loop(
    diffusion: GaussianDiffusion,
    sampler: str,
    *,
    eta: float = 0.0,
    steps: int | None = None,
    schedule: str = "time",
    order: int = 2,
) -> Callable[..., torch.Tensor]:
    """``loop(model, shape, noise=, clip_denoised=, denoised_fn=, cond_fn=, model_kwargs=,
    device=, generator=)``: a Denoiser, x_T and one call of the sampler, for callers that
    start from a raw model. x_T is ``noise`` or drawn from ``generator`` first."""
    grid = sampler_grid(sampler, diffusion, steps, schedule)  # checks the name too
    fn, options = SAMPLERS[sampler], sampler_options(sampler, eta, order)

    def loop(
        model: Model,
        shape: tuple[int, ...],
        *,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        cond_fn: CondFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        generator: Generator | None = None,
    ) -> torch.Tensor:
        if noise is not None:
            x_T = noise if device is None else noise.to(device)
        else:
            x_T = initial_noise(shape, device or _device_of(model), generator)
        denoiser = Denoiser(
            diffusion,
            model,
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
        )
        return fn(denoiser, x_T, grid, generator, **options)

    return loop


def _device_of(model: Model) -> torch.device | str:
    """Where ``model``'s parameters live (CPU for plain functions)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else "cpu"
