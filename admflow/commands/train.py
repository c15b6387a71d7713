"""``admflow train {diffusion,classifier,upsampler}``: one Ray Train job."""

from __future__ import annotations

import argparse
import json

from admflow.commands.common import (
    add_config_args,
    check_outputs,
    check_resources,
    config_from_args,
    count,
    local_abs,
)

DESCRIPTION = """\
Train one model of the ADM pipeline on Ray Train (cfg.compute: workers, CPUs, GPU).

  diffusion   the UNet on its preset's objective (L_hybrid, L_vlb, L_simple), EMA (training.steps)
  classifier  the noisy classifier p(y | x_t, t) for guidance (training.classifier_steps)
  upsampler   the super-resolution UNet on area-downsampled inputs (training.upsampler_steps)

Checkpoints: <storage.root>/runs/<run-name>/checkpoints/step-NNNNNN/. Running again with the
same --run-name continues from the newest checkpoint (raise the step count with --set to
train further). Prints a JSON summary (checkpoint URIs, final step, MLflow run id, metrics).

Example:
  admflow train diffusion --config tiny --data ./admflow-store/data/demo --set training.steps=500
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the diffusion model, the noisy classifier or the upsampler on Ray",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=["diffusion", "classifier", "upsampler"], help="what to train")
    add_config_args(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="MANIFEST_URI",
        help="shard set from `admflow shard` (its directory or manifest.json; local or s3://)",
    )
    p.add_argument(
        "--run-name",
        default=None,
        metavar="NAME",
        help="run directory under <storage.root>/runs (default: <kind>-<config name>); "
        "reuse a name to resume",
    )
    p.add_argument(
        "--max-failures",
        type=count(0),
        default=3,
        metavar="N",
        help="restarts from the last checkpoint after a lost worker (default 3)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_name = args.run_name or f"{args.kind}-{cfg.name}"
    data = local_abs(args.data)
    check_outputs(cfg)
    check_resources(cfg, (f"train-{args.kind}",))
    from tasks.training.launch import NonFiniteLossError, train  # torch: after the checks

    try:
        out = train(args.kind, cfg, data, run_name, max_failures=args.max_failures)
    except NonFiniteLossError as e:
        print(f"admflow train: {e}")
        return 1
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
