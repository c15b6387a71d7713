"""``admflow features``: Inception features of a set of images, written as a feature file."""

from __future__ import annotations

import argparse
import sys

from admflow.commands.common import check_outputs, local_abs
from admflow.commands.evaluate import INPUTS_HELP, add_extraction_args, extraction_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="extract Inception features (pool, spatial[, logits]) to a feature .npz",
        description="Write the features that `admflow evaluate` uses, so that a set is pushed "
        "through Inception once. The output has pool Nx2048, spatial Nx2023 (sFID), logits "
        "Nx1008 when the weights have them, statistics mu/sigma/mu_s/sigma_s for data sets "
        "and for reference batches that carry them, image_size and num_images.\n\n" + INPUTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", metavar="IMAGES", help=".npz batch, sample set or data set")
    p.add_argument("out", metavar="OUT.npz", help="where to write the feature file (any URI)")
    add_extraction_args(p, run)


def run(args: argparse.Namespace) -> int:
    from tasks.scoring.evaluate import EVALUATION_ERRORS
    from tasks.scoring.features import features_for, save_features

    cfg = extraction_config(args)
    out = local_abs(args.out)
    check_outputs(cfg, out)  # its bucket or directory, before Inception runs
    try:
        feats, _ = features_for(cfg, local_abs(args.images))
    except EVALUATION_ERRORS as e:
        print(f"admflow features: {e}", file=sys.stderr)
        return 2
    save_features(out, feats)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(feats.items()) if v.ndim)
    print(f"wrote {out}: {shapes}")
    return 0
