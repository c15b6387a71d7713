"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse

from admflow.config import AdmConfig, list_presets, load_config


def add_config_args(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    p.add_argument(
        "--config",
        default=default,
        metavar="PRESET",
        help=f"preset name or YAML path (default {default}); presets: {', '.join(list_presets())}",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set training.steps=500 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> AdmConfig:
    return load_config(args.config, args.overrides)
