"""Degraded copies for the judge (blur, contrast, noise), the sharpness statistic, and the
softening ladder that matches real images to a sample set's softness; known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.degrade import (
    Degradation,
    degrade,
    gaussian_blur,
    mean_gradient_magnitude,
    random_degradation,
    reduce_contrast,
    soften,
)
from models.judge import match_softness


def test_blur_spreads_a_point_into_the_sampled_gaussian_and_sigma_zero_is_the_identity():
    x = torch.zeros(2, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(y[0], x[0])
    taps = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    k = taps / taps.sum()
    torch.testing.assert_close(y[1, 0, 1:8, 1:8], k[:, None] * k[None, :])
    assert math.isclose(float(y[1].sum()), 1.0, rel_tol=1e-5)  # mass kept


def test_contrast_keeps_each_images_mean_and_scales_its_deviations():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    y = reduce_contrast(x, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[1].std(), 0.5 * x[1].std())
    torch.testing.assert_close(y[2], x[2].mean().expand(3, 8, 8))


def test_noise_has_its_std_and_the_result_stays_an_image():
    x = torch.zeros(1, 3, 64, 64)
    gen = torch.Generator().manual_seed(0)
    y = degrade(x, torch.zeros(1), torch.ones(1), torch.tensor([0.1]), gen)
    assert abs(float(y.std()) - 0.1) < 0.005
    bright = degrade(torch.ones(1, 3, 8, 8), torch.zeros(1), torch.ones(1), torch.ones(1), gen)
    assert float(bright.max()) <= 1.0 and float(bright.min()) >= -1.0


def test_gradient_magnitude_of_a_ramp_is_its_slope():
    ramp = torch.linspace(-0.7, 0.7, 8)  # slope 0.2 per pixel along x
    x = ramp.expand(2, 3, 8, 8).clone()
    x[1] = x[1].transpose(1, 2).clone()  # the same ramp along y
    torch.testing.assert_close(mean_gradient_magnitude(x), torch.tensor([0.2, 0.2]))


def test_random_degradation_degrades_its_share_deterministically():
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    same = random_degradation(x, torch.Generator().manual_seed(1), Degradation(share=0.0))
    assert torch.equal(same, x)
    spec = Degradation(share=0.5)
    a = random_degradation(x, torch.Generator().manual_seed(1), spec)
    b = random_degradation(x, torch.Generator().manual_seed(1), spec)
    torch.testing.assert_close(a, b)
    changed = (a != x).flatten(1).any(1)
    assert 20 <= int(changed.sum()) <= 44  # about half of 64


def test_softening_lowers_sharpness_monotonically():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 3, 16, 16, generator=gen) > 0.5).float() * 2 - 1
    sharp = [float(mean_gradient_magnitude(soften(x, s)).mean()) for s in np.linspace(0, 1, 6)]
    assert all(a > b for a, b in zip(sharp, sharp[1:], strict=False)), sharp
    torch.testing.assert_close(soften(x, 0.0), x)


LADDER = [
    {"strength": 0.0, "sharpness": 0.30, "accuracy": 1.0},
    {"strength": 0.5, "sharpness": 0.20, "accuracy": 0.9},
    {"strength": 1.0, "sharpness": 0.10, "accuracy": 0.5},
]


def test_match_softness_interpolates_between_the_rungs_around_the_sharpness():
    m = match_softness(LADDER, 0.15, Degradation(max_blur=2.0, min_contrast=0.5))
    assert m["strength"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(0.7)
    assert m["blur"] == pytest.approx(1.5) and m["contrast"] == pytest.approx(0.625)
    assert m["clipped"] == "" and m["real_sharpness"] == 0.30


def test_match_softness_says_when_a_set_lies_outside_the_ladder():
    sharper = match_softness(LADDER, 0.35)
    assert sharper["strength"] == 0.0 and sharper["accuracy"] == 1.0
    assert sharper["clipped"] == "sharper than the real images"
    softer = match_softness(LADDER, 0.05)
    assert softer["strength"] == 1.0 and softer["clipped"] == "softer than the ladder"
