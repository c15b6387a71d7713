"""The denoiser every sampler calls: a network and a diffusion seen as D(x_t, t).

:class:`Denoiser` holds what turns a network's output into predictions at a timestep: the
diffusion's parameterisation (ε, x_0 or μ prediction; fixed or learned Σ), clipping of x̂_0 to
the data range, ADM's ``denoised_fn``, classifier guidance (a ``cond_fn``) and classifier-free
guidance (``cfg_scale``). Samplers (models.samplers, models.solvers) only combine its outputs.

It answers in the three forms the samplers need; they differ only in where guidance enters:

* :meth:`Denoiser.moments`: p_θ(x_{t−1} | x_t) with the guided mean (ADM Alg. 1), for DDPM.
* :meth:`Denoiser.eps_and_xstart`: ε̂ and x̂_0 with the guided score (ADM Alg. 2), for DDIM;
  x̂_0 is clipped before the guidance term is added, as in ADM's DDIM.
* ``denoiser(x, t)``: the data prediction x̂_0 = D(x_t, t) with the guided score, clipped last
  (DPM-Solver++'s thresholding of the data prediction): at large scales the guidance term
  alone can move x̂_0 far outside the data range, and a multistep extrapolation would amplify
  that into oscillation. The ODE solvers use this form.

Without guidance and clipping the three agree. Networks and cond_fns are called with the
timestep the network was trained on (``GaussianDiffusion.wrap_model``).

``micro_batch`` bounds how many images one network (and classifier) call sees: the sampler
still steps the whole batch, so an image's noise does not depend on the micro-batch, which
only decides memory and speed (:func:`in_micro_batches`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.gaussian_diffusion import DenoisedFn, GaussianDiffusion, Model
from models.guidance import CondFn, classifier_free, condition_mean, condition_score

Moments = dict[str, torch.Tensor]


def in_micro_batches(fn: Callable[..., torch.Tensor], size: int) -> Callable[..., torch.Tensor]:
    """``fn(x, t, **kwargs)`` called on at most ``size`` examples at a time, outputs joined.

    Every tensor argument whose first dimension is the batch is split with ``x``; a batch that
    fits is passed through untouched, so one micro-batch is the unsplit call bit for bit.
    """
    if size < 1:
        raise ValueError(f"micro_batch must be at least 1, got {size}")

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        if n <= size:
            return fn(x, t, **kwargs)

        def part(v: Any, s: slice) -> Any:
            return v[s] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v

        outs = []
        for start in range(0, n, size):
            s = slice(start, start + size)
            outs.append(fn(x[s], part(t, s), **{k: part(v, s) for k, v in kwargs.items()}))
        return torch.cat(outs)

    return call


class Denoiser:
    """``model`` under ``diffusion`` as D(x_t, t), with clipping and guidance applied.

    ``cfg_scale`` > 0 mixes the conditional and the null-class (``null_class``) predictions,
    ε̂ = (1+w)·ε(x, y) − w·ε(x, ∅) (models.guidance.classifier_free); at 0 the model runs alone.
    ``model_kwargs`` (e.g. the labels ``y``, the upsampler's ``low_res``) go to the model and
    to ``cond_fn``. ``micro_batch`` (None: the whole batch) bounds the images per network call.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        model: Model,
        *,
        model_kwargs: dict[str, Any] | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        cond_fn: CondFn | None = None,
        cfg_scale: float = 0.0,
        null_class: int | None = None,
        micro_batch: int | None = None,
    ):
        if cfg_scale > 0:
            if null_class is None:
                raise ValueError("classifier-free guidance needs the model's null class")
            model = classifier_free(model, cfg_scale, null_class)
        if micro_batch is not None:
            model = in_micro_batches(model, micro_batch)
            cond_fn = in_micro_batches(cond_fn, micro_batch) if cond_fn is not None else None
        self.diffusion = diffusion
        self.model = model
        self.model_kwargs = model_kwargs or {}
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.cond_fn = cond_fn

    def _p(self, x: torch.Tensor, t: torch.Tensor, clip: bool) -> Moments:
        """The unguided p_θ(x_{t−1} | x_t) and x̂_0 (``denoised_fn`` and clip only if ``clip``)."""
        return self.diffusion.p_mean_variance(
            self.model,
            x,
            t,
            clip_denoised=clip and self.clip_denoised,
            denoised_fn=self.denoised_fn if clip else None,
            model_kwargs=self.model_kwargs,
        )

    def _gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s∇_x log p_φ(y | x_t) from the cond_fn, at the timestep the classifier was trained on."""
        assert self.cond_fn is not None
        return self.diffusion.wrap_model(self.cond_fn)(x, t, **self.model_kwargs)

    def moments(self, x: torch.Tensor, t: torch.Tensor) -> Moments:
        """{"mean", "variance", "log_variance", "pred_xstart"} of p_θ(x_{t−1} | x_t); the mean
        guided by condition_mean (ADM Alg. 1)."""
        out = self._p(x, t, clip=True)
        if self.cond_fn is not None:
            out["mean"] = condition_mean(out, self._gradient(x, t))
        return out

    def eps_and_xstart(self, x: torch.Tensor, t: torch.Tensor) -> Moments:
        """{"eps", "pred_xstart", ...}: ε̂ guided by condition_score (ADM Alg. 2), x̂_0 clipped
        before the guidance term is added."""
        out = self._p(x, t, clip=True)
        if self.cond_fn is not None:
            return condition_score(self.diffusion, out, x, t, self._gradient(x, t))
        out["eps"] = self.diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
        return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂_0 = D(x_t, t) from the guided ε̂, then ``denoised_fn`` and the clip to [-1, 1]."""
        out = self._p(x, t, clip=False)
        if self.cond_fn is not None:
            out = condition_score(self.diffusion, out, x, t, self._gradient(x, t))
        x0 = out["pred_xstart"]
        if self.denoised_fn is not None:
            x0 = self.denoised_fn(x0)
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0
