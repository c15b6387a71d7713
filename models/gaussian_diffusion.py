"""Gaussian diffusion: forward process q, reverse process p_θ and the training losses.

Notation follows Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (Improved DDPM); timesteps
are 0-based indices, so the paper's t = 1..T is ``t = 0..T-1`` here and ``t == 0`` is the decoder
step p_θ(x_0 | x_1).

* q_sample:            x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε                          (DDPM eq. 4)
* q_posterior:         q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)                 (DDPM eq. 6–7)
* p_mean_variance:     μ_θ from ε, x_0 or x_{t−1} prediction; Σ_θ fixed (β_t or β̃_t) or learned,
                       LEARNED_RANGE: Σ = exp(v log β_t + (1−v) log β̃_t)    (IDDPM eq. 15)
* training_losses:     L_simple (DDPM eq. 14), L_vlb (eq. 5), L_hybrid = L_simple + λ L_vlb
                       with a stop-gradient on μ in the L_vlb term          (IDDPM §3.1)

The full likelihood bound in bits/dim (every L_t) is models.likelihood; the noise ε is drawn
by models.noise; the parameterisation enums are models.diffusion_types.

Sampling (DDPM, DDIM and the ODE solvers) is in models.samplers: each sampler is a function of
a models.denoiser.Denoiser, which turns this diffusion's p_θ into ε̂, x̂_0 and moments, guided.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.diffusion_types import LossType, ModelMeanType, ModelVarType
from models.losses import discretized_gaussian_log_likelihood, normal_kl
from models.noise import randn

Model = Callable[..., torch.Tensor]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# Schedule tables as tensors on the devices that use them, so a lookup never reads ``t`` back to
# the host (on a GPU each such read waits for the queue). The table is kept beside its copy, so
# its id (the key) is never reused for another table while cached.
_ON_DEVICE: dict[tuple[int, str, torch.dtype], tuple[np.ndarray, torch.Tensor]] = {}


def extract(table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, ..., 1) to broadcast against ``like``: the float64 table cast to
    float64 when ``like`` is (closed-form tests), else float32 (some devices lack float64),
    then gathered on ``like``'s device (the same values as gathering first, no host read)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    key = (id(table), str(like.device), dtype)
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0] is not table:
        if len(_ON_DEVICE) >= 512:  # many short-lived diffusions: start again
            _ON_DEVICE.clear()
        hit = _ON_DEVICE[key] = (table, torch.from_numpy(table).to(dtype).to(like.device))
    values = hit[1][t.detach().to(like.device).long()]
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class TimestepMappedModel:
    """Calls ``fn(x, map_t(t), **kwargs)``: what the network sees as its timestep input."""

    def __init__(self, fn: Model, map_t: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.map_t = map_t

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(x, self.map_t(t), **kwargs)


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion with variances ``betas`` (β_1..β_T).

    ``vlb_weight`` is λ of L_hybrid = L_simple + λ L_vlb (see :meth:`vb_loss_weight`).
    ``rescale_timesteps`` feeds the network float timesteps scaled to [0, 1000) whatever T is.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray | list[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        vlb_weight: float = 0.001,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.vlb_weight = float(vlb_weight)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self._set_tables()

    def _set_tables(self) -> None:
        betas = self.betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)  # ᾱ_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # ᾱ_{t−1}, ᾱ_0 := 1
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # β̃_t (DDPM eq. 7). It is 0 at the first step, so its log is clipped to log β̃ of the
        # second step; that is also the variance the decoder p(x_0|x_1) uses.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else self.betas
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # σ_t² = β_t ("fixed large"); the first entry uses β̃ of step 2 as the decoder variance
        # because β_1 is so small that the discretised decoder would be needlessly sharp.
        large = (
            np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas
        )
        self.fixed_large_variance = large
        self.fixed_large_log_variance = np.log(large)

    # ------------------------------------------------------------------ timesteps seen by the net

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input the network gets for internal index ``t``."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def wrap_model(self, model: Model) -> Model:
        """``model`` (or a cond_fn) callable with internal indices; it sees :meth:`model_timesteps`.

        Every public method wraps the raw model itself, so pass the raw model to them.
        """
        return TimestepMappedModel(model, self.model_timesteps)

    # ------------------------------------------------------------------ forward process q

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) by reparameterisation: √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
        if noise is None:
            noise = randn(
                x_start.shape, device=x_start.device, generator=generator, dtype=x_start.dtype
            )
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """μ̃_t(x_t, x_0), β̃_t and clipped log β̃_t of q(x_{t−1} | x_t, x_0)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t) * x_start
            + extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations

    def predict_xstart_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, inverting q_sample."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """ε = (x_t/√ᾱ_t − x̂_0) / √(1/ᾱ_t − 1): the noise that x̂_0 implies."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        # invert μ̃ = c1 x_0 + c2 x_t
        coef1 = extract(self.posterior_mean_coef1, t, x_t)
        coef2 = extract(self.posterior_mean_coef2, t, x_t)
        return (xprev - coef2 * x_t) / coef1

    # ------------------------------------------------------------------ reverse process p_θ

    def _split_output(
        self, model_output: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split (B, 2C, ...) into the mean prediction and the variance values when Σ is learned."""
        channels = x.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"{self.model_var_type.name} needs {2 * channels} output channels "
                    f"(mean and variance), got {tuple(model_output.shape)}"
                )
            mean_out, var_values = torch.split(model_output, channels, dim=1)
            return mean_out, var_values
        if model_output.shape[1] != channels:
            raise ValueError(
                f"expected {channels} output channels, got {tuple(model_output.shape)}"
            )
        return model_output, None

    def _variance(
        self, var_values: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_θ, log Σ_θ) for the configured ModelVarType."""
        if self.model_var_type == ModelVarType.LEARNED:
            return torch.exp(var_values), var_values
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            # IDDPM eq. 15: interpolate in the log domain between the bounds β̃_t and β_t.
            min_log = extract(self.posterior_log_variance_clipped, t, x)
            max_log = extract(np.log(self.betas), t, x)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            tables = self.fixed_large_variance, self.fixed_large_log_variance
        else:
            tables = self.posterior_variance, self.posterior_log_variance_clipped
        ones = torch.ones_like(x)
        return extract(tables[0], t, x) * ones, extract(tables[1], t, x) * ones

    def p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t−1} | x_t) from a network output already computed (see :meth:`p_mean_variance`)."""
        mean_out, var_values = self._split_output(model_output, x)
        variance, log_variance = self._variance(var_values, x, t)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, mean_out))
            mean = mean_out
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(mean_out)
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, mean_out))
            # μ_θ = μ̃_t(x_t, x̂_0): the posterior mean at the predicted x_0.
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mean, variance, log variance of p_θ(x_{t−1} | x_t) and the implied x̂_0.

        ``clip_denoised`` clamps x̂_0 to [-1, 1] before forming the mean (used when sampling).
        """
        # the network may run in reduced precision; the diffusion math runs in x's dtype
        model_output = self.wrap_model(model)(x, t, **(model_kwargs or {})).to(x.dtype)
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    # ------------------------------------------------------------------ training losses

    def vb_loss_weight(self) -> float:
        """Weight of the sampled vb term in L_hybrid for the MSE loss types.

        One sampled term vb_t (bits/dim) has E_t[vb_t] = L_vlb / T, so the paper's λ L_vlb is
        λ·T·vb_t: that is RESCALED_MSE (the released code's ``vb *= T / 1000`` with λ = 0.001).
        The released code's plain MSE weights vb_t by 1 whatever T is, i.e. λ·T only at T = 1000;
        we express it as λ·1000 so that the default λ = 0.001 reproduces the released weights in
        both modes and a different λ still scales the term.
        """
        if self.loss_type == LossType.RESCALED_MSE:
            return self.vlb_weight * self.num_timesteps
        return self.vlb_weight * 1000.0

    def vb_terms_bpd(
        self,
        p_out: dict[str, torch.Tensor],
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """One term of L_vlb in bits/dim: L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ) for t > 0 and
        the decoder NLL L_0 = −log p_θ(x_0 | x_1) at t = 0 (DDPM eq. 5, 13)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, p_out["mean"], p_out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=p_out["mean"], log_scales=0.5 * p_out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example losses at timesteps ``t``: {"loss", "mse", "vb"}, each of shape (B,).

        * "mse": mean-squared error of the mean prediction (ε, x_0 or μ̃) — L_simple.
        * "vb": the sampled L_vlb term in bits/dim, unweighted. For the MSE loss types with a
          learned Σ it is computed with the mean prediction detached, so it trains Σ only
          (IDDPM §3.1: "we apply a stop-gradient to the μ_θ(x_t, t) output for the L_vlb term").
        * "loss": what to minimise: mse (+ vb_loss_weight()·vb if Σ is learned) for MSE types;
          vb (×T for RESCALED_KL) for KL types.
        """
        if noise is None:
            noise = randn(
                x_start.shape, device=x_start.device, generator=generator, dtype=x_start.dtype
            )
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.wrap_model(model)(x_t, t, **(model_kwargs or {})).to(x_t.dtype)
        mean_out, var_values = self._split_output(model_output, x_t)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        mse = mean_flat((target - mean_out) ** 2)

        if self.loss_type.is_vb():
            p_out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
            vb = self.vb_terms_bpd(p_out, x_start, x_t, t)
            scale = self.num_timesteps if self.loss_type == LossType.RESCALED_KL else 1.0
            return {"loss": vb * scale, "mse": mse.detach(), "vb": vb}

        if var_values is not None:
            frozen = torch.cat([mean_out.detach(), var_values], dim=1)  # stop-gradient on μ
            p_out = self.p_mean_variance_from_output(frozen, x_t, t, clip_denoised=False)
            vb = self.vb_terms_bpd(p_out, x_start, x_t, t)
            return {"loss": mse + self.vb_loss_weight() * vb, "mse": mse, "vb": vb}

        with torch.no_grad():  # fixed Σ: the vb term is only reported
            p_out = self.p_mean_variance_from_output(
                model_output.detach(), x_t, t, clip_denoised=False
            )
            vb = self.vb_terms_bpd(p_out, x_start, x_t, t)
        return {"loss": mse, "mse": mse, "vb": vb}
