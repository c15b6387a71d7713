"""The variational bound on the negative log-likelihood, in bits per dimension.

−log p_θ(x_0) ≤ L_T + Σ_{t>1} L_{t−1} + L_0 (DDPM eq. 5): the prior term L_T has no parameters;
the KL terms L_{t−1} and the discretised decoder's L_0 are
:meth:`GaussianDiffusion.vb_terms_bpd`, the terms L_vlb trains on, here taken at every timestep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from models.gaussian_diffusion import GaussianDiffusion, Model, mean_flat
from models.losses import normal_kl
from models.noise import randn


def prior_bpd(diffusion: GaussianDiffusion, x_start: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim (no parameters; ≈ 0 for a good schedule)."""
    t = torch.full(
        (x_start.shape[0],), diffusion.num_timesteps - 1, device=x_start.device, dtype=torch.long
    )
    mean, _, log_variance = diffusion.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def _timesteps_down(num_timesteps: int, progress: bool) -> Iterable[int]:
    steps: Iterable[int] = range(num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps)
    return steps


def calc_bpd_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    x_start: torch.Tensor,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The full variational bound −log p(x_0) ≤ L_T + Σ_t L_{t−1}, in bits/dim, per example.

    Returns "total_bpd" (B,), "prior_bpd" (B,), and per-step (B, T) tables "vb", "xstart_mse",
    "mse" whose column j is timestep j.
    """
    batch = x_start.shape[0]
    vb, xstart_mse, mse = [], [], []
    for i in _timesteps_down(diffusion.num_timesteps, progress):
        t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
        noise = randn(
            x_start.shape, device=x_start.device, generator=generator, dtype=x_start.dtype
        )
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        with torch.no_grad():
            out = diffusion.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs=model_kwargs)
            vb.append(diffusion.vb_terms_bpd(out, x_start, x_t, t))
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = diffusion.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
    # collected from t = T-1 down to 0; flip so column j is timestep j
    vb_t = torch.stack(vb[::-1], dim=1)
    prior = prior_bpd(diffusion, x_start)
    return {
        "total_bpd": vb_t.sum(dim=1) + prior,
        "prior_bpd": prior,
        "vb": vb_t,
        "xstart_mse": torch.stack(xstart_mse[::-1], dim=1),
        "mse": torch.stack(mse[::-1], dim=1),
    }


def batched_bpd(
    diffusion: GaussianDiffusion,
    model: Model,
    x_start: torch.Tensor,
    batch_size: int,
    generator_for: Callable[[int], torch.Generator | None],
    labels: torch.Tensor | None = None,
    clip_denoised: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`calc_bpd_loop` over ``x_start`` in micro-batches of ``batch_size``; micro-batch
    ``b`` draws its noise from ``generator_for(b)``, so the result does not depend on how the
    images were grouped into larger units of work.

    Returns per image "total_bpd" and "prior_bpd" (N,), and "vb_sum" (T,): each timestep's term
    summed over the images (its mean over a set is the bound's per-step breakdown).
    """
    totals, priors, vb_sum = [], [], None
    for b, lo in enumerate(range(0, x_start.shape[0], batch_size)):
        x = x_start[lo : lo + batch_size]
        kwargs = None if labels is None else {"y": labels[lo : lo + batch_size]}
        out = calc_bpd_loop(diffusion, model, x, clip_denoised, kwargs, generator=generator_for(b))
        totals.append(out["total_bpd"])
        priors.append(out["prior_bpd"])
        vb = out["vb"].sum(dim=0)
        vb_sum = vb if vb_sum is None else vb_sum + vb
    if vb_sum is None:
        raise ValueError("batched_bpd needs at least one image")
    return {"total_bpd": torch.cat(totals), "prior_bpd": torch.cat(priors), "vb_sum": vb_sum}
