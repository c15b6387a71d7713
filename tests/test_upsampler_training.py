"""The upsampler's training on random crops (training.upsampler_crop) and its own sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from admflow.config import ConfigError, load_config
from models.resize import downsample_area


def test_crops_are_windows_on_the_upscale_grid():
    from tasks.training.stream import augment

    n, side = 32, 16
    # every pixel holds its own (row, column): a window shows where it was cut
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    images = np.broadcast_to(np.stack([rows, cols, rows * 0]).astype(np.float32), (200, 3, n, n))
    out = augment(images.copy(), np.random.default_rng(0), flip=False, crop=side, crop_stride=2)
    assert out.shape == (200, 3, side, side)
    tops, lefts = out[:, 0, 0, 0], out[:, 1, 0, 0]
    assert set(np.unique(tops)) == set(range(0, n - side + 1, 2)) == set(np.unique(lefts))
    for img, top, left in zip(out, tops.astype(int), lefts.astype(int), strict=True):
        assert (img[:2] == images[0, :2, top : top + side, left : left + side]).all()
    # on that grid a window's low-resolution input is the window of the whole image's
    x = torch.randn(1, 3, n, n)
    top, left = int(tops[0]), int(lefts[0])
    window = x[..., top : top + side, left : left + side]
    small = downsample_area(x, n // 2)[
        ..., top // 2 : (top + side) // 2, left // 2 : (left + side) // 2
    ]
    torch.testing.assert_close(downsample_area(window, side // 2), small)


def test_upsampler_job_trains_on_crops_with_their_low_resolution_inputs():
    from models.training_losses import Batch
    from tasks.training.jobs import make_job

    whole = make_job("upsampler", load_config("tiny", ["training.upsampler_crop=null"]))
    assert whole.crop is None and whole.loss.small_size == 16
    job = make_job("upsampler", load_config("tiny", ["training.upsampler_crop=16"]))
    assert (job.crop, job.crop_stride, job.loss.small_size, job.image_size) == (16, 2, 8, 32)
    seen = {}

    def net(x, t, low_res, y):  # records what the loss feeds the network
        seen["x"], seen["low_res"] = x.shape, low_res.shape
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4), torch.tensor([0, 9, 99, 999]))
    terms = job.loss(net, batch, g)
    assert seen["x"][-2:] == (16, 16) and seen["low_res"] == (4, 3, 8, 8)
    assert terms["loss"].shape == (4,)


@pytest.mark.parametrize("crop", [40, 15, 6])
def test_a_crop_the_upsampler_cannot_take_is_refused(crop):
    # 40: larger than the 32px output; 15: not whole low-resolution pixels; 6 with three levels
    levels = ["upsampler.unet.channel_mult=[1, 2, 2]"] if crop == 6 else []
    with pytest.raises(ConfigError, match="training.upsampler_crop"):
        load_config("tiny", [f"training.upsampler_crop={crop}", *levels])


def test_the_upsampler_samples_with_its_own_sampler(tmp_path, monkeypatch):
    from tasks.sampling import build
    from tasks.sampling.weights import ResolvedCheckpoint

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    cfg = load_config("tiny", ["sampling.sampler=ddpm", "sampling.upsample_sampler=ddim"])
    base = {"complete": True, "num_samples": 4, "fingerprint": "base"}
    monkeypatch.setattr(build.sample_io, "read_manifest", lambda uri: base)
    monkeypatch.setattr(
        build, "resolve_checkpoint", lambda *a, **k: ResolvedCheckpoint("up", str(weights), None, 9)
    )
    spec = build.build_upsample_spec(cfg, "base", "up")
    assert (spec.sampler, spec.respacing) == ("ddim", cfg.sampling.upsample_respacing)
    unset = load_config("tiny", ["sampling.sampler=ddpm", "sampling.upsample_sampler=null"])
    assert build.build_upsample_spec(unset, "base", "up").sampler == "ddpm"  # the base's
    with pytest.raises(ConfigError, match="upsample_sampler"):
        load_config("tiny", ["sampling.upsample_sampler=euler"])
