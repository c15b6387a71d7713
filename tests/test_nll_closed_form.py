"""The variational bound of calc_bpd_loop against its closed form.

For a model that predicts x̂_0 = c, a constant that ignores x_t, with the posterior variances
(sigma_small) and the x_0-parameterisation, every term of L = L_T + Σ_{t≥1} L_{t−1} + L_0
(DDPM eq. 5) is known exactly, whatever noise x_t was drawn with:

* L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)): the two Gaussians share the variance β̃_t
  and their means differ by coef1_t·(c − x_0) (the x_t parts cancel), so the KL is
  coef1_t²·(c − x_0)² / (2 β̃_t) nats per dimension — 0 when c = x_0, the true posterior;
* L_0 = −log of the Gaussian mass N(c, β̃_1) puts on x_0's bin [x_0 − 1/255, x_0 + 1/255]
  (open-ended at ±1), since coef1_0 = 1 and coef2_0 = 0 at the first step;
* L_T = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)).

Each is computed here by hand with math.erf, never with the library's own helpers. The
library's decoder uses the tanh approximation of the normal CDF (as improved-diffusion does),
good to about 1e-4 relative on these bins: the decoder's tolerance below (every other term is
exact to rounding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from admflow.config import DiffusionConfig
from models.diffusion_factory import create_diffusion
from models.likelihood import calc_bpd_loop

LN2 = math.log(2.0)


def diffusion(steps: int, schedule: str):
    cfg = DiffusionConfig(
        steps=steps, noise_schedule=schedule, learn_sigma=False, sigma_small=True,
        predict_xstart=True,
    )  # fmt: skip
    return create_diffusion(cfg)


RTOL = 2e-4


def tail(z: float) -> float:
    """P(N(0,1) > z), accurate far into the tail."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def decoder_nats(x: float, mean: float, sigma: float) -> float:
    lo = -math.inf if x < -0.999 else (x - 1 / 255 - mean) / sigma
    hi = math.inf if x > 0.999 else (x + 1 / 255 - mean) / sigma
    return -math.log(tail(lo) - tail(hi))


def expected_terms(d, x0: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    """(L_T, Σ_{t≥1} L_{t−1}, L_0) of one image, bits/dim."""
    ab_T = d.alphas_cumprod[-1]
    prior = 0.5 * (-1.0 - math.log(1 - ab_T) + (1 - ab_T) + ab_T * x0**2)
    beta_tilde = d.posterior_variance
    coef1 = d.posterior_mean_coef1
    kl = sum(coef1[t] ** 2 * (c - x0) ** 2 / (2 * beta_tilde[t]) for t in range(1, d.num_timesteps))
    # the decoder's variance is β̃ of the second step (β̃ of the first is 0); with one step, β_1
    sigma0 = math.sqrt(beta_tilde[1] if d.num_timesteps > 1 else d.betas[0])
    dec = np.vectorize(lambda a, b: decoder_nats(a, b, sigma0))(x0, c)
    prior_b, kl_b, dec_b = (float(np.mean(p + 0 * x0) / LN2) for p in (prior, kl, dec))
    return prior_b, kl_b, dec_b


def check_bound(d, out: dict, x0: torch.Tensor, c: torch.Tensor) -> None:
    terms = np.array([expected_terms(d, a.numpy(), b.numpy()) for a, b in zip(x0, c, strict=True)])
    np.testing.assert_allclose(out["prior_bpd"].numpy(), terms[:, 0], rtol=1e-9)
    np.testing.assert_allclose(
        out["vb"][:, 1:].sum(dim=1).numpy(), terms[:, 1], atol=1e-9, rtol=1e-9
    )
    np.testing.assert_allclose(out["vb"][:, 0].numpy(), terms[:, 2], rtol=RTOL)
    np.testing.assert_allclose(out["total_bpd"].numpy(), terms.sum(axis=1), rtol=RTOL)


def pixel_grid_images(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3, 4, 4))
    pixels[0, 0, 0, :2] = (0, 255)  # both open-ended bins
    return torch.from_numpy(pixels / 127.5 - 1.0)


class ConstantXStart:
    def __init__(self, c: torch.Tensor):
        self.c = c

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.c.expand_as(x).clone()


@pytest.mark.parametrize("steps, schedule", [(1, "cosine"), (10, "cosine"), (50, "linear")])
def test_the_true_posterior_leaves_only_the_prior_and_decoder_terms(steps, schedule):
    d = diffusion(steps, schedule)
    x0 = pixel_grid_images(3, seed=steps)
    out = calc_bpd_loop(d, ConstantXStart(x0), x0, generator=torch.Generator().manual_seed(0))
    if steps > 1:
        assert out["vb"][:, 1:].abs().max() < 1e-9  # every L_{t-1}, t >= 1, is 0
    check_bound(d, out, x0, x0)


@pytest.mark.parametrize("steps, schedule", [(1, "cosine"), (10, "cosine"), (50, "linear")])
def test_a_wrong_constant_prediction_costs_its_exact_kl(steps, schedule):
    d = diffusion(steps, schedule)
    x0 = pixel_grid_images(2, seed=100 + steps)
    # off by half the decoder's standard deviation, alternating in sign; kept inside [-1, 1] so
    # clipping x̂_0 leaves it alone
    var0 = d.posterior_variance[1] if steps > 1 else d.betas[0]
    sign = torch.where(torch.arange(x0.numel()).reshape(x0.shape) % 2 == 0, 1.0, -1.0)
    c = (x0 + 0.5 * math.sqrt(var0) * sign).clamp(-1, 1)
    out = calc_bpd_loop(d, ConstantXStart(c), x0, generator=torch.Generator().manual_seed(1))
    check_bound(d, out, x0, c)
    # the noise never enters: another draw gives the same bound
    again = calc_bpd_loop(d, ConstantXStart(c), x0, generator=torch.Generator().manual_seed(2))
    check_bound(d, again, x0, c)
    if steps > 1:  # a real cost, not a vanishing one
        assert out["vb"][:, 1:].sum(dim=1).min() > 0.05


def test_the_prior_term_is_the_kl_to_the_standard_normal():
    d = diffusion(10, "cosine")
    x0 = pixel_grid_images(2, seed=7)
    out = calc_bpd_loop(d, ConstantXStart(x0), x0)
    ab = d.alphas_cumprod[-1]
    x = x0.numpy()
    want = np.mean(0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x**2), axis=(1, 2, 3)) / LN2
    np.testing.assert_allclose(out["prior_bpd"].numpy(), want, rtol=RTOL)
