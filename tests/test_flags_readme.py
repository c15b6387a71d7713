"""`admflow config from-flags` on the guided-diffusion README's flag strings, verbatim: each
becomes a config whose every field is what guided-diffusion's script would use. Network
sections are compared with the released presets (whose networks test_flags.py checks against
the checkpoints' keys); run settings with guided-diffusion's script defaults written out here."""

from __future__ import annotations

import pytest

from admflow.config import AdmConfig, ConfigError, config_from_dict, load_config
from admflow.flags import preset_from_flags

SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 250"
LSUN_SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 1000"
M64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
    "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order "
    "True --use_fp16 True --use_scale_shift_norm True"
)
M128 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
M256 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
M256U = M256.replace("--class_cond True", "--class_cond False")
M512 = M256.replace("--image_size 256", "--image_size 512").replace(
    "--use_fp16 True", "--use_fp16 False"
)
UP256 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256  "
    "--small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
UP512 = (
    "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
    "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True"
)
LSUN = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True"
)
LSUN_NODROPOUT = LSUN.replace("--dropout 0.1", "--dropout 0.0")
CLF_TRAIN_FLAGS = (
    "--iterations 300000 --anneal_lr True --batch_size 256 --lr 3e-4 --save_interval 10000 "
    "--weight_decay 0.05"
)
CLF_FLAGS = (
    "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
    "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
    "--classifier_use_scale_shift_norm True"
)
DDIM_MODEL_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond True --image_size 128 --learn_sigma True "
    "--num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True"
)
DDIM_CLF_FLAGS = CLF_FLAGS + " --classifier_scale 1.0 --classifier_use_fp16 True"
DDIM_SAMPLE_FLAGS = "--batch_size 4 --num_samples 50000 --timestep_respacing ddim25 --use_ddim True"


def read(text: str, script: str | None = None) -> AdmConfig:
    return config_from_dict(preset_from_flags(text, script=script)[0])


def same_network(ours: AdmConfig, released: AdmConfig, section: str = "model") -> None:
    a, b = getattr(ours, section), getattr(released, section)
    assert a.unet_kwargs() == b.unet_kwargs() and a.use_fp16 == b.use_fp16


def guided(model: str, scale: float, extra: str = "") -> str:
    return (
        f"{model} --classifier_scale {scale} --classifier_path models/c.pt {extra}"
        f"--model_path models/d.pt {SAMPLE_FLAGS}"
    )


@pytest.mark.parametrize(
    "text, preset, classifier, scale",
    [
        (guided(M64, 1.0, "--classifier_depth 4 "), "imagenet64", "classifier64", 1.0),
        (guided(M128, 0.5), "imagenet128", "classifier128", 0.5),
        (guided(M256, 1.0), "imagenet256", "classifier256", 1.0),
        (guided(M256U, 10.0), "imagenet256-uncond", "classifier256", 10.0),
        (guided(M512, 4.0), "imagenet512", "classifier512", 4.0),
    ],
)
def test_readme_classifier_sample_commands(text, preset, classifier, scale):
    cfg = read(text)
    same_network(cfg, load_config(preset))
    assert cfg.diffusion == load_config(preset).diffusion
    released = load_config(classifier).classifier
    # the README's commands leave --classifier_use_fp16 at classifier_sample.py's False
    assert cfg.classifier == released.model_copy(update={"use_fp16": False})
    s = cfg.sampling
    assert (s.sampler, s.timestep_respacing, s.classifier_scales) == ("ddpm", "250", [scale])
    assert (s.num_samples, s.batch_size, s.clip_denoised, s.guidance) == (
        100,
        4,
        True,
        "classifier",
    )


@pytest.mark.parametrize(
    "text, preset",
    [
        (f"{UP256} --model_path models/u.pt --base_samples 64_samples.npz {SAMPLE_FLAGS}",
         "upsampler64-256"),
        (f"{UP512} --model_path models/u.pt {SAMPLE_FLAGS} --base_samples 128_samples.npz",
         "upsampler128-512"),
    ],
)  # fmt: skip
def test_readme_super_res_sample_commands(text, preset):
    cfg = read(text)
    released = load_config(preset).upsampler
    assert cfg.upsampler.unet.unet_kwargs() == released.unet.unet_kwargs()
    assert cfg.upsampler.diffusion == released.diffusion
    assert cfg.upsampler.small_size == released.small_size
    s = cfg.sampling
    assert (s.sampler, s.timestep_respacing, s.upsample_respacing) == ("ddpm", "250", "250")
    assert (s.num_samples, s.batch_size, s.classifier_scales) == (100, 4, [0.0])
    assert not cfg.classifier.enabled  # super_res_sample.py has no classifier


@pytest.mark.parametrize(
    "model, preset", [(LSUN, "lsun-bedroom"), (LSUN_NODROPOUT, "lsun-horse-nodropout")]
)
def test_readme_lsun_image_sample_commands(model, preset):
    cfg = read(f"{model} --model_path models/lsun.pt {LSUN_SAMPLE_FLAGS}")
    same_network(cfg, load_config(preset))
    assert cfg.model.dropout == load_config(preset).model.dropout
    assert cfg.diffusion == load_config(preset).diffusion
    s = cfg.sampling
    assert (s.sampler, s.timestep_respacing, s.classifier_scales) == ("ddpm", "1000", [0.0])
    assert not cfg.classifier.enabled


def test_readme_classifier_training_flags():
    cfg = read(f"--data_dir path/to/imagenet {CLF_TRAIN_FLAGS} {CLF_FLAGS}")
    t = cfg.training
    assert (t.classifier_steps, t.classifier_lr, t.classifier_weight_decay) == (300000, 3e-4, 0.05)
    assert (t.batch_size, t.microbatch, t.checkpoint_every, t.log_every) == (256, -1, 10000, 10)
    assert t.classifier_noised and t.mixed_precision == "no"  # classifier_use_fp16 False
    assert cfg.classifier == load_config("classifier128").classifier.model_copy(
        update={"use_fp16": False}
    )
    assert cfg.data.class_cond and cfg.data.image_size == 128
    # classifier_train.py's diffusion is diffusion_defaults(): 1000 linear steps, fixed sigma
    d = cfg.diffusion
    assert (d.steps, d.noise_schedule, d.learn_sigma, d.schedule_sampler) == (
        1000,
        "linear",
        False,
        "uniform",
    )


def test_readme_ddim25_classifier_sample_block():
    cfg = read(f"{DDIM_MODEL_FLAGS} {DDIM_CLF_FLAGS} {DDIM_SAMPLE_FLAGS}")
    same_network(cfg, load_config("imagenet128"))
    assert cfg.diffusion == load_config("imagenet128").diffusion  # 1000 linear: the defaults
    assert cfg.classifier == load_config("classifier128").classifier  # use_fp16 True here
    s = cfg.sampling
    assert (s.sampler, s.timestep_respacing, s.classifier_scales) == ("ddim", "ddim25", [1.0])
    assert (s.num_samples, s.batch_size) == (50000, 4)


@pytest.mark.parametrize("model", [M64, M128, M256, M256U, M512, LSUN, UP256, UP512])
def test_no_respacing_samples_every_step_with_ddpm(model):
    s = read(model).sampling
    assert (s.sampler, s.timestep_respacing) == ("ddpm", "")
    s = read(f"{model} --model_path m.pt --batch_size 2").sampling  # a sampling script
    assert (s.sampler, s.timestep_respacing, s.num_samples) == ("ddpm", "", 10000)
    assert read(f"{model} --use_ddim True --num_samples 8").sampling.sampler == "ddim"


def test_sample_flags_alone_take_image_samples_defaults():
    cfg = read(SAMPLE_FLAGS)
    s = cfg.sampling
    assert (s.sampler, s.timestep_respacing, s.num_samples, s.batch_size) == ("ddpm", "250", 100, 4)
    assert not cfg.classifier.enabled and s.classifier_scales == [0.0]


def test_classifier_sample_default_scale_is_one():
    s = read(f"{M128} --classifier_path c.pt").sampling
    assert s.classifier_scales == [1.0] and (s.num_samples, s.batch_size) == (10000, 16)


TRAIN_FLAGS = (
    "--lr 2e-5 --batch_size 64 --microbatch 16 --ema_rate 0.9999,0.999 --lr_anneal_steps 0 "
    "--weight_decay 0.01 --save_interval 5000 --log_interval 50 --resume_checkpoint r.pt "
    "--use_fp16 True --fp16_scale_growth 1e-3 --schedule_sampler loss-second-moment"
)


def test_image_train_flags_become_training_settings():
    preset, ignored = preset_from_flags(f"{M256} --data_dir d {TRAIN_FLAGS}")
    cfg = config_from_dict(preset)
    t = cfg.training
    assert (t.lr, t.batch_size, t.microbatch, t.ema_rate) == (2e-5, 64, 16, [0.9999, 0.999])
    assert (t.weight_decay, t.checkpoint_every, t.log_every) == (0.01, 5000, 50)
    assert t.mixed_precision == "fp16" and cfg.model.use_fp16
    assert cfg.diffusion.schedule_sampler == "loss-second-moment"
    assert sorted(ignored) == ["data_dir", "resume_checkpoint"]
    # image_train.py's defaults where a flag is left out: batch 1, lr 1e-4, fp32
    t = read(M256.replace("--use_fp16 True ", "") + " --lr_anneal_steps 0").training
    assert (t.lr, t.batch_size, t.ema_rate, t.mixed_precision) == (1e-4, 1, [0.9999], "no")


def test_super_res_train_flags():
    cfg = read(f"{UP256} --lr 1e-4 --batch_size 256 --schedule_sampler loss-second-moment")
    assert cfg.training.batch_size == 256 and cfg.training.mixed_precision == "fp16"
    assert cfg.upsampler.diffusion.schedule_sampler == "loss-second-moment"


@pytest.mark.parametrize(
    "text, needle",
    [
        (f"{M256} --lr_anneal_steps 1000", "admflow keeps the diffusion lr constant"),
        (f"--iterations 10 {CLF_FLAGS}", "--anneal_lr False"),
        (f"--iterations 10 --anneal_lr True --eval_interval 5 {CLF_FLAGS}", "--eval_interval"),
        (f"{M256} --lr 1e-4 --fp16_scale_growth 1e-2", "--fp16_scale_growth"),
        (
            f"--iterations 10 --anneal_lr True --schedule_sampler loss-second-moment {CLF_FLAGS}",
            "timesteps uniformly",
        ),
        ("--sigma_small True", "unknown guided-diffusion flag --sigma_small"),
        (f"{M256} --num_samples 4 --lr 1e-4", "no guided-diffusion script takes all"),
        (f"{UP256} --channel_mult 1,1,2,2,4,4", "no guided-diffusion script takes all"),
        ("--channel_mult 0.5,1,1,2,2,4,4 --image_size 512", "--channel_mult"),
    ],
)
def test_what_admflow_cannot_follow_is_refused_with_the_reason(text, needle):
    with pytest.raises(ConfigError, match=needle):
        preset_from_flags(text)


def test_explicit_script_checks_its_flags():
    with pytest.raises(ConfigError, match="image_sample.py has no flag --classifier_scale"):
        preset_from_flags(f"{M128} --classifier_scale 1.0", script="image_sample")
    cfg = read(M128, script="classifier_sample")
    assert cfg.classifier.enabled and cfg.sampling.classifier_scales == [1.0]


def test_guided_diffusion_spellings_of_booleans():
    assert read("--class_cond t --image_size 64").model.num_classes == 1000
    assert read("--class_cond n --image_size 64").model.num_classes is None


def test_cli_names_the_script_flag_and_ignored_paths(capsys):
    from admflow.cli import main

    assert main(["config", "from-flags", guided(M128, 0.5), "--script", "classifier_sample"]) == 0
    err = capsys.readouterr().err
    assert "ignored --model_path: a checkpoint path" in err
