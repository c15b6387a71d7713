"""Classifier guidance (Dhariwal & Nichol 2021, §4).

A noisy classifier p_φ(y | x_t, t) steers sampling toward class y with scale s:

* DDPM (Alg. 1, ``GaussianDiffusion.condition_mean``):  μ ← μ + Σ · s ∇_{x_t} log p_φ(y | x_t)
* DDIM (Alg. 2, ``GaussianDiffusion.condition_score``): ε̂ ← ε_θ − √(1−ᾱ_t) · s ∇_{x_t} log p_φ(y | x_t)

Both receive a ``cond_fn(x, t, y=..., **model_kwargs)`` returning s ∇_x log p_φ(y | x_t); the
samplers pass their ``model_kwargs`` (which hold the target labels ``y``) to it and call it with the
timestep the networks see (original timestep for respaced diffusions). Guidance works the same for
conditional and unconditional diffusion models; for the latter wrap the model in
:func:`drop_class_labels` so the ``y`` meant for the classifier is not fed to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

CondFn = Callable[..., torch.Tensor]


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


def drop_class_labels(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An unconditional model that ignores the ``y`` meant for the classifier."""

    def model_fn(
        x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return model(x, t, **kwargs)

    return model_fn
