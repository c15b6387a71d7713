"""Likelihood pieces of the variational bound (Ho et al. 2020 eq. 5 and eq. 13).

All functions work elementwise and return nats; callers average over dimensions and divide by
log 2 to report bits/dim.
"""

from __future__ import annotations

import math

import torch

# Half-width of one of the 256 intensity bins after scaling {0..255} to [-1, 1].
BIN_HALF_WIDTH = 1.0 / 255.0


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats.

    Scalars broadcast, so the prior term KL(q(x_T|x_0) ‖ N(0, I)) is ``normal_kl(m, lv, 0., 0.)``.
    """
    tensor = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor))
    lv1, lv2 = (
        torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2)
    )
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (mean1 - mean2) ** 2 * torch.exp(-lv2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) via the tanh approximation (fast, differentiable, accurate to ~1e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p_θ(x_0 | x_1) of eq. 13: Gaussian mass of the 8-bit bin that contains each pixel.

    ``x`` holds uint8 values scaled to [-1, 1]; ``log_scales`` is log σ (half the log variance).
    The first and last bins extend to −∞ and +∞ so the 256 probabilities sum to one.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shape mismatch: {x.shape}, {means.shape}, {log_scales.shape}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - BIN_HALF_WIDTH))
    # Clamp before the log: far tails underflow to 0 in float32.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    bin_mass = cdf_plus - cdf_min
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(bin_mass.clamp(min=1e-12))),
    )
    return log_probs
