"""``admflow config``: show presets and resolved configs."""

from __future__ import annotations

import argparse

from admflow.commands.common import add_set_arg
from admflow.config import dump_config, list_presets, load_config

# guided-diffusion's scripts, as admflow.gd_scripts.SCRIPTS names them (no import at startup)
GD_SCRIPTS = (
    "image_sample",
    "classifier_sample",
    "super_res_sample",
    "image_train",
    "super_res_train",
    "classifier_train",
    "image_nll",  # improved-diffusion's
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list presets and print resolved configs")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser(
        "show",
        help="print a preset after 'base:' inheritance and --set overrides, as YAML",
        description="Print the fully resolved config; fails with the field name if invalid.",
    )
    show.add_argument("preset", help="preset name (see `admflow config list`) or a YAML path")
    add_set_arg(show)
    show.set_defaults(func=_show)
    lst = csub.add_parser("list", help="list the presets in configs/ with their descriptions")
    lst.set_defaults(func=_list)
    ff = csub.add_parser(
        "from-flags",
        help="turn guided-diffusion README flags into a preset (YAML on stdout)",
        description=(
            "Build a preset from guided-diffusion flags (MODEL_FLAGS, CLASSIFIER_FLAGS, "
            "DIFFUSION_FLAGS, SAMPLE_FLAGS, TRAIN_FLAGS) read as the guided-diffusion script "
            "they were written for reads them: only that script's flags are valid and every "
            "flag left out takes that script's default (no --timestep_respacing: DDPM over "
            "every diffusion step). The script is the first that takes every flag, or --script. "
            "Paths are ignored; a setting admflow lacks is refused with the reason. "
            "With --large_size/--small_size the flags describe the upsampler; its model "
            "section is then the same flags at the small size: put `base: <preset>` in the "
            "file to take the real base model instead."
        ),
    )
    ff.add_argument("flags", help='one quoted string, e.g. "$MODEL_FLAGS $CLASSIFIER_FLAGS"')
    ff.add_argument("--name", default="from-flags", help="the preset's name")
    ff.add_argument(
        "--script",
        choices=list(GD_SCRIPTS),
        help="the guided-diffusion script the flags are for (default: inferred from them)",
    )
    ff.add_argument(
        "--codebase",
        choices=["guided-diffusion", "improved-diffusion"],
        default="guided-diffusion",
        help="whose scripts the flags are for: guided-diffusion (ADM) or improved-diffusion "
        "(Improved DDPM's README; other defaults, e.g. rescaled timesteps)",
    )
    ff.set_defaults(func=_from_flags)


def _show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.preset, args.overrides)), end="")
    return 0


def _list(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(f"{name:20s} {load_config(name).description}")
    return 0


def _from_flags(args: argparse.Namespace) -> int:
    import json
    import sys

    import yaml

    from admflow.flags import preset_from_flags
    from admflow.gd_scripts import IGNORED

    preset, ignored = preset_from_flags(
        args.flags, name=args.name, script=args.script, codebase=args.codebase
    )
    for flag in ignored:
        print(f"ignored --{flag}: {IGNORED[flag]}", file=sys.stderr)
    plain = json.loads(json.dumps(preset))  # no YAML anchors for lists the sections share
    print(yaml.safe_dump(plain, sort_keys=False), end="")
    return 0
