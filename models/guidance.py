"""Classifier guidance (Dhariwal & Nichol 2021, §4).

A noisy classifier p_φ(y | x_t, t) steers sampling toward class y with scale s:

* DDPM (Alg. 1, :func:`condition_mean`):  μ ← μ + Σ · s ∇_{x_t} log p_φ(y | x_t)
* DDIM (Alg. 2, :func:`condition_score`): ε̂ ← ε_θ − √(1−ᾱ_t) · s ∇_{x_t} log p_φ(y | x_t)

A ``cond_fn(x, t, y=..., **model_kwargs)`` returns s ∇_x log p_φ(y | x_t); the denoiser
(models.denoiser) passes it the sampler's ``model_kwargs`` (which hold the target labels ``y``)
and the timestep the networks see (original timestep for respaced diffusions), and applies the
form its sampler needs. Guidance works the same for conditional and unconditional diffusion
models; for the latter wrap the model in :func:`drop_class_labels` so the ``y`` meant for the
classifier is not fed to it.

Classifier-free guidance (Ho & Salimans 2022) needs no classifier: :func:`drop_labels` trains
the model with a null class, :func:`classifier_free` mixes its two predictions when sampling
(the denoiser's ``cfg_scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from models.gaussian_diffusion import GaussianDiffusion, extract

CondFn = Callable[..., torch.Tensor]
Moments = dict[str, torch.Tensor]


def cond_fn_from_classifier(
    classifier: Callable[..., torch.Tensor], classifier_scale: float
) -> CondFn:
    """s · ∇_x log p_φ(y | x_t, t) for a classifier called as ``classifier(x, t)`` -> logits.

    The gradient is taken on a detached float32 copy of x (samplers run under no_grad, and the
    diffusion model may run in reduced precision), with autograd enabled locally.
    """

    def cond_fn(
        x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_: Any
    ) -> torch.Tensor:
        if y is None:
            raise ValueError(
                "classifier guidance needs target labels: pass model_kwargs={'y': labels}"
            )
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=log_probs.device), y.long()]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad * float(classifier_scale)

    return cond_fn


def condition_mean(p_mean_var: Moments, gradient: torch.Tensor) -> torch.Tensor:
    """Guided mean for ancestral sampling (ADM Alg. 1): μ + Σ · s∇_x log p_φ(y | x_t).

    ``gradient`` is the cond_fn's already scaled s∇ log p_φ.
    """
    mean = p_mean_var["mean"]
    return mean + p_mean_var["variance"] * gradient.to(mean.dtype)


def condition_score(
    diffusion: GaussianDiffusion,
    p_mean_var: Moments,
    x: torch.Tensor,
    t: torch.Tensor,
    gradient: torch.Tensor,
) -> Moments:
    """Guided prediction for DDIM (ADM Alg. 2): ε̂ = ε_θ − √(1−ᾱ_t) · s∇_x log p_φ(y | x_t).

    Returns ``p_mean_var`` with ``eps``, ``pred_xstart`` and ``mean`` replaced. x̂_0 is updated
    as x̂_0 + (1−ᾱ_t)/√ᾱ_t · grad, which equals (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t but adds exactly zero
    when the gradient is zero, so s = 0 reproduces unguided sampling bit for bit.
    """
    pred_xstart = p_mean_var["pred_xstart"]
    gradient = gradient.to(pred_xstart.dtype)
    alpha_bar = extract(diffusion.alphas_cumprod, t, x)
    eps = (
        diffusion.predict_eps_from_xstart(x, t, pred_xstart)
        - torch.sqrt(1.0 - alpha_bar) * gradient
    )
    pred_xstart = pred_xstart + (1.0 - alpha_bar) / torch.sqrt(alpha_bar) * gradient
    mean, _, _ = diffusion.q_posterior_mean_variance(pred_xstart, x, t)
    return {**p_mean_var, "eps": eps, "pred_xstart": pred_xstart, "mean": mean}


def drop_class_labels(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An unconditional model that ignores the ``y`` meant for the classifier."""

    def model_fn(
        x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return model(x, t, **kwargs)

    return model_fn


# ---------------------------------------------------------------------------- classifier-free
# Ho & Salimans 2022: train one network with labels replaced by a learned null class ∅ with
# probability p, then sample with ε̂ = (1+w)·ε(x, y) − w·ε(x, ∅).


def drop_labels(
    y: torch.Tensor, probability: float, null_class: int, generator: torch.Generator
) -> torch.Tensor:
    """``y`` with each label replaced by ``null_class`` with ``probability``.

    The coin flips come from ``generator`` (a CPU generator seeded per training step), so the
    dropped labels are a function of the step's seed and a resumed run drops the same ones.
    """
    if probability <= 0:
        return y
    drop = torch.rand(len(y), generator=generator, device=generator.device) < probability
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


def classifier_free(
    model: Callable[..., torch.Tensor], scale: float, null_class: int
) -> Callable[..., torch.Tensor]:
    """A model giving ε̂ = (1+w)·ε(x, y) − w·ε(x, ∅) in its first C channels (w = ``scale``).

    The remaining channels (the learned variance) are the conditional pass's. The two passes
    run separately, so at w = 0 the output equals the conditional model's bit for bit.
    """
    w = float(scale)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any):
        if y is None:
            raise ValueError("classifier-free guidance needs labels: pass model_kwargs={'y': ...}")
        cond = model(x, t, y=y, **kwargs)
        uncond = model(x, t, y=torch.full_like(y, null_class), **kwargs)
        c = x.shape[1]
        eps = (1.0 + w) * cond[:, :c] - w * uncond[:, :c]
        return torch.cat([eps, cond[:, c:]], dim=1)

    return model_fn
