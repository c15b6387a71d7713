"""The demo's judge (a linear probe) and the two-stage resizes, on inputs with known answers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.probe import LinearProbe, fit_linear_probe, holdout_split
from models.resize import upsample_bilinear_uint8


def test_probe_separates_classes_that_differ_in_a_few_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    feats = rng.normal(size=(200, 64))
    feats[np.arange(200), labels] += 6.0  # class k raises feature k
    train, held = holdout_split(200, 0.25, seed=0)
    assert len(held) == 50 and not set(train) & set(held)
    probe = fit_linear_probe(feats[train], labels[train], num_classes=4)
    assert probe.accuracy(feats[held], labels[held]) >= 0.95
    shuffled = rng.permutation(labels[held])  # wrong labels: near chance
    assert probe.accuracy(feats[held], shuffled) < 0.5
    again = LinearProbe.from_arrays(probe.to_arrays())
    np.testing.assert_array_equal(again.predict(feats), probe.predict(feats))


def test_bilinear_upscale_is_the_upsamplers_own_resize():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    up = upsample_bilinear_uint8(images, 16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    ref = F.interpolate(x, size=(16, 16), mode="bilinear")  # what SuperResModel applies
    ref = ((ref + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert up.shape == (3, 16, 16, 3) and up.dtype == np.uint8
    np.testing.assert_array_equal(up, ref)
    nearest = images.repeat(2, axis=1).repeat(2, axis=2)
    assert np.abs(up.astype(int) - nearest.astype(int)).mean() > 5  # not nearest-neighbour
