"""improved-diffusion's flags read as its own scripts read them: its defaults (which differ
from guided-diffusion's), only its flags, only its image sizes."""

from __future__ import annotations

import pytest

from admflow.config import ConfigError, config_from_dict, load_config
from admflow.flags import preset_from_flags
from tests.test_iddpm_layouts import README_MODELS


def read(name: str):
    script, flags, _ = README_MODELS[name]
    return config_from_dict(
        preset_from_flags(flags, codebase="improved-diffusion", script=script)[0]
    )


def test_defaults_left_out_are_improved_diffusions():
    d = read("imagenet64-hybrid").diffusion
    # script_util.model_and_diffusion_defaults(): both rescalings on; L_hybrid (no use_kl)
    assert (d.steps, d.noise_schedule, d.learn_sigma) == (4000, "cosine", True)
    assert d.rescale_timesteps and d.rescale_learned_sigmas and not d.use_kl
    assert d.schedule_sampler == "uniform"
    m = read("imagenet64-hybrid").model
    assert (m.num_heads, m.num_head_channels, m.attention_resolutions) == (4, -1, [16, 8])
    assert not m.resblock_updown and not m.use_new_attention_order and m.use_scale_shift_norm


def test_the_vlb_models_train_on_the_importance_sampled_bound():
    d = read("cifar10-vlb").diffusion
    assert d.use_kl and d.schedule_sampler == "loss-second-moment" and d.steps == 4000
    assert read("cifar10-vlb").model.dropout == 0.3


def test_flags_given_override_the_defaults():
    d = read("imagenet64-cond").diffusion
    assert not d.rescale_timesteps and not d.rescale_learned_sigmas
    lsun = read("lsun-bedroom-lr2e-5")
    assert (lsun.model.num_heads, lsun.model.use_scale_shift_norm) == (1, False)
    assert lsun.training.lr == 2e-5 and lsun.diffusion.steps == 1000


def test_the_upsampler_is_super_res_trains_at_256_from_64():
    cfg = read("upsampler256")
    assert cfg.upsampler.enabled and cfg.upsampler.small_size == 64
    assert cfg.upsampler.unet.image_size == 256 and cfg.upsampler.unet.num_classes == 1000
    assert cfg.upsampler.diffusion.steps == 4000


@pytest.mark.parametrize("name", sorted(README_MODELS))
def test_presets_equal_the_flags_network_and_diffusion(name):
    ours, preset = read(name), load_config(f"iddpm-{name}")
    if ours.upsampler.enabled:
        assert ours.upsampler == preset.upsampler
    else:
        assert ours.model == preset.model and ours.diffusion == preset.diffusion


def test_the_same_flags_read_as_guided_diffusion_differ():
    # guided-diffusion's script_util defaults rescale_timesteps to False: the dialect matters
    _, flags, _ = README_MODELS["imagenet64-hybrid"]
    gd = config_from_dict(preset_from_flags(flags)[0])
    assert (
        not gd.diffusion.rescale_timesteps and read("imagenet64-hybrid").diffusion.rescale_timesteps
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            "--image_size 64 --num_head_channels 64",
            "unknown improved-diffusion flag --num_head_channels",
        ),
        (
            "--image_size 64 --resblock_updown True",
            "unknown improved-diffusion flag --resblock_updown",
        ),
        ("--image_size 128", "--image_size 128: improved-diffusion builds models at 32, 64, 256"),
        ("--large_size 128 --small_size 32", "--large_size 128: improved-diffusion's upsampler"),
    ],
)
def test_what_improved_diffusion_does_not_take_is_refused(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        preset_from_flags(flags, codebase="improved-diffusion")


def test_nll_script_flags_are_read():
    preset, ignored = preset_from_flags(
        "--image_size 32 --learn_sigma True --data_dir x --model_path m.pt --num_samples 10",
        codebase="improved-diffusion",
    )
    assert set(ignored) == {"data_dir", "model_path"}
    assert config_from_dict(preset).model.image_size == 32
