"""``admflow upsample``: the second stage, the upsampler conditioned on a base sample set."""

from __future__ import annotations

import argparse
import json

from admflow.commands.common import add_config_args, config_from_args, local_abs
from admflow.commands.planning import RunInputs, add_plan_arg, preflight, show_plan
from admflow.commands.sample import SAMPLING_FLAGS, add_sampling_args, execution, nonfinite_as_exit
from admflow.tracking import check_experiment

EPILOG = """\
example:
  admflow upsample --config upsampler64-256 --base s3://b/samples/in64 \\
      --checkpoint 64_256_upsampler.pt --steps 250 --out s3://b/samples/in64-up256

Each base image (and its label) conditions the upsampler (cfg.upsampler); base images at
another size than upsampler.small_size are resized first. Sharded and resumable like
`admflow sample`; the output is a sample set of the same N at upsampler.unet.image_size.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upsample",
        help="upsample a base sample set with a super-resolution diffusion model (ADM-U)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--base", required=True, metavar="URI", help="a complete base sample set")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="URI",
        help="upsampler checkpoint dir (ours) or a released OpenAI upsampler .pt",
    )
    p.add_argument(
        "--out", required=True, metavar="URI", help="output dir (local, file:// or s3://)"
    )
    add_sampling_args(p)
    add_plan_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tasks.sampling.build import build_upsample_spec
    from tasks.sampling.sample_set import upsample_set

    cfg = config_from_args(args, SAMPLING_FLAGS)
    base, ckpt, out = (local_abs(u) for u in (args.base, args.checkpoint, args.out))
    inputs = RunInputs("upsample", ("upsample",), {"upsampler": ckpt}, outputs=(out,))
    if args.plan:
        from tasks.estimate import sampling_work

        images = build_upsample_spec(cfg, base, ckpt).num_samples  # a complete base set
        work = sampling_work(cfg, "upsample", images, guided=False, section="upsampler")
        return show_plan(cfg, inputs, [work])
    preflight(cfg, inputs)
    check_experiment(cfg)  # the set is logged to MLflow at its end: check the store now
    with nonfinite_as_exit():
        spec = build_upsample_spec(cfg, base, ckpt)
        result = upsample_set(cfg, spec, base, out, execution(args, cfg), merge=args.merge)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["complete"] or args.max_shards else 1
