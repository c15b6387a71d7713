"""``admflow reproduce``: trigger the end-to-end Prefect flow for a preset."""

from __future__ import annotations

import argparse
import os

from admflow.commands.common import add_config_args
from admflow.commands.planning import RunInputs, add_plan_arg, preflight, show_plan
from admflow.config import AdmConfig, load_config


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
    add_plan_arg(p)
    p.set_defaults(func=run)


def reproduce_inputs(cfg: AdmConfig) -> RunInputs:
    """What the reproduce flow reads: the storage root, a given reference, Inception."""
    from tasks.resources import STAGES

    ref = cfg.evaluation.reference
    return RunInputs("reproduce", STAGES, reference=ref, reference_size=cfg.model.image_size,
                     scores=True)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.plan:
        from tasks.estimate import reproduce_work

        cfg = load_config(args.config, args.overrides)
        cfg.check_pipeline()
        return show_plan(cfg, reproduce_inputs(cfg), reproduce_work(cfg))
    result = run_reproduce(args.config, args.overrides)
    print_summary(result)
    return 0


def run_reproduce(preset: str, overrides: list[str]) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral API server needs longer than its 20 s default on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from admflow.uris import prefect_ui_without_credentials, scrub_overrides

    prefect_ui_without_credentials()  # its "View at" links: no user:password@
    cfg = load_config(preset, overrides)
    cfg.check_pipeline()  # before Prefect and Ray start
    # storage, reference, Inception (the bundled weights come with the `fid` extra), placement
    preflight(cfg, reproduce_inputs(cfg))
    from admflow.tracking import check_experiment

    check_experiment(cfg)  # reachable, and not keeping its artifacts under another root
    from flows.reproduce import reproduce  # Prefect's import is seconds: after the checks

    # Prefect records the parameters: credentials in a URI move out of them (admflow.uris).
    return reproduce(preset=preset, overrides=scrub_overrides(overrides))


def print_summary(result: dict) -> None:
    print("\n" + result.get("report", result["table"]))
    for uri in result.get("grids", []):
        print(f"sample grid:  {uri}")
    for uri in result.get("report_uris", []):
        print(f"report:       {uri}")
    print(f"MLflow run:   {result['mlflow_parent_run_id']}")
    if result.get("mlflow_ui"):
        print(f"open the UI:  {result['mlflow_ui']}")
