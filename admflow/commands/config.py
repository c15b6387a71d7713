"""``admflow config``: show presets and resolved configs."""

from __future__ import annotations

import argparse

from admflow.config import dump_config, list_presets, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list presets and print resolved configs")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser(
        "show",
        help="print a preset after 'base:' inheritance and --set overrides, as YAML",
        description="Print the fully resolved config; fails with the field name if invalid.",
    )
    show.add_argument("preset", help="preset name (see `admflow config list`) or a YAML path")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_show)
    lst = csub.add_parser("list", help="list the presets in configs/ with their descriptions")
    lst.set_defaults(func=_list)


def _show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.preset, args.overrides)), end="")
    return 0


def _list(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(f"{name:20s} {load_config(name).description}")
    return 0
