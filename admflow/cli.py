"""``admflow`` command line: one subcommand per stage, each in ``admflow/commands/``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines register(subparsers) and sets func=callable(args) -> int.
COMMANDS = [
    "config",
    "shard",
    "train",
    "sample",
    "upsample",
    "evaluate",
    "features",
    "reproduce",
    "paper",
    "demo",
    "stack",
]

DESCRIPTION = """\
admflow: reproduce "Diffusion Models Beat GANs on Image Synthesis" (ADM), Improved DDPM and
DDPM end to end: shard data -> train on Ray -> sample at scale -> FID/sFID/IS/P/R -> MLflow.

Start with `admflow demo` (the whole pipeline on the tiny preset, on this machine, no servers)
or `admflow config show tiny` to see what a preset holds.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="admflow", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"admflow.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"admflow.commands.{name}":
                continue  # stage not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from admflow.config import ConfigError
    from admflow.storage import StorageError
    from admflow.tracking import TrackingError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, StorageError, TrackingError) as e:
        # One line: a multi-line config report becomes "invalid config (...): a; b".
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
        print(f"admflow {args.command}: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"admflow {args.command}: interrupted; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
