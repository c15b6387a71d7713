"""admflow's networks compute improved-diffusion's function, not just its layout: small
networks of the README's kinds (4 heads of legacy-order attention with scale-shift norm; 1 head
without it; the class-conditional upsampler), with seeded random weights everywhere, give the
outputs improved-diffusion's own UNet gave on the same weights and inputs
(tests/data/iddpm_outputs.json, made once by tests/data/make_iddpm_outputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from admflow.config import config_from_dict
from admflow.flags import preset_from_flags
from models.build import build_unet, build_upsampler

DATA = Path(__file__).resolve().parent / "data" / "iddpm_outputs.json"

# name: (improved-diffusion script, flags) — the README's layouts, narrowed to run in seconds
CASES = {
    "cifar10-like": (
        "image_train",
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True "
        "--class_cond True --attention_resolutions 16,8",
    ),
    "lsun-like": (
        "image_train",
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16",
    ),
    "upsampler-like": (
        "super_res_train",
        "--large_size 64 --small_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True "
        "--class_cond True --attention_resolutions 16",
    ),
}


def our_network(name: str) -> torch.nn.Module:
    script, flags = CASES[name]
    cfg = config_from_dict(
        preset_from_flags(flags, codebase="improved-diffusion", script=script)[0]
    )
    torch.manual_seed(0)
    net = build_upsampler(cfg.upsampler) if cfg.upsampler.enabled else build_unet(cfg.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised layers too, so every path shows in the output
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(2)
    size = 64 if name == "upsampler-like" else 32
    x = torch.randn(2, 3, size, size, generator=gen)
    t = torch.tensor([3, 917])
    kwargs: dict = {}
    if name != "lsun-like":
        kwargs["y"] = torch.tensor([5, 998])
    if name == "upsampler-like":
        kwargs["low_res"] = torch.randn(2, 3, 32, 32, generator=gen)
    return x, t, kwargs


@pytest.mark.parametrize("name", sorted(CASES))
def test_our_network_computes_improved_diffusions_outputs(name):
    want = torch.tensor(json.loads(DATA.read_text())[name], dtype=torch.float64)
    x, t, kwargs = inputs(name)
    with torch.no_grad():
        got = our_network(name)(x, t, **kwargs)[:, :, ::8, ::8].double().flatten()
    assert got.shape == want.shape and want.abs().mean() > 0.01  # a real signal
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
