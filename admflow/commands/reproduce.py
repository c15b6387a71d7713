"""``admflow reproduce``: trigger the end-to-end Prefect flow for a preset."""

from __future__ import annotations

import argparse
import os

from admflow.commands.common import add_config_args
from admflow.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the whole pipeline (shard, train, sample, evaluate) as one Prefect flow",
        description=(
            "Shard the data, train the diffusion model, noisy classifier and upsampler on Ray "
            "Train, sample at every sampling.classifier_scales value, upsample, evaluate "
            "(FID, sFID, IS, precision, recall) and write the results table and plots. "
            "Finished stages are cache hits on a rerun. Uses Prefect's ephemeral API unless "
            "PREFECT_API_URL is set, MLflow at tracking.tracking_uri / MLFLOW_TRACKING_URI "
            "(default: sqlite under the storage root) and local Ray unless compute.ray_address."
        ),
    )
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tasks.scoring.inputs import check_reference

    check_reference(load_config(args.config, args.overrides).evaluation.reference)
    result = run_reproduce(args.config, args.overrides)
    print_summary(result)
    return 0


def run_reproduce(preset: str, overrides: list[str]) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral API server needs longer than its 20 s default on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from admflow.config import load_config
    from flows.reproduce import reproduce

    load_config(preset, overrides).check_pipeline()  # before Prefect and Ray start
    return reproduce(preset=preset, overrides=overrides)


def print_summary(result: dict) -> None:
    print("\n" + result.get("report", result["table"]))
    for uri in result.get("grids", []):
        print(f"sample grid:  {uri}")
    for uri in result.get("report_uris", []):
        print(f"report:       {uri}")
    print(f"MLflow run:   {result['mlflow_parent_run_id']}")
    if result.get("mlflow_ui"):
        print(f"open the UI:  {result['mlflow_ui']}")
