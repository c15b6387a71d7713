"""Improved DDPM's released checkpoints (the improved-diffusion README's eight models) load
strictly: for each, the network admflow builds — from its preset and from `config from-flags`
on the README's own flag strings — has exactly the state-dict keys and shapes that
improved-diffusion's code builds. Those are data (tests/data/iddpm_layouts.json, made once from
improved-diffusion's source by tests/data/make_iddpm_layouts.py); networks here are built on the
meta device, so no weights are allocated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from admflow.config import config_from_dict, load_config
from admflow.flags import preset_from_flags
from models.build import build_unet, build_upsampler

DATA = Path(__file__).resolve().parent / "data" / "iddpm_layouts.json"

# name: (improved-diffusion script, "$MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS" verbatim from
# its README, checkpoint file). The preset of each is admflow/presets/iddpm-<name>.yaml.
README_MODELS = {
    "imagenet64-hybrid": (
        "image_train",
        "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
        "--diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128",
        "imagenet64_uncond_100M_1500K.pt",
    ),
    "cifar10-hybrid": (
        "image_train",
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128",
        "cifar10_uncond_50M_500K.pt",
    ),
    "imagenet64-cond": (
        "image_train",
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
        "--rescale_timesteps False --lr 3e-4 --batch_size 2048",
        "imagenet64_cond_270M_250K.pt",
    ),
    "upsampler256": (
        "super_res_train",
        "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False "
        "--rescale_timesteps False --lr 3e-4 --batch_size 256",
        "upsample_cond_500K.pt",
    ),
    "lsun-bedroom-lr1e-4": (
        "image_train",
        "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
        "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
        "--lr 1e-4 --batch_size 128",
        "lsun_uncond_100M_1200K_bs128.pt",
    ),
    "lsun-bedroom-lr2e-5": (
        "image_train",
        "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
        "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
        "--use_scale_shift_norm False --lr 2e-5 --batch_size 128",
        "lsun_uncond_100M_2400K_bs64.pt",
    ),
    "imagenet64-vlb": (
        "image_train",
        "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
        "--diffusion_steps 4000 --noise_schedule cosine --use_kl True "
        "--lr 1e-4 --batch_size 128 --schedule_sampler loss-second-moment",
        "imagenet64_uncond_vlb_100M_1500K.pt",
    ),
    "cifar10-vlb": (
        "image_train",
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 4000 --noise_schedule cosine --use_kl True "
        "--lr 1e-4 --batch_size 128 --schedule_sampler loss-second-moment",
        "cifar10_uncond_vlb_50M_500K.pt",
    ),
}


def _expected() -> tuple[dict, dict]:
    data = json.loads(DATA.read_text())
    return data["models"], data["layouts"]


def _layout(net: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def _network_of(cfg) -> torch.nn.Module:
    """The network a checkpoint of this config is loaded into (the upsampler's for one)."""
    if cfg.upsampler.enabled:
        return build_upsampler(cfg.upsampler, device="meta")
    return build_unet(cfg.model, device="meta")


def _same(ours: dict[str, list[int]], theirs: dict[str, list[int]]) -> None:
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not wrong, f"shapes differ (ours, theirs): {dict(list(wrong.items())[:5])}"


def test_the_fixture_holds_the_eight_released_models_with_their_sizes():
    models, layouts = _expected()
    assert set(models) == set(README_MODELS)
    # the README names the models by their size: 100M, 50M, 270M, 280M parameters
    millions = {name: round(m["params"] / 1e6) for name, m in models.items()}
    assert millions == {
        "imagenet64-hybrid": 121, "imagenet64-vlb": 121, "cifar10-hybrid": 53,
        "cifar10-vlb": 53, "imagenet64-cond": 273, "upsampler256": 280,
        "lsun-bedroom-lr1e-4": 114, "lsun-bedroom-lr2e-5": 114,
    }  # fmt: skip
    for m in models.values():
        assert len(layouts[m["layout"]]) == m["keys"]


@pytest.mark.parametrize("name", sorted(README_MODELS))
def test_config_from_flags_builds_improved_diffusions_layout(name):
    script, flags, _ = README_MODELS[name]
    preset, _ = preset_from_flags(flags, codebase="improved-diffusion", script=script)
    models, layouts = _expected()
    _same(_layout(_network_of(config_from_dict(preset))), layouts[models[name]["layout"]])


@pytest.mark.parametrize("name", sorted(README_MODELS))
def test_preset_builds_improved_diffusions_layout(name):
    models, layouts = _expected()
    _same(_layout(_network_of(load_config(f"iddpm-{name}"))), layouts[models[name]["layout"]])
