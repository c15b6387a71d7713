"""`admflow config from-flags`: the guided-diffusion README's flag strings become presets whose
networks have exactly the state-dict keys and shapes of the released checkpoints, as built
by our released presets (the strict loader's check)."""

from __future__ import annotations

import pytest
import yaml

from admflow.config import ConfigError, load_config
from admflow.flags import parse_flags, preset_from_flags
from models.build import build_classifier, build_unet, build_upsampler
from models.checkpoints import compare_state_dict

ATTN = "--attention_resolutions 32,16,8"
TAIL = "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
COMMON = f"{ATTN} --diffusion_steps 1000 --learn_sigma True"
M64 = (
    f"{ATTN} --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
    f"--num_res_blocks 3 --use_new_attention_order True {TAIL}"
)
M128 = (
    f"{COMMON} --class_cond True --image_size 128 --noise_schedule linear --num_channels 256 "
    f"--num_heads 4 --num_res_blocks 2 {TAIL}"
)
M256 = (
    f"{COMMON} --image_size 256 --noise_schedule linear --num_channels 256 "
    f"--num_head_channels 64 --num_res_blocks 2 {TAIL}"
)
M512 = M256.replace("--image_size 256", "--image_size 512").replace(
    "--use_fp16 True", "--use_fp16 False"
)
UP256 = (
    f"{COMMON} --class_cond True --large_size 256 --small_size 64 --noise_schedule linear "
    f"--num_channels 192 --num_heads 4 --num_res_blocks 2 {TAIL}"
)
UP512 = (
    "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
    "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
    f"--num_head_channels 64 --num_res_blocks 2 {TAIL}"
)
LSUN = M256.replace("--image_size", "--class_cond False --dropout 0.1 --image_size")
CLF = (
    "--classifier_attention_resolutions 32,16,8 --classifier_width 128 --classifier_pool "
    "attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True "
    "--classifier_use_fp16 True"
)

MODELS = {
    "imagenet64": M64,
    "imagenet128": M128,
    "imagenet256": M256 + " --class_cond True",
    "imagenet256-uncond": M256 + " --class_cond False",
    "imagenet512": M512 + " --class_cond True",
    "lsun-bedroom": LSUN,
    "lsun-cat": LSUN,
    "lsun-horse": LSUN,
}
CLASSIFIERS = {
    "classifier64": f"--image_size 64 --classifier_depth 4 {CLF}",
    "classifier128": f"--image_size 128 --classifier_depth 2 {CLF}",
    "classifier256": f"--image_size 256 --classifier_depth 2 {CLF}",
    "classifier512": f"--image_size 512 --classifier_depth 2 {CLF}",
}
UPSAMPLERS = {"upsampler64-256": UP256, "upsampler128-512": UP512}


def assert_same_keys(ours, released) -> None:
    missing, unexpected, mismatched = compare_state_dict(released.state_dict(), ours)
    assert (missing, unexpected, mismatched) == ([], [], [])
    assert len(ours.state_dict()) == len(released.state_dict()) > 50


def from_flags(text: str):
    from admflow.config import config_from_dict

    preset, _ = preset_from_flags(text)
    return config_from_dict(yaml.safe_load(yaml.safe_dump(preset)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_flags_build_the_released_network(name):
    cfg = from_flags(MODELS[name])
    assert_same_keys(build_unet(cfg.model, "meta"), build_unet(load_config(name).model, "meta"))
    assert cfg.diffusion.noise_schedule == load_config(name).diffusion.noise_schedule


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_flags_build_the_released_classifier(name):
    cfg = from_flags(CLASSIFIERS[name])
    released = build_classifier(load_config(name).classifier, "meta")
    assert_same_keys(build_classifier(cfg.classifier, "meta"), released)
    assert cfg.classifier.enabled


@pytest.mark.parametrize("name", sorted(UPSAMPLERS))
def test_upsampler_flags_build_the_released_upsampler(name):
    cfg = from_flags(UPSAMPLERS[name])
    released = load_config(name).upsampler
    assert_same_keys(build_upsampler(cfg.upsampler, "meta"), build_upsampler(released, "meta"))
    assert cfg.upsampler.small_size == released.small_size


def test_defaults_are_guided_diffusions_not_ours():
    # Without the flag guided-diffusion has no BigGAN up/down blocks and a fixed sigma.
    cfg = from_flags("--image_size 64 --num_channels 64")
    assert not cfg.model.resblock_updown and not cfg.model.learn_sigma
    assert cfg.model.num_classes is None and not cfg.classifier.enabled
    assert cfg.model.attention_resolutions == [16, 8]


def test_sample_flags_become_sampling_settings():
    text = f"{M128} --classifier_scale 1.0 --timestep_respacing ddim25 --use_ddim True"
    cfg = from_flags(text + " --batch_size 4 --num_samples 100 --model_path m.pt")
    s = cfg.sampling
    assert (s.sampler, s.timestep_respacing, s.classifier_scales) == ("ddim", "ddim25", [1.0])
    assert (s.batch_size, s.num_samples) == (4, 100)
    assert parse_flags("--model_path m.pt --image_size=32")[1] == ["model_path"]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("--image_sise 64", "--image_sise"),
        ("--class_cond maybe", "--class_cond"),
        ("--image_size", "no value"),
        ("image_size 64", "expected --name"),
    ],
)
def test_bad_flags_name_the_flag(text, needle):
    with pytest.raises(ConfigError, match=needle):
        preset_from_flags(text)


def test_cli_prints_a_preset_that_loads(tmp_path, capsys):
    from admflow.cli import main

    assert main(["config", "from-flags", M64, "--name", "mine64"]) == 0
    path = tmp_path / "mine64.yaml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(str(path))
    assert cfg.name == "mine64" and cfg.model == load_config("imagenet64").model
