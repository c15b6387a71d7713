"""guided-diffusion's and improved-diffusion's command-line flags, script by script, as their
argparsers read them.

Each script of guided-diffusion (``scripts/*.py``) builds its parser from a dict of defaults
(``add_dict_to_argparser``): a flag is only valid for the scripts whose dict holds it, and a flag
left out takes that script's default. These tables are those dicts; :mod:`admflow.flags` maps
them onto admflow's config. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def str2bool(text: str) -> bool:
    """guided-diffusion's ``str2bool``: the same spellings, the same refusal of anything else."""
    low = text.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"boolean value expected, got {text!r}")


def ints(text: str) -> list[int]:
    """Comma-separated integers (guided-diffusion splits these strings and calls int())."""
    return [int(p) for p in text.split(",") if p.strip()]


def floats(text: str) -> list[float]:
    return [float(p) for p in text.split(",") if p.strip()]


# script_util.model_and_diffusion_defaults() without the diffusion half
MODEL = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": [16, 8],
    "channel_mult": [],
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}
# script_util.diffusion_defaults()
DIFFUSION = {
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
# script_util.classifier_defaults() (image_size is shared with the model)
CLASSIFIER = {
    "image_size": 64,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": [32, 16, 8],
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}
# script_util.sr_model_and_diffusion_defaults(): the model dict less what the SR model lacks
SUPER_RES = {
    **{k: v for k, v in MODEL.items() if k not in ("image_size", "channel_mult")},
    "large_size": 256,
    "small_size": 64,
    **DIFFUSION,
}
del SUPER_RES["use_new_attention_order"]

SAMPLE = {"clip_denoised": True, "num_samples": 10000, "batch_size": 16, "use_ddim": False}
TRAIN = {  # image_train.py and super_res_train.py
    "data_dir": "",
    "schedule_sampler": "uniform",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "lr_anneal_steps": 0,
    "batch_size": 1,
    "microbatch": -1,
    "ema_rate": [0.9999],
    "log_interval": 10,
    "save_interval": 10000,
    "resume_checkpoint": "",
    "use_fp16": False,
    "fp16_scale_growth": 1e-3,
}
CLASSIFIER_TRAIN = {
    "data_dir": "",
    "val_data_dir": "",
    "noised": True,
    "iterations": 150000,
    "lr": 3e-4,
    "weight_decay": 0.0,
    "anneal_lr": False,
    "batch_size": 4,
    "microbatch": -1,
    "schedule_sampler": "uniform",
    "resume_checkpoint": "",
    "log_interval": 10,
    "eval_interval": 5,
    "save_interval": 10000,
}

# Every script's flags with its defaults, in the order a flag string is matched to a script:
# the first script that takes every given flag is the one the flags were written for.
SCRIPTS: dict[str, dict[str, Any]] = {
    "image_sample": {**MODEL, **DIFFUSION, **SAMPLE, "model_path": ""},
    "classifier_sample": {
        **MODEL,
        **DIFFUSION,
        **CLASSIFIER,
        **SAMPLE,
        "model_path": "",
        "classifier_path": "",
        "classifier_scale": 1.0,
    },
    "super_res_sample": {**SUPER_RES, **SAMPLE, "model_path": "", "base_samples": ""},
    "image_train": {**MODEL, **DIFFUSION, **TRAIN},
    "super_res_train": {**SUPER_RES, **TRAIN},
    "classifier_train": {**CLASSIFIER, **DIFFUSION, **CLASSIFIER_TRAIN},
}

# improved-diffusion (Improved DDPM, Nichol & Dhariwal 2021), the codebase guided-diffusion grew
# from: the same argparser mechanism over other dicts. Its script_util.model_and_diffusion_
# defaults() has no channel_mult, num_head_channels, resblock_updown, use_new_attention_order or
# model use_fp16 (those are guided-diffusion's additions), has sigma_small, and rescales
# timesteps and learned sigmas by default.
ID_MODEL = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": [16, 8],
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
# sr_model_and_diffusion_defaults(): the model dict less what sr_create_model_and_diffusion lacks
ID_SUPER_RES = {
    **{k: v for k, v in ID_MODEL.items() if k not in ("image_size", "sigma_small")},
    "large_size": 256,
    "small_size": 64,
}
ID_NLL = {"data_dir": "", "clip_denoised": True, "num_samples": 1000, "batch_size": 1}
ID_SCRIPTS: dict[str, dict[str, Any]] = {
    "image_sample": {**ID_MODEL, **SAMPLE, "model_path": ""},
    "image_nll": {**ID_MODEL, **ID_NLL, "model_path": ""},
    "super_res_sample": {**ID_SUPER_RES, **SAMPLE, "model_path": "", "base_samples": ""},
    "image_train": {**ID_MODEL, **TRAIN},
    "super_res_train": {**ID_SUPER_RES, **TRAIN},
}
ID_NETWORK = {**ID_MODEL, **ID_SUPER_RES}
# What improved-diffusion's create_model hard-wires where guided-diffusion has a flag: the
# per-size channel multipliers, heads counted by num_heads, attention heads split the legacy way
# (each head's q, k, v adjacent), ResBlocks that never resample (separate Up/Downsample layers);
# and no classifier. The model runs in fp32 unless training with --use_fp16.
ID_HARDWIRED = {
    "channel_mult": [],
    "num_head_channels": -1,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "use_fp16": False,
    **CLASSIFIER,
}
# improved-diffusion's create_model / sr_create_model accept only these sizes
ID_IMAGE_SIZES = (32, 64, 256)
ID_LARGE_SIZES = (64, 256)

CODEBASES = {"guided-diffusion": SCRIPTS, "improved-diffusion": ID_SCRIPTS}
SAMPLING_SCRIPTS = ("image_sample", "classifier_sample", "super_res_sample")
TRAINING_SCRIPTS = ("image_train", "super_res_train", "classifier_train")
# The flags that describe networks and diffusions only: a string of these alone is read with
# the defaults every script shares, and sets no script's run options.
NETWORK = {**MODEL, **DIFFUSION, **CLASSIFIER, **SUPER_RES}

_LIST_PARSERS: dict[str, Callable[[str], Any]] = {
    "attention_resolutions": ints,
    "classifier_attention_resolutions": ints,
    "channel_mult": ints,
    "ema_rate": floats,
}


def parser_for(name: str) -> Callable[[str], Any]:
    """How guided-diffusion converts the flag's text: by the type of its default."""
    if name in _LIST_PARSERS:
        return _LIST_PARSERS[name]
    default = next(s[name] for c in CODEBASES.values() for s in c.values() if name in s)
    if isinstance(default, bool):
        return str2bool
    return type(default)


ALL_FLAGS = {name for flags in SCRIPTS.values() for name in flags}
ID_ALL_FLAGS = {name for flags in ID_SCRIPTS.values() for name in flags}

# Paths and run plumbing: admflow takes these on its own command line (or has its own way).
IGNORED = {
    "model_path": "a checkpoint path: admflow's commands (sample, paper run) take it",
    "classifier_path": "a checkpoint path: admflow's commands (sample, paper run) take it",
    "base_samples": "admflow's two-stage sampling draws the base samples itself",
    "data_dir": "the data: set data.source (or shard it with `admflow shard`)",
    "val_data_dir": "admflow holds out every 10th row of the training data instead",
    "resume_checkpoint": "admflow resumes a run when its run name is reused",
}
# Settings admflow does not have: refused whatever their value.
REJECTED = {
    "eval_interval": "admflow scores the classifier's held-out split at every checkpoint, "
    "not every n steps",
}
