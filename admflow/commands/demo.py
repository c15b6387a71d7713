"""``admflow demo``: the README's main job, the tiny reproduction on embedded defaults."""

from __future__ import annotations

import argparse

from admflow.commands.reproduce import print_summary, run_reproduce


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole reproduction on the tiny preset, on this machine, no servers needed",
        description=(
            "Runs `admflow reproduce --config tiny` with embedded defaults: local Ray, "
            "Prefect's ephemeral API, MLflow in ./admflow-store/mlflow.db and the object store "
            "in ./admflow-store. About 12 minutes on 2 idle CPU cores (target 15); a rerun "
            "is all cache hits. Override any preset field with --set, e.g. "
            "--set training.steps=1000."
        ),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set training.steps=500 (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_reproduce("tiny", args.overrides)
    print_summary(result)
    return 0
