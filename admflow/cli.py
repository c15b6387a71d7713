"""``admflow`` command line: one subcommand per stage, each in ``admflow/commands/``."""

from __future__ import annotations

import argparse
import contextlib
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
    "nll",
]
# Commands that run Prefect flows, whose stages run in threads: SIGINT and SIGTERM stop them
# through admflow.interrupt (the others stop on the KeyboardInterrupt alone).
FLOW_COMMANDS = {"reproduce", "demo", "paper"}

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
    from admflow import interrupt
    from admflow.config import ConfigError
    from admflow.storage import StorageError
    from admflow.tracking import TrackingError

    guarded = args.command in FLOW_COMMANDS
    try:
        with interrupt.guard(args.command) if guarded else contextlib.nullcontext():
            rc = int(args.func(args) or 0)
    except BaseException as e:
        if guarded and interrupt.stopping():
            interrupt.finish()  # the stop's own line is out; ends the process
        if isinstance(e, (ConfigError, StorageError, TrackingError)):
            # One line: a multi-line config report becomes "invalid config (...): a; b".
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
            print(f"admflow {args.command}: {text}", file=sys.stderr)
            return 2
        if isinstance(e, KeyboardInterrupt):
            print(f"admflow {args.command}: interrupted; rerun to resume", file=sys.stderr)
            return 130
        raise
    if guarded and interrupt.stopping():  # a signal as the command ended
        interrupt.finish()
    return rc


if __name__ == "__main__":
    sys.exit(main())
