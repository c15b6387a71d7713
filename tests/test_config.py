"""Typed config: presets load, invalid configs fail at load time naming the field."""

from __future__ import annotations

import argparse

import pytest

from admflow.cli import main
from admflow.config import ConfigError, list_presets, load_config


def test_every_preset_loads():
    names = list_presets()
    for required in ("tiny", "bench-32", "imagenet64", "imagenet128", "imagenet256", "imagenet512",
                     "imagenet256-uncond", "lsun-bedroom", "lsun-cat", "lsun-horse", "classifier64",
                     "classifier128", "classifier256", "classifier512", "upsampler64-256",
                     "upsampler128-512"):  # fmt: skip
        assert required in names
    for name in names:
        assert load_config(name).name == name


def test_paper_hyperparameters_in_presets():
    c64 = load_config("imagenet64")
    assert (c64.model.model_channels, c64.model.num_res_blocks, c64.diffusion.noise_schedule) == (
        192,
        3,
        "cosine",
    )
    assert c64.classifier.depth == 4 and c64.sampling.classifier_scales == [1.0]
    c256 = load_config("imagenet256")
    assert c256.model.num_head_channels == 64 and c256.model.attention_resolutions == [32, 16, 8]
    assert load_config("imagenet512").sampling.classifier_scales == [4.0]
    assert load_config("imagenet256-uncond").model.num_classes is None
    up = load_config("upsampler64-256").upsampler
    assert up.enabled and (up.small_size, up.unet.image_size) == (64, 256)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.foo=1", "model.foo: unknown key; allowed keys here: attention_resolutions"),
        ("training.lr=fast", "training.lr"),
        (
            "diffusion.noise_schedule=quadratic",
            "diffusion.noise_schedule: Input should be 'linear' or 'cosine'",
        ),
        ("model.attention_resolutions=[64]", "allowed values: [16, 8, 4]"),
        ("sampling.timestep_respacing=ddimx", "sampling.timestep_respacing"),
        ("diffusion.learn_sigma=false", "must equal diffusion.learn_sigma"),
        ("training.ema_rate=[1.5]", "training.ema_rate"),
        (
            "sampling.upsample_sets=some",
            "sampling.upsample_sets: Input should be 'all', 'extremes'",
        ),
        ("training.checkpoint_steps=[early]", "training.checkpoint_steps"),
    ],
)
def test_invalid_config_names_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert fragment in str(e.value)


def test_upsample_sets_picks_scales_whatever_the_list():
    scales = "sampling.classifier_scales=[4.0, 0.0, 1.0, 9.0]"
    cfg = load_config("tiny", [scales])
    assert cfg.sampling.upsample_sets == "largest"  # the demo's choice
    picked = [s for s in cfg.sampling.classifier_scales if cfg.sampling.upsampled(s)]
    assert picked == [9.0]
    ends = load_config("tiny", [scales, "sampling.upsample_sets=extremes"])
    assert [s for s in ends.sampling.classifier_scales if ends.sampling.upsampled(s)] == [0.0, 9.0]
    every = load_config("tiny", ["sampling.upsample_sets=all"])
    assert all(every.sampling.upsampled(s) for s in every.sampling.classifier_scales)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*tiny"):
        load_config("imagenet1024")


def test_cli_config_show_applies_overrides(capsys):
    assert main(["config", "show", "tiny", "--set", "training.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "name: tiny" in out
    assert main(["config", "show", "tiny", "--set", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err


def _undocumented(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    """Commands without a line in their parent's listing and arguments without help text."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {c.dest: c.help for c in action._choices_actions}
            for name, sub in action.choices.items():
                if not (listed.get(name) or "").strip():
                    missing.append(f"{prefix} {name}")
                missing += _undocumented(sub, f"{prefix} {name}")
        elif not (action.help or "").strip():
            missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_subcommand_and_argument_is_documented():
    from admflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"config", "shard", "train", "sample", "evaluate", "reproduce", "demo", "stack"} <= set(
        sub.choices
    )
    assert _undocumented(parser, "admflow") == []
    # the top-level help lists every subcommand with its one-line help
    text = parser.format_help()
    for action in sub._choices_actions:
        assert action.dest in text and action.help.split()[0] in text, action.dest
