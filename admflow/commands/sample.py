"""``admflow sample``: a sharded, resumable sample set from a diffusion checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from admflow.commands.common import add_config_args, config_from_args, count, local_abs
from admflow.commands.planning import RunInputs, add_plan_arg, preflight, show_plan
from admflow.config import AdmConfig, ConfigError
from admflow.config.sampling import STEP_SCHEDULES
from admflow.preflight import check_room_for_samples
from admflow.tracking import check_experiment

if TYPE_CHECKING:
    from tasks.sampling.spec import ExecutionOptions

EPILOG = """\
examples:
  admflow sample --config tiny --checkpoint ckpt/diffusion --num-samples 200 --out samples/s0
  admflow sample --config imagenet64 --checkpoint 64x64_diffusion.pt \\
      --classifier 64x64_classifier.pt --classifier-scale 1.0 --steps 250 --sampler ddpm \\
      --num-samples 50000 --workers 8 --merge --out s3://bucket/samples/in64-s1
  admflow sample --config imagenet64 --checkpoint 64x64_diffusion.pt \\
      --classifier 64x64_classifier.pt --classifier-scale 1.0 --steps '' \\
      --sampler unipc --solver-steps 10 --out samples/in64-unipc10   # 10 network evaluations
  admflow sample --config tiny --set model.null_class=true --checkpoint ckpt/cfg-diffusion \\
      --guidance free --cfg-scale 1.5 --out samples/cfg   # a model trained with label dropout

Output: OUT/manifest.json, OUT/shards/samples-NNNNN.npz (arr_0 uint8 NHWC, arr_1 labels),
OUT/metadata.json, OUT/grid.png (and with --merge one samples_NxHxWx3.npz). Rerunning the
same command skips finished shards; shard i depends only on the config, seed and i.
"""


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `sample` and `upsample` (defaults come from the preset's sampling)."""
    p.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc"],
        help="reverse process: ancestral DDPM, DDIM, the few-step ODE solvers or the SDE form of "
        "DPM-Solver++(2M) (default: preset)",
    )
    p.add_argument(
        "--solver-steps",
        type=int,
        metavar="N",
        help="the solvers: network evaluations, taken from the --steps timesteps (default: all)",
    )
    p.add_argument(
        "--step-schedule",
        choices=STEP_SCHEDULES,
        help="the solvers: steps uniform in time, in log-SNR or in sqrt(time), denser near "
        "the data (default: preset)",
    )
    p.add_argument(
        "--steps",
        metavar="RESPACING",
        help="timestep respacing: '250', 'ddim25' or '10,15,20'; '' = all steps (default: preset)",
    )
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic DDIM)")
    p.add_argument(
        "--use-ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample from the EMA weights of our checkpoints (default: preset, usually yes)",
    )
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass (part of the seed plan: a new set)"
    )
    p.add_argument("--workers", type=int, help="Ray actors, one model replica each")
    p.add_argument("--seed", type=int, help="run seed; shard i uses (seed, i)")
    p.add_argument("--merge", action="store_true", help="also write one merged ADM .npz")
    p.add_argument(
        "--max-shards", type=count(1), help="stop after this many new shards (rerun to continue)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images from a diffusion checkpoint (sharded, resumable, Ray)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="URI",
        help="our checkpoint dir (model.pt/ema_<rate>.pt/meta.json) or a released OpenAI .pt",
    )
    p.add_argument(
        "--out", required=True, metavar="URI", help="output dir (local, file:// or s3://)"
    )
    p.add_argument(
        "--num-samples", type=int, metavar="N", help="images in the set (default: preset)"
    )
    p.add_argument("--classifier", metavar="URI", help="noisy classifier checkpoint for guidance")
    p.add_argument(
        "--classifier-scale",
        type=float,
        default=None,
        metavar="S",
        help="guidance scale s (default: the preset's first non-zero scale when --classifier)",
    )
    p.add_argument(
        "--classes",
        metavar="LIST",
        help="comma list of class ids to draw labels from (default: all classes, uniformly)",
    )
    p.add_argument(
        "--guidance",
        choices=["classifier", "free", "none"],
        help="classifier (with --classifier), free (classifier-free, weight --cfg-scale) or none",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        metavar="W",
        help="classifier-free weight w: (1+w)·eps(x,y) - w·eps(x,null) (with --guidance free)",
    )
    add_sampling_args(p)
    add_plan_arg(p)
    p.set_defaults(func=run)


# Flags that set a config field (validated there like any --set override).
SAMPLING_FLAGS = {
    "sampler": "sampling.sampler",
    "steps": "sampling.timestep_respacing",
    "eta": "sampling.eta",
    "use_ema": "sampling.use_ema",
    "batch_size": "sampling.batch_size",
    "workers": "sampling.workers",
    "seed": "sampling.seed",
    "solver_steps": "sampling.solver_steps",
    "step_schedule": "sampling.step_schedule",
}
SAMPLE_FLAGS = {
    **SAMPLING_FLAGS,
    "num_samples": "sampling.num_samples",
    "scales": "sampling.classifier_scales",
    "class_list": "sampling.classes",
    "guidance": "sampling.guidance",
    "cfg_scale": "sampling.cfg_scale",
}


def parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--classes: expected comma-separated integers, got {text!r}") from None


@contextlib.contextmanager
def nonfinite_as_exit():
    """A diverged model's NaN images: a one-line error (exit 2), no shard written."""
    from tasks.sampling.spec import NonFiniteSampleError

    try:
        yield
    except NonFiniteSampleError as e:
        print(f"admflow: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def execution(args: argparse.Namespace, cfg: AdmConfig) -> ExecutionOptions:
    """How the set is produced: the config's workers, threads and device, and these flags."""
    from tasks.sampling.spec import ExecutionOptions

    return ExecutionOptions.from_config(
        cfg, max_shards=args.max_shards, progress=not args.no_progress
    )


def run(args: argparse.Namespace) -> int:
    given = args.classifier_scale is not None
    args.scales = [args.classifier_scale] if given else None
    args.class_list = parse_classes(args.classes)
    cfg = config_from_args(args, SAMPLE_FLAGS)
    local_abs(args.out)  # a URL in a form admflow cannot use: before torch is imported
    from tasks.sampling.build import build_spec
    from tasks.sampling.sample_set import sample_set
    from tasks.sampling.spec import default_scale

    scales = cfg.sampling.classifier_scales
    # An explicit scale is used as given; whether it means guidance is cfg.sampling.guided's.
    scale = scales[0] if given else default_scale(scales, args.classifier is not None)
    guided = cfg.sampling.guided(scale, args.classifier is not None)  # may fail: before start-up
    checkpoint, classifier = local_abs(args.checkpoint), local_abs(args.classifier)
    nets = {"diffusion": checkpoint} | ({"classifier": classifier} if classifier else {})
    inputs = RunInputs("sample", ("sample",), nets, outputs=(local_abs(args.out),))
    if args.plan:
        from tasks.estimate import sampling_work

        work = sampling_work(cfg, "sample", cfg.sampling.num_samples, guided=guided)
        return show_plan(cfg, inputs, [work])
    preflight(cfg, inputs)
    check_experiment(cfg)  # the set is logged to MLflow at its end: check the store now
    with nonfinite_as_exit():
        spec = build_spec(cfg, checkpoint, classifier=classifier, scale=scale)
        check_room_for_samples(local_abs(args.out), spec.num_samples, spec.image_size, args.merge)
        result = sample_set(cfg, spec, local_abs(args.out), execution(args, cfg), merge=args.merge)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["complete"] or args.max_shards else 1
