"""guided-diffusion command-line flags -> an admflow preset.

Users copy ``MODEL_FLAGS``, ``CLASSIFIER_FLAGS``, ``DIFFUSION_FLAGS``, ``SAMPLE_FLAGS`` and
``TRAIN_FLAGS`` from the guided-diffusion README (or their own runs). :func:`preset_from_flags`
reads them as the guided-diffusion script they were written for reads them
(:mod:`admflow.gd_scripts`): only that script's flags are valid, and every flag left out takes
that script's default, never admflow's (e.g. no ``--timestep_respacing`` samples every diffusion
step with DDPM, as guided-diffusion does). A flag admflow has no setting for is refused with the
reason; a path is ignored (admflow's commands take paths themselves). The result is validated
like any preset.

``codebase="improved-diffusion"`` reads the flags of Improved DDPM's README the same way, as
improved-diffusion's scripts read them: their own flags and defaults (timesteps and learned
sigmas rescaled unless turned off, no head width, resampling ResBlocks or new attention order),
its image sizes only.
"""

from __future__ import annotations

import shlex
from typing import Any

from admflow import gd_scripts as gd
from admflow.config import ConfigError, config_from_dict, default_channel_mult

GD_DEFAULTS: dict[str, Any] = gd.NETWORK  # what a flag string of networks alone starts from
CLASSIFIER_FLAGS = {k for k in gd.CLASSIFIER if k.startswith("classifier_")}


IMPROVED = "improved-diffusion"


def _codebase(codebase: str) -> dict[str, dict[str, Any]]:
    if codebase not in gd.CODEBASES:
        raise ConfigError(f"flags: unknown codebase {codebase!r}; one of {', '.join(gd.CODEBASES)}")
    return gd.CODEBASES[codebase]


def parse_flags(text: str, codebase: str = "guided-diffusion") -> tuple[dict[str, Any], list[str]]:
    """``--name value`` / ``--name=value`` pairs -> typed values; returns (flags, ignored)."""
    known = gd.ID_ALL_FLAGS if codebase == IMPROVED else gd.ALL_FLAGS
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
        if name in gd.IGNORED:
            ignored.append(name)
            continue
        if name in gd.REJECTED:
            raise ConfigError(f"flags: --{name}: {gd.REJECTED[name]}")
        if name not in known:
            raise ConfigError(f"flags: unknown {codebase} flag --{name}")
        try:
            flags[name] = gd.parser_for(name)(value)
        except ValueError as e:
            raise ConfigError(f"flags: --{name} {value!r}: {e}") from None
    return flags, ignored


def script_for(
    names: set[str], script: str | None = None, codebase: str = "guided-diffusion"
) -> str | None:
    """The script of ``codebase`` the flags were written for (None: network flags only).

    ``script`` names it; else it is the first script (in the codebase's table order) that
    takes every flag. Flags no single script takes fail, naming the scripts that take each.
    """
    scripts = _codebase(codebase)
    if script is not None:
        if script not in scripts:
            raise ConfigError(
                f"flags: {codebase} has no script {script!r}; one of {', '.join(scripts)}"
            )
        extra = sorted(n for n in names if n not in scripts[script])
        if extra:
            raise ConfigError(f"flags: {script}.py has no flag --{', --'.join(extra)}")
        return script
    takers = [s for s, flags in scripts.items() if names <= flags.keys()]
    if not takers:
        where = {n: [s for s in scripts if n in scripts[s]] for n in sorted(names)}
        mixed = "; ".join(f"--{n}: {', '.join(s)}" for n, s in where.items())
        raise ConfigError(f"flags: no {codebase} script takes all of these ({mixed})")
    network = gd.ID_NETWORK if codebase == IMPROVED else gd.NETWORK
    return None if names <= network.keys() else takers[0]


def _check_supported(f: dict[str, Any], script: str | None) -> None:
    """Values guided-diffusion accepts but admflow cannot reproduce: refused, saying why."""
    why = []
    if f.get("lr_anneal_steps", 0) != 0:
        why.append(
            "--lr_anneal_steps: admflow keeps the diffusion lr constant (guided-diffusion's "
            "default, 0); set training.steps for the length of the run"
        )
    if script == "classifier_train" and not f["anneal_lr"]:
        why.append(
            "--anneal_lr False (classifier_train.py's default): admflow always anneals the "
            "classifier's lr linearly to 0, as the paper does; pass --anneal_lr True"
        )
    if script == "classifier_train" and f["schedule_sampler"] != "uniform":
        why.append("--schedule_sampler: admflow draws the classifier's timesteps uniformly")
    if f.get("fp16_scale_growth", 1e-3) != 1e-3:
        why.append("--fp16_scale_growth: admflow's loss scaler grows log2(scale) by 1e-3 a step")
    if why:
        raise ConfigError("flags: " + "; ".join(why))


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
        "sigma_small": f.get("sigma_small", False),  # guided-diffusion: not a flag, False
        "predict_xstart": f["predict_xstart"],
        "use_kl": f["use_kl"],
        "rescale_learned_sigmas": f["rescale_learned_sigmas"],
        "rescale_timesteps": f["rescale_timesteps"],
        "schedule_sampler": f.get("schedule_sampler", "uniform"),
    }


def _classifier(f: dict[str, Any], enabled: bool) -> dict:
    return {
        "enabled": enabled,
        "image_size": f["image_size"],
        "width": f["classifier_width"],
        "depth": f["classifier_depth"],
        "attention_resolutions": f["classifier_attention_resolutions"],
        "use_scale_shift_norm": f["classifier_use_scale_shift_norm"],
        "resblock_updown": f["classifier_resblock_updown"],
        "pool": f["classifier_pool"],
        "use_fp16": f["classifier_use_fp16"],
        "num_head_channels": 64,  # create_classifier fixes it
        "num_classes": 1000,
    }


def _sr_channel_mult(large_size: int) -> list[float]:
    # guided-diffusion's super-resolution model uses 6 levels at 512, not the base model's 7
    return [1, 1, 2, 2, 4, 4] if large_size == 512 else list(default_channel_mult(large_size))


def _sampling(f: dict[str, Any], script: str | None, super_res: bool) -> dict:
    """Every script samples with DDPM unless --use_ddim True, over every diffusion step
    unless --timestep_respacing says otherwise."""
    out: dict[str, Any] = {
        "sampler": "ddim" if f.get("use_ddim", False) else "ddpm",
        "timestep_respacing": f["timestep_respacing"],
    }
    if super_res:  # super_res_sample.py's respacing is the upsampler's
        out["upsample_respacing"] = f["timestep_respacing"]
    if script in gd.SAMPLING_SCRIPTS:
        out |= {k: f[k] for k in ("num_samples", "batch_size", "clip_denoised")}
    if script == "classifier_sample":
        out["classifier_scales"] = [f["classifier_scale"]]
    return out


def _training(f: dict[str, Any], script: str) -> dict:
    common = {
        "batch_size": f["batch_size"],
        "microbatch": f["microbatch"],
        "log_every": f["log_interval"],
        "checkpoint_every": f["save_interval"],
    }
    if script == "classifier_train":
        return common | {
            "classifier_steps": f["iterations"],
            "classifier_lr": f["lr"],
            "classifier_weight_decay": f["weight_decay"],
            "classifier_noised": f["noised"],
            "mixed_precision": "fp16" if f["classifier_use_fp16"] else "no",
        }
    return common | {
        "lr": f["lr"],
        "weight_decay": f["weight_decay"],
        "ema_rate": f["ema_rate"],
        "mixed_precision": "fp16" if f["use_fp16"] else "no",
    }


def _check_improved_sizes(f: dict[str, Any], super_res: bool) -> None:
    """improved-diffusion's create_model has channel multipliers for these sizes only."""
    if super_res and f["large_size"] not in gd.ID_LARGE_SIZES:
        raise ConfigError(
            f"flags: --large_size {f['large_size']}: improved-diffusion's upsampler is built "
            f"at {', '.join(map(str, gd.ID_LARGE_SIZES))} only"
        )
    if not super_res and f["image_size"] not in gd.ID_IMAGE_SIZES:
        raise ConfigError(
            f"flags: --image_size {f['image_size']}: improved-diffusion builds models at "
            f"{', '.join(map(str, gd.ID_IMAGE_SIZES))} only"
        )


def _defaults(codebase: str, script: str | None) -> dict[str, Any]:
    """Every setting the flags leave out, as the script of ``codebase`` would have it."""
    if codebase == IMPROVED:
        base = {**gd.ID_HARDWIRED, **gd.ID_NETWORK}
        return {**base, **(gd.ID_SCRIPTS[script] if script else {})}
    return {**GD_DEFAULTS, **(gd.SCRIPTS[script] if script else {})}


def preset_from_flags(
    text: str,
    name: str = "from-flags",
    script: str | None = None,
    codebase: str = "guided-diffusion",
) -> tuple[dict[str, Any], list[str]]:
    """The preset mapping for a codebase's flags (validated); returns (preset, ignored).

    ``script``: the script the flags are for (default: inferred from them); ``codebase``:
    "guided-diffusion" (ADM) or "improved-diffusion" (Improved DDPM), whose scripts take other
    flags with other defaults.
    """
    _codebase(codebase)
    given, ignored = parse_flags(text, codebase)
    script = script_for(set(given) | set(ignored), script, codebase)
    f = {**_defaults(codebase, script), **given}
    if script == "classifier_train":
        f["class_cond"] = True  # classifier_train.py always loads the labels
    _check_supported(f, script)
    super_res = bool({"large_size", "small_size"} & set(given)) or script in (
        "super_res_sample",
        "super_res_train",
    )
    if codebase == IMPROVED:
        _check_improved_sizes(f, super_res)
    preset: dict[str, Any] = {"name": name, "description": f"from {codebase} flags: {text}"}
    if super_res:
        large, small = f["large_size"], f["small_size"]
        preset["upsampler"] = {
            "enabled": True,
            "small_size": small,
            "unet": _unet(f, large, _sr_channel_mult(large)),
            "diffusion": _diffusion(f),
        }
        f["image_size"] = small
    cond = f["class_cond"]
    preset["data"] = {"image_size": f["image_size"], "class_cond": cond}
    preset["data"]["num_classes"] = 1000 if cond else None
    preset["model"] = _unet(f, f["image_size"], f["channel_mult"])
    preset["diffusion"] = _diffusion(f)
    enabled = script in ("classifier_sample", "classifier_train") or bool(
        CLASSIFIER_FLAGS & set(given)
    )
    preset["classifier"] = _classifier(f, enabled)
    preset["sampling"] = _sampling(f, script, super_res)
    if not enabled:
        preset["sampling"]["classifier_scales"] = [0.0]  # nothing to guide with
    if script in gd.TRAINING_SCRIPTS:
        preset["training"] = _training(f, script)
    config_from_dict(preset, source=f"{codebase} flags")
    return preset, ignored
