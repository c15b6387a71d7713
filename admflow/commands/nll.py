"""``admflow nll``: the negative log-likelihood of a test set in bits/dim, as Improved DDPM
reports it — the full variational bound over the model's own timesteps."""

from __future__ import annotations

import argparse
import json
import sys

from admflow.commands.common import add_config_args, config_from_args, count, local_abs

DESCRIPTION = """\
Compute -log p(x_0) <= L_T + sum_t L_(t-1) + L_0 in bits/dim for every test image, over every
one of the diffusion's own timesteps (4000 for Improved DDPM's released models; no respacing),
and print the mean over the images: the figure of Improved DDPM's likelihood tables. The
images are cut into shards computed by Ray actors (--workers 0: in this process); each
finished shard is written to OUT at once, so a rerun with the same OUT computes only the
missing shards. The result is logged to MLflow (metric nll_bpd) unless --no-mlflow.

DATA is a shard set (`admflow shard` output; for the demo's model, `admflow shard demo-heldout
DEST` holds images it never saw) or an .npz (arr_0 uint8 NHWC, optional arr_1 labels);
class-conditional networks need the labels. The network comes from the checkpoint's
own training config, or for a released .pt from --config (e.g. iddpm-cifar10-vlb).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nll",
        help="negative log-likelihood (variational bound, bits/dim) of a test set",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint directory or a .pt")
    p.add_argument("--data", required=True, metavar="DATA", help="shard set or .npz of images")
    p.add_argument("--out", default=None, help="result directory (default <root>/nll/<id>)")
    p.add_argument("--num-images", type=count(1), default=None, help="first N images (all)")
    p.add_argument("--batch-size", type=count(1), default=8, help="images per forward pass")
    p.add_argument("--shard-size", type=count(1), default=100, help="images per shard")
    p.add_argument(
        "--workers",
        type=count(0),
        default=None,
        help="Ray actors, placed as sampling's (default sampling.workers; 0: no Ray)",
    )
    p.add_argument("--max-shards", type=count(1), default=None, help="stop after N new shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the bound's noise draws")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1,1]")
    p.add_argument("--no-mlflow", action="store_true", help="do not log a run to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from admflow import storage
    from tasks.likelihood.run import compute_bound, log_bound
    from tasks.likelihood.spec import NllOptions, build_nll_spec
    from tasks.likelihood.testset import load_test_set

    cfg = config_from_args(args)
    if not args.no_mlflow:  # an unreachable tracking server fails now, not after the work
        from admflow.tracking import check_tracking

        check_tracking(cfg)
    test = load_test_set(local_abs(args.data), args.num_images)
    spec = build_nll_spec(
        cfg,
        local_abs(args.checkpoint),
        test,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        seed=args.seed,
        clip_denoised=not args.no_clip,
    )
    out = local_abs(args.out) or storage.join(cfg.storage.root, "nll", spec.fingerprint())
    options = NllOptions(
        workers=cfg.sampling.workers if args.workers is None else args.workers,
        device=cfg.compute.device,
        torch_threads=cfg.compute.torch_threads,
        max_shards=args.max_shards,
        progress=not args.no_progress,
    )
    result = compute_bound(cfg, spec, test, out, options)
    if result["complete"] and not args.no_mlflow:
        result["mlflow_run_id"] = log_bound(cfg, out)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result["complete"]:
        err = result["nll_bpd_stderr"]
        pm = f" ± {err:.4f}" if err is not None else ""
        print(
            f"NLL {result['nll_bpd']:.4f}{pm} bits/dim over {result['num_images']} images, "
            f"{result['num_timesteps']} timesteps (prior term {result['prior_bpd']:.2e}); "
            f"wall time {result['seconds']:.1f} s; {out}"
        )
    else:
        print(
            f"{result['shards_computed']} new shards; not complete yet: rerun to continue",
            file=sys.stderr,
        )
    return 0 if result["complete"] or args.max_shards else 1
