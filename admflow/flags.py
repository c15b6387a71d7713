"""guided-diffusion command-line flags -> an admflow preset.

Users copy ``MODEL_FLAGS``, ``CLASSIFIER_FLAGS``, ``DIFFUSION_FLAGS`` and ``SAMPLE_FLAGS`` from
the guided-diffusion README (or their own training runs). :func:`preset_from_flags` turns them
into a preset mapping, starting from guided-diffusion's own defaults (which differ from ours,
e.g. ``resblock_updown`` is off there), so the preset builds the network the flags describe.
The result is validated like any preset.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from admflow.config import ConfigError, config_from_dict, default_channel_mult


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {text!r}")


def _ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def _floats(text: str) -> list[float]:
    return [float(p) for p in text.split(",") if p.strip()]


# guided-diffusion's defaults (script_util): the starting point before any flag.
GD_DEFAULTS: dict[str, Any] = {
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
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    "sigma_small": False,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": [32, 16, 8],
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}

PARSERS: dict[str, Callable[[str], Any]] = {
    **{k: type(v) for k, v in GD_DEFAULTS.items() if type(v) in (int, float, str)},
    **{k: _bool for k, v in GD_DEFAULTS.items() if isinstance(v, bool)},
    "attention_resolutions": _ints,
    "classifier_attention_resolutions": _ints,
    "channel_mult": _floats,
    "dropout": float,
    "large_size": int,
    "small_size": int,
    "use_ddim": _bool,
    "classifier_scale": float,
    "batch_size": int,
    "num_samples": int,
    "clip_denoised": _bool,
}
# Paths and run options of the released scripts: not part of a preset.
IGNORED = {"model_path", "classifier_path", "base_samples", "data_dir", "log_dir", "class_index"}
CLASSIFIER_FLAGS = {k for k in PARSERS if k.startswith("classifier_")} - {"classifier_scale"}


def parse_flags(text: str) -> tuple[dict[str, Any], list[str]]:
    """``--name value`` / ``--name=value`` pairs -> typed values; returns (flags, ignored)."""
    tokens = shlex.split(text)
    flags: dict[str, Any] = {}
    ignored: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ConfigError(f"flags: expected --name, got {tok!r}")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ConfigError(f"flags: --{name} has no value")
            value, i = tokens[i + 1], i + 1
        i += 1
        if name in IGNORED:
            ignored.append(name)
            continue
        if name not in PARSERS:
            raise ConfigError(f"flags: unknown guided-diffusion flag --{name}")
        try:
            flags[name] = PARSERS[name](value)
        except ValueError as e:
            raise ConfigError(f"flags: --{name} {value!r}: {e}") from None
    return flags, ignored


def _unet(f: dict[str, Any], image_size: int, channel_mult: list[float] | None) -> dict:
    return {
        "image_size": image_size,
        "model_channels": f["num_channels"],
        "num_res_blocks": f["num_res_blocks"],
        "attention_resolutions": f["attention_resolutions"],
        "channel_mult": channel_mult or None,
        "dropout": f["dropout"],
        "num_classes": 1000 if f["class_cond"] else None,
        "learn_sigma": f["learn_sigma"],
        "use_checkpoint": f["use_checkpoint"],
        "use_fp16": f["use_fp16"],
        "num_heads": f["num_heads"],
        "num_head_channels": f["num_head_channels"],
        "num_heads_upsample": f["num_heads_upsample"],
        "use_scale_shift_norm": f["use_scale_shift_norm"],
        "resblock_updown": f["resblock_updown"],
        "use_new_attention_order": f["use_new_attention_order"],
    }


def _diffusion(f: dict[str, Any]) -> dict:
    return {
        "steps": f["diffusion_steps"],
        "noise_schedule": f["noise_schedule"],
        "learn_sigma": f["learn_sigma"],
        "sigma_small": f["sigma_small"],
        "predict_xstart": f["predict_xstart"],
        "use_kl": f["use_kl"],
        "rescale_learned_sigmas": f["rescale_learned_sigmas"],
        "rescale_timesteps": f["rescale_timesteps"],
    }


def _classifier(f: dict[str, Any], given: set[str]) -> dict:
    return {
        "enabled": bool(given & (CLASSIFIER_FLAGS | {"classifier_scale"})),
        "image_size": f["image_size"],
        "width": f["classifier_width"],
        "depth": f["classifier_depth"],
        "attention_resolutions": f["classifier_attention_resolutions"],
        "use_scale_shift_norm": f["classifier_use_scale_shift_norm"],
        "resblock_updown": f["classifier_resblock_updown"],
        "pool": f["classifier_pool"],
        "use_fp16": f["classifier_use_fp16"],
        "num_classes": 1000,
    }


def _sr_channel_mult(large_size: int) -> list[float]:
    # guided-diffusion's super-resolution model uses 6 levels at 512, not the base model's 7
    return [1, 1, 2, 2, 4, 4] if large_size == 512 else list(default_channel_mult(large_size))


def _sampling(f: dict[str, Any], given: set[str]) -> dict:
    out: dict[str, Any] = {}
    if "timestep_respacing" in given:
        out["timestep_respacing"] = f["timestep_respacing"]
    if "use_ddim" in given:
        out["sampler"] = "ddim" if f["use_ddim"] else "ddpm"
    elif "timestep_respacing" in given:
        out["sampler"] = "ddim" if f["timestep_respacing"].startswith("ddim") else "ddpm"
    if "classifier_scale" in given:
        out["classifier_scales"] = [f["classifier_scale"]]
    for key in ("batch_size", "num_samples", "clip_denoised"):
        if key in given:
            out[key] = f[key]
    return out


def preset_from_flags(text: str, name: str = "from-flags") -> tuple[dict[str, Any], list[str]]:
    """The preset mapping for guided-diffusion flags (validated); returns (preset, ignored)."""
    given, ignored = parse_flags(text)
    f = {**GD_DEFAULTS, **given}
    names = set(given)
    preset: dict[str, Any] = {"name": name, "description": f"from guided-diffusion flags: {text}"}
    if "large_size" in names:
        large, small = f["large_size"], f.get("small_size", 64)
        preset["upsampler"] = {
            "enabled": True,
            "small_size": small,
            "unet": _unet(f, large, f["channel_mult"] or _sr_channel_mult(large)),
            "diffusion": _diffusion(f),
        }
        f["image_size"] = small
    cond = f["class_cond"]
    preset["data"] = {"image_size": f["image_size"], "class_cond": cond}
    preset["data"]["num_classes"] = 1000 if cond else None
    preset["model"] = _unet(f, f["image_size"], f["channel_mult"])
    preset["diffusion"] = _diffusion(f)
    preset["classifier"] = _classifier(f, names)
    sampling = _sampling(f, names)
    if not preset["classifier"]["enabled"]:
        sampling.setdefault("classifier_scales", [0.0])  # nothing to guide with
    if sampling:
        preset["sampling"] = sampling
    config_from_dict(preset, source="guided-diffusion flags")
    return preset, ignored
