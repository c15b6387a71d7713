"""Degraded copies of images (blur, contrast reduction, noise) and a sharpness statistic.

The demo's judge (:mod:`models.judge`) trains on such copies beside the clean images, so that
it reads the class of a soft sample rather than taking its softness for another class; and
its accuracy on held-out real images softened until they are as sharp as a sample set is the
yardstick that tells a class error from a blur.

Images are float NCHW in [-1, 1]; every parameter is per image (a tensor of N values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLUR_RADIUS = 3  # taps either side of the Gaussian: 2 sigma at the largest blur


@dataclass(frozen=True)
class Degradation:
    """The largest degradation: the judge's training draws each image's blur, contrast and
    noise uniformly up to these; the softening path (:func:`soften`) ends at the first two."""

    max_blur: float = 1.5  # Gaussian sigma, pixels
    min_contrast: float = 0.4  # deviations from the image's mean scaled by this
    max_noise: float = 0.15  # std of additive Gaussian noise, in [-1, 1] units
    share: float = 0.5  # the share of each training batch that is degraded


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred by a separable Gaussian of its own ``sigma`` (0: unchanged), with
    reflected borders."""
    n, c, h, w = x.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x).clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (taps[None, :] / s) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, taps]
    y = F.pad(x.reshape(1, n * c, h, w), (BLUR_RADIUS, BLUR_RADIUS, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.pad(y, (0, 0, BLUR_RADIUS, BLUR_RADIUS), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def reduce_contrast(x: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Each image's deviations from its own mean scaled by ``contrast`` (1: unchanged)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + contrast.to(x)[:, None, None, None] * (x - mean)


def degrade(
    x: torch.Tensor,
    blur: torch.Tensor,
    contrast: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blur, then reduce the contrast, then add Gaussian noise of std ``noise``; clipped to
    [-1, 1] as an image is."""
    y = reduce_contrast(gaussian_blur(x, blur), contrast)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (y + noise.to(x)[:, None, None, None] * eps).clamp(-1.0, 1.0)


def random_degradation(
    x: torch.Tensor, generator: torch.Generator, spec: Degradation = Degradation()
) -> torch.Tensor:
    """A training batch with ``spec.share`` of its images degraded, each by its own blur,
    contrast and noise drawn uniformly up to ``spec``'s limits; the rest left clean."""
    n = len(x)
    u = torch.rand(4, n, generator=generator, dtype=x.dtype)
    blur = u[1] * spec.max_blur
    contrast = 1.0 - u[2] * (1.0 - spec.min_contrast)
    noise = u[3] * spec.max_noise
    on = (u[0] < spec.share)[:, None, None, None]
    return torch.where(on, degrade(x, blur, contrast, noise, generator), x)


def soften(x: torch.Tensor, strength: float, spec: Degradation = Degradation()) -> torch.Tensor:
    """One point on the softening path: blur ``strength * max_blur`` and contrast
    ``1 - strength * (1 - min_contrast)``, no noise (``strength`` in [0, 1])."""
    n = len(x)
    blur = torch.full((n,), strength * spec.max_blur)
    contrast = torch.full((n,), 1.0 - strength * (1.0 - spec.min_contrast))
    return degrade(x, blur, contrast, torch.zeros(n))


def mean_gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per image: the mean over pixels and channels of the length of the forward-difference
    gradient, in [-1, 1] units per pixel. Blur and lower contrast lower it; noise raises it."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return torch.sqrt(dx**2 + dy**2).mean(dim=(1, 2, 3))
