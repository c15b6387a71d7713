"""``admflow demo``: the README's main job, the tiny reproduction on embedded defaults."""

from __future__ import annotations

import argparse

from admflow.commands.common import add_set_arg
from admflow.commands.reproduce import print_summary, run_reproduce


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole reproduction on the tiny preset, on this machine, no servers needed",
        description=(
            "Runs `admflow reproduce --config tiny` with embedded defaults: local Ray, "
            "Prefect's ephemeral API, MLflow in ./admflow-store/mlflow.db and the object store "
            "in ./admflow-store. The two-stage pipeline at toy scale: a 16px base model, a "
            "noisy classifier and a 16->32 upsampler; FID over training and a guidance sweep "
            "scored at 16px, the most guided set taken to 32px by the upsampler and "
            "bilinearly, class accuracy from an independent judge. 9 to 13 minutes on 2 idle "
            "CPU cores (more on slower ones); a rerun is all cache hits. Override any "
            "preset field with --set, e.g. --set training.steps=1500."
        ),
    )
    add_set_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_reproduce("tiny", args.overrides)
    print_summary(result)
    return 0
